"""The built-in model: loads with transformers, round-trips its tokenizer, and the fused head path
(decoder body + kernel) equals the full-logits log-softmax of the HF model."""
import torch

from common import data, model as M


def test_tiny_model_and_tokenizer(tmp_path):
    path = M.build_tiny(tmp_path / "tiny")
    assert M.build_tiny(tmp_path / "tiny") == path  # idempotent
    lm, tok = M.load(str(path))
    assert 0.9e6 < M.count_params(lm) < 1.2e6
    cfg = lm.config
    assert cfg.hidden_size // cfg.num_attention_heads == 32 and cfg.tie_word_embeddings
    text = "(5-3)*5=\n5-3=2, 2*5=10. \\boxed{10}"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character
    assert tok.eos_token_id == tok.pad_token_id == cfg.eos_token_id


def test_fused_head_equals_full_logits(tmp_path):
    lm, tok = M.load(str(M.build_tiny(tmp_path / "tiny", seed=3)))
    rows = data.builtin_task(4, seed=0)
    seqs = [(tok(r["question"] + "\n").input_ids + tok(r["response"]).input_ids, len(r["question"]) + 1) for r in rows]
    ids, attn, targets = data.collate(seqs, tok.pad_token_id)
    for temperature in (1.0, 0.7):
        logp, ent = M.WithHead(lm)(ids, attn, M.logprob_head(targets, temperature))
        logits = lm(input_ids=ids, attention_mask=attn).logits.float() / temperature
        ref = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
        ref_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * (targets != -100)
        assert torch.allclose(logp, ref, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)


def _build_in_child(out_dir, q, rank, store):
    import torch.distributed as tdist
    try:  # as under torchrun: a process group, in which transformers' save_pretrained writes only on rank 0
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
        path = M.build_tiny(out_dir)
        M.load(str(path))  # what a rank does next, while the others may still be building
        q.put(str(path))
    except Exception as e:  # reported to the parent, which fails the test with it
        q.put(repr(e))


