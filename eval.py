"""Evaluate a model: k samples per prompt -> unbiased pass@k, maj@k, distinct answers, response length.

    python eval.py --model runs/grpo/hf                                   # built-in held-out split
    python eval.py --model runs/grpo/hf --temperature 1.0 0.7 0 --k 64 --ks 1 4 16 64  # T = 0: greedy
    python eval.py --model runs/grpo/hf --data ../shared/data/gsm8k_test.jsonl --limit 200 --k 8
    torchrun --nproc_per_node 8 eval.py --model Qwen/Qwen2.5-Math-1.5B --data math500_test.jsonl \
        --max-new-tokens 3072
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from common import config, data, dist
from common.evaluate import evaluate
from common.model import check_model, resolve
from common.rollout import Engine, context_limit


@dataclass
class Args:
    model: str = "tiny"                  # HF folder or hub id
    data: str = "builtin"                # "builtin" (held-out split), .jsonl/.parquet, or hub id
    limit: int = 0                       # evaluate only the first `limit` usable rows (0 = all; only they are checked)
    k: int = 8                           # samples per prompt
    ks: tuple[int, ...] = (1, 2, 4, 8)   # report pass@k for these k <= k
    temperature: tuple[float, ...] = (1.0,)  # one or several sampling temperatures; 0 = greedy (one sample)
    max_new_tokens: int = 64             # the built-in task's defaults equal the trainers' (their logged eval)
    seed: int = 0                        # sampling seed (each sample has its own, derived from it)
    prompt_key: str = "question"         # data file field with the problem
    answer_key: str = "answer"           # data file field with the gold answer
    skip_bad_rows: bool = False          # skip (and count) invalid rows instead of stopping
    max_len: int = 4096                  # prompt + response; capped by the model's max_position_embeddings
    eval_size: int = 200                 # built-in held-out split size
    difficulty: int = 2                  # built-in task: operations per problem (the trainers' default)
    max_num: int = 5                     # built-in task: operands are 1..max_num (the trainers' default)
    rollout: Literal["vllm", "hf"] = "vllm"  # generation backend
    out: str = ""                        # JSON summary (default: <model>/eval_<data>.json or runs/eval.json)
    samples: int = 3                     # prompts whose responses are printed / saved
    trust_remote_code: bool = False      # allow model code from the hub (off: safer)


def main(args: Args):
    d = dist.setup(args.seed)
    model = resolve(args.model)
    tok = check_model(model, args.model, args.trust_remote_code)  # the tokenizer vLLM loads from the same folder
    if args.data == "builtin":
        rows = data.builtin_split(0, args.eval_size, args.difficulty, args.max_num)[1]
    else:  # validate the rows before the engine starts, against the context the engine will accept
        try:
            rows, skipped = data.load_rows(args.data, args.prompt_key, args.answer_key, tokenizer=tok,
                                           skip_bad_rows=args.skip_bad_rows, limit=args.limit,
                                           **data.limit_kwargs(args.max_len, context_limit(model, args.max_len,
                                                                                          args.trust_remote_code)))
        except ValueError as e:  # a bad row or file
            raise config.InputError(str(e)) from None
        if skipped:
            dist.print0(f"[eval] skipped {skipped} bad rows")
    rows = rows[:args.limit] if args.limit else rows
    engine = Engine(model, args.rollout, seed=args.seed, max_model_len=args.max_len,
                    trust_remote_code=args.trust_remote_code)
    tok = engine.tok
    by_t, samples = [], None
    for temp in args.temperature:  # one engine, several temperatures: the like-with-like comparison in one call
        k, t0 = (1 if temp == 0 else args.k), time.time()  # greedy: every sample would be the same
        res, smp = evaluate(engine, rows, tok, k=k, temperature=temp, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, ks=[x for x in args.ks if x <= k], rank=d.rank, world=d.world,
                            return_samples=True)
        by_t.append({"temperature": temp, "k": k, "seconds": round(time.time() - t0, 1), **res})
        samples = samples or smp
    res = {"model": args.model, "data": args.data, "n_prompts": len(rows), **by_t[0]}
    if d.main:
        width = max(len(k) for k in res)
        print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                        for k, v in res.items()))
        if len(by_t) > 1:  # one row per temperature
            cols = [c for c in by_t[0] if c not in ("temperature", "k", "seconds")]
            print("\n| T | k | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2))
            print("\n".join(f"| {r['temperature']:g} | {r['k']} | " + " | ".join(
                f"{r[c]:.3f}" if c in r else "–" for c in cols) + " |" for r in by_t))
        for s in samples[:args.samples]:
            print(f"\n### {s['question'][:200]!r} gold={s['gold']!r}\n" +
                  "\n".join(f"  [{r:.0f}] {t[:200]!r}" for t, r in zip(s["responses"], s["rewards"])))
        model_dir = Path(model)
        out = Path(args.out) if args.out else \
            model_dir / f"eval_{Path(args.data).stem}.json" if model_dir.is_dir() else Path("runs/eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**res, "by_temperature": by_t, "args": asdict(args), "samples": samples[:args.samples]},
                                  indent=1))
        print(f"\n[eval] wrote {out}")
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    with config.one_line_errors():  # a missing model, bad rows: one `error:` line, exit code 2
        main(config.cli(Args))
    dist.exit_cleanly()
