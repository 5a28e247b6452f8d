"""torchrun helper for tests/test_rollout.py: every rank trains an FSDP2 model one step, pushes the new
weights into its own colocated vLLM engine and writes what it saw to OUT_DIR/rank{r}.json. The engines are pooled
(the tiny model, CPU, both ranks on this machine): rank 0's decodes for both; each rank's own engine is checked
through every_rank=False calls.

    torchrun --standalone --nproc_per_node 2 tests/_rollout_worker.py MODEL_DIR OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import dist  # noqa: E402
from common import model as M  # noqa: E402
from common.kernels import token_logprobs  # noqa: E402
from common.rollout import Engine  # noqa: E402

T = 0.8  # sampling temperature: the trainer's log-probs are tempered the same way


def main(model_dir, out_dir):
    d = dist.setup(seed=0)
    lm, tok = M.load(model_dir)
    policy = dist.wrap_fsdp(M.WithHead(lm), M.decoder_layers(lm), d.device)
    engine = Engine(model_dir, seed=0, max_model_len=128)
    prompts = [f"{d.rank}:12+34=", f"{d.rank}:hello"]

    def gen(seed, every_rank=True):
        return [s for g in engine.generate(prompts, n=2, temperature=T, max_new_tokens=12, seed=seed,
                                           every_rank=every_rank) for s in g]

    def trainer_logprobs(samples):  # one sequence per forward: every rank runs the same number
        out = []
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            tgt = torch.full_like(ids, -100)
            tgt[0, len(s.prompt_ids) - 1:-1] = ids[0, len(s.prompt_ids):]
            with torch.no_grad():  # the trainers' head (its weight may be this rank's vocabulary rows)
                out += policy(ids, torch.ones_like(ids), M.logprob_head(tgt, T, with_entropy=False))[0][tgt != -100].tolist()
        dist.reshard(policy)
        return out

    seed = 7 + 100 * d.rank  # per-rank streams, as the trainer does
    pre = gen(seed)
    engine.sleep()  # as in the trainer loop (GPU: releases KV cache and weights; sync wakes them)
    # one large optimizer step on rank-specific data (FSDP averages the gradients)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    ids = torch.tensor([tok(f"{d.rank}:1+1=2;2+2=4").input_ids + [tok.eos_token_id]])
    ce = lambda h, w: -token_logprobs(h[0, :-1], w, ids[0, 1:])[0].mean()  # cross-entropy
    policy(ids, torch.ones_like(ids), ce).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    engine.sync(dist.full_state_items(policy))

    post, again, other, alone = gen(seed), gen(seed), gen(seed + 1), gen(seed, every_rank=False)
    eng_post = [x for s in post for x in s.logprobs]
    eng_pre = [x for s in pre for x in s.logprobs]
    tr_post, tr_pre, tr_alone = trainer_logprobs(post), trainer_logprobs(pre), trainer_logprobs(alone)
    mad = lambda a, b: (torch.tensor(a) - torch.tensor(b)).abs().mean().item()
    res = {"rank": d.rank, "pooled": engine.pooled, "gap_after_sync": mad(eng_post, tr_post),
           "step_change": mad(eng_pre, tr_pre),
           "alone_gap_after_sync": mad([x for s in alone for x in s.logprobs], tr_alone),  # this rank's own engine
           "alone_equals_pooled": [s.response_ids for s in alone] == [s.response_ids for s in post],
           "same_seed_equal": [s.response_ids for s in post] == [s.response_ids for s in again],
           "other_seed_differs": [s.response_ids for s in post] != [s.response_ids for s in other],
           "tokens": [s.response_ids for s in post], "tied": engine.tied}
    Path(out_dir, f"rank{d.rank}.json").write_text(json.dumps(res))
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:3])