def test_build_tiny_concurrent_first_run(tmp_path):
    """Every rank of a fresh checkout builds the built-in model at once: all must get the same complete folder.
    Seen before: 'Unrecognized model ...' when one rank deleted the folder another was loading, and when a rank
    other than 0 built it (transformers' save_pretrained skips writing the weights there)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), tmp_path / "runs" / "tiny-init"
    procs = [ctx.Process(target=_build_in_child, args=(out, q, i, tmp_path / "store")) for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [str(out)] * 4, results
    rng = torch.get_rng_state()
    M.build_tiny(tmp_path / "another")
    assert torch.equal(rng, torch.get_rng_state())  # building or not never moves the caller's RNG


def test_resolve_missing_local_folder_is_one_clear_line(tmp_path, monkeypatch):
    import pytest
    from common.config import InputError
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/ folder
    for name in ["runs/gem_sft-gem/hf", "./my-model", "/nonexistent/model", "out/x/hf", "a/b/c"]:
        with pytest.raises(InputError) as e:  # one `error:` line in a trainer (config.one_line_errors)
            M.resolve(name)
        assert str(e.value) == (f"model folder {name} not found (run gem_sft.py first to create "
                                "runs/gem_sft-gem/hf, or pass --model)")
    (tmp_path / "runs" / "gem_sft-gem" / "hf").mkdir(parents=True)
    assert M.resolve("runs/gem_sft-gem/hf") == "runs/gem_sft-gem/hf"  # an existing folder passes through
    assert M.resolve("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"  # hub ids are not checked here
    assert M.resolve("gpt2") == "gpt2"


def test_tied_embedding_gradient_sparse_lookup_equals_dense(tmp_path):
    """WithHead makes a tied embedding's lookup gradient sparse (memory); the parameter's gradient must be the
    same dense tensor as with a dense lookup: head term (all rows) + lookup term (the batch's rows)."""
    lm, tok = M.load(str(M.build_tiny(tmp_path / "tiny", seed=5)))
    rows = data.builtin_task(3, seed=1)
    seqs = [(tok(r["question"] + "\n").input_ids + tok(r["response"]).input_ids, len(r["question"]) + 1) for r in rows]
    ids, attn, targets = data.collate(seqs, tok.pad_token_id)
    # reference, written out: a plain dense forward through the HF model
    logits = lm(input_ids=ids, attention_mask=attn).logits.float()
    mask = targets != -100
    (-(logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum()).backward()
    ref = lm.get_input_embeddings().weight.grad.clone()
    lm.zero_grad(set_to_none=True)
    assert not lm.get_input_embeddings().sparse
    policy = M.WithHead(lm)
    assert lm.get_input_embeddings().sparse  # tied: the lookup's term is sparse
    logp, _ = policy(ids, attn, M.logprob_head(targets))
    (-logp.sum()).backward()
    g = lm.get_input_embeddings().weight.grad
    assert g.layout == torch.strided and not g.is_sparse  # one dense gradient for the optimizer and FSDP
    used = torch.zeros(len(g), dtype=torch.bool)
    used[ids.flatten()] = True
    assert torch.allclose(g, ref, atol=1e-5) and (g[used] != 0).any()
    # a plausible wrong variant: the lookup's term dropped (only the head's gradient) is far from it
    lm.zero_grad(set_to_none=True)
    h = M.hidden_states(lm, ids, attn).detach()
    logp2, _ = M.logprob_head(targets)(h, M.head_weight(lm))
    (-logp2.sum()).backward()
    assert not torch.allclose(lm.get_input_embeddings().weight.grad, ref, atol=1e-3)


def _rows_sharing_prefixes(V, seed=0):
    """Three prompts (all begin with the same 4 "system" tokens) x 3/2/3 responses of 0..11 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, V, (k,), generator=g).tolist()
    system, rows = rand(4), []
    for plen, n in [(7, 3), (9, 2), (5, 3)]:
        prompt = system + rand(plen - 4)
        rows += [prompt + rand(int(torch.randint(0, 12, (), generator=g))) for _ in range(n)]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    return ids, attn


def test_shared_prefix_forward_equals_each_row_alone(tmp_path):
    lm, _ = M.load(str(M.build_tiny(tmp_path / "tiny", seed=1)))
    body = lm.get_decoder()
    for seed in range(3):
        ids, attn = _rows_sharing_prefixes(lm.config.vocab_size, seed)
        lens = attn.sum(1).tolist()
        p = M.shared_prefix_layout(ids, attn)
        # by construction: one sequence per prompt, each row's tokens found where the index says
        assert p.ids.shape[0] == 3 and p.ids.numel() < ids.numel()
        assert torch.equal(p.ids.flatten()[p.index][attn.bool()], ids[attn.bool()])
        own_positions = torch.arange(ids.shape[1]).expand_as(ids)
        assert torch.equal(p.positions.flatten()[p.index][attn.bool()], own_positions[attn.bool()])
        w = torch.randn(*ids.shape, lm.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        h = M.hidden_states(lm, ids, attn)
        (h * w * attn[..., None]).sum().backward()
        grads = [q.grad.clone() for q in lm.parameters()]
        lm.zero_grad(set_to_none=True)
        # reference: every row alone, unpadded, with the body's own causal attention
        loss = 0.0
        for i, n in enumerate(lens):
            hi = body(input_ids=ids[i:i + 1, :n], use_cache=False).last_hidden_state[0]
            assert torch.allclose(h[i, :n], hi, atol=1e-5), (seed, i)
            loss = loss + (hi * w[i, :n]).sum()
        loss.backward()
        for q, g in zip(lm.parameters(), grads):
            assert (g - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-6
        lm.zero_grad(set_to_none=True)
        # a plausible wrong layout: the packed sequence under plain causal attention (a remainder also sees the
        # responses packed before it) is far from it
        wrong = body(input_ids=p.ids, position_ids=p.positions, use_cache=False).last_hidden_state
        wrong = wrong.flatten(0, 1)[p.index]
        assert not torch.allclose(wrong[attn.bool()], h[attn.bool()].detach(), atol=1e-3)


def test_shared_prefix_layout_only_where_it_saves():
    ids = torch.tensor([[5, 6, 7, 8], [9, 6, 7, 0], [5, 6, 1, 2]])  # no two neighbours share a first token
    assert M.shared_prefix_layout(ids, torch.ones_like(ids)) is None
    assert M.shared_prefix_layout(ids[:1], torch.ones_like(ids[:1])) is None  # one row
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])  # left padding: the plain forward
    assert M.shared_prefix_layout(torch.tensor([[5, 6, 7, 8]] * 3), attn) is None
    p = M.shared_prefix_layout(torch.tensor([[5, 6, 7, 8]] * 3), torch.ones(3, 4, dtype=torch.long))
    assert p.ids.tolist() == [[5, 6, 7, 8]] and p.index.tolist() == [[0, 1, 2, 3]] * 3  # identical rows: one run
