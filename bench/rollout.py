"""Generation throughput of the rollout backends: vLLM vs the transformers fallback (batched, and one
sequence at a time), on the built-in tiny model and a ~30M-parameter Qwen2 (random weights: throughput
only). Every sample generates exactly --tokens tokens (ignore_eos), so tokens/s compare like for like.

    python bench/rollout.py [--prompts 32] [--tokens 64] [--threads 1] [--repeat 2]

The machine may be shared: each figure is the best of --repeat timed calls, and tokens per CPU-second
(process time, one thread by default so no OpenMP spinning inflates it) is printed next to wall-clock
tokens/s as the figure that other jobs disturb least.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from common.model import build_tiny, count_params, load  # noqa: E402
from common.rollout import Engine  # noqa: E402

MODELS = {"tiny (built-in)": {}, "qwen2-30M": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048)}


def prompts(k):
    return [f"Question {i}: what is {17 * i + 3} + {29 * i + 11}? Think step by step." for i in range(k)]


def run(engine, k, tokens, repeat):
    """A warm-up call (vLLM's first generate is slow), then the best of `repeat` timed calls:
    (wall tokens/s, tokens per CPU-second, wall seconds)."""
    engine.generate(prompts(2), n=1, max_new_tokens=4, ignore_eos=True)
    best = (0, 0, 0)
    for r in range(repeat):
        cpu = time.process_time()
        out = engine.generate(prompts(k), n=1, temperature=1.0, max_new_tokens=tokens, seed=r, ignore_eos=True)
        cpu = time.process_time() - cpu
        assert all(len(s.response_ids) == tokens for g in out for s in g)
        best = max(best, (engine.last_tokens_per_s, engine.last_gen_tokens / cpu, engine.last_gen_seconds))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per call (vLLM and batched hf)")
    ap.add_argument("--seq-prompts", type=int, default=2, help="prompts for hf one-at-a-time (slow)")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per figure (the best is kept)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in MODELS.items():
            path = str(build_tiny(Path(tmp) / name.split()[0], seed=0, **cfg))
            n_params = count_params(load(path)[0])
            eng = Engine(path, "vllm", seed=0, max_model_len=256)
            v = run(eng, args.prompts, args.tokens, args.repeat)
            eng.shutdown()
            hf = run(Engine(path, "hf", max_model_len=256, hf_batch_size=args.prompts), args.prompts, args.tokens,
                     args.repeat)
            seq = run(Engine(path, "hf", max_model_len=256, hf_batch_size=1), args.seq_prompts, args.tokens, 1)
            rows += [(name, n_params, "vllm", args.prompts, v, v), (name, n_params, "hf batched", args.prompts, hf, v),
                     (name, n_params, "hf 1-at-a-time", args.seq_prompts, seq, v)]
    print(f"\n{args.tokens} tokens per prompt (ignore_eos), fp32, {torch.get_num_threads()} thread(s), best of "
          f"{args.repeat} timed calls after a warm-up (hf 1-at-a-time: {args.seq_prompts} prompts, one call). "
          f"tokens/s is the compared figure.\n")
    print(f"{'model':16s} {'params':>7s}  {'backend':15s} {'prompts':>7s} {'seconds':>8s} {'tokens/s':>9s} "
          f"{'tok/CPU-s':>9s} {'vLLM/this (wall, CPU)':>22s}")
    for name, n, backend, k, (tps, cps, sec), (vtps, vcps, _) in rows:
        print(f"{name:16s} {n / 1e6:6.1f}M  {backend:15s} {k:7d} {sec:8.2f} {tps:9.0f} {cps:9.0f} "
              f"{vtps / tps:12.1f}x {vcps / cps:7.1f}x")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\ntotal {time.time() - t0:.0f} s")
