"""Throughput of common.rewards.score_batch on real data: python bench/rewards.py [--workers N]"""
import argparse
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import rewards as R  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def load(name):
    return [json.loads(line) for line in open(DATA / name)]


def timed(name, resps, golds, workers):
    # fresh, warmed-up workers for every measurement: math-verify caches parses, so reusing workers
    # across runs of the same answers would flatter the pool
    R._shutdown()
    R.score_batch([r"\boxed{\sqrt{2}}"], [r"\frac{2}{\sqrt{2}}"], workers=workers)
    sent = sum(R._prepare(r, g)[0] is None for r, g in zip(resps, golds))  # items that need math-verify
    t = time.perf_counter()
    rewards, st = R.score_batch(resps, golds, workers=workers)
    dt = time.perf_counter() - t
    print(f"{name:32s} n={len(resps):5d}  to_workers={sent:4d}  mean_reward={sum(rewards) / len(rewards):.3f}  "
          f"{dt:6.2f}s  {len(resps) / dt:8.0f} resp/s  {st}")
    return resps, golds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    workers = args.workers or min(2, os.cpu_count())
    rng = random.Random(0)
    print(f"cpus={os.cpu_count()} workers={workers}")

    t = time.perf_counter()
    R.score_batch([r"\boxed{\sqrt{2}}"], [r"\frac{2}{\sqrt{2}}"], workers=workers)
    print(f"pool start-up (first call in a process): {time.perf_counter() - t:.2f}s")

    # GSM8K: reference solutions with the answer boxed; half of them get a wrong number
    gsm = load("gsm8k_train.jsonl")[:2000]
    golds = [r["answer"].split("####")[-1].strip() for r in gsm]
    resps = []
    for r, g in zip(gsm, golds):
        n = int(g.replace(",", "")) + (rng.choice([-2, -1, 1, 10]) if rng.random() < 0.5 else 0)
        resps.append(re.sub(r"####.*$", lambda m: f"The final answer is $\\boxed{{{n}}}$.", r["answer"]))
    gsm_mix = timed("gsm8k 2000 (half wrong)", resps, golds, workers)

    # MATH-500: solutions vs their own final answer (all correct), vs the next row's (almost all wrong,
    # and mostly need sympy), and a half/half mix
    rows = load("math500_test.jsonl")
    sols, finals = zip(*(r["answer"].rsplit("The answer is:", 1) for r in rows))
    sols, finals = list(sols), [f.strip() for f in finals]
    timed("math500 correct", sols, finals, workers)
    wrong = finals[1:] + finals[:1]
    timed("math500 wrong (math-verify path)", sols, wrong, workers)
    mix = [f if rng.random() < 0.5 else w for f, w in zip(finals, wrong)]
    math_mix = timed("math500 half wrong", sols, mix, workers)

    timed("mix: both of the above", gsm_mix[0] + math_mix[0], gsm_mix[1] + math_mix[1], workers)

    # reference: the same math-verify work serially in this process (no pool, no hard timeout)
    jobs = [R._prepare(r, g) for r, g in zip(sols, wrong)]
    jobs = [(p, g) for d, p, g in jobs if d is None]
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    R._mv_equal(r"(1, \frac{\pi}{2})", "x - 1")  # same warm-up the workers do
    t = time.perf_counter()
    for p, g in jobs:
        R._mv_equal(p, g, None)
    dt = time.perf_counter() - t
    print(f"{'serial math-verify, 1 process':32s} n={len(jobs):5d}  {dt:6.2f}s  {len(jobs) / dt:8.0f} items/s")


if __name__ == "__main__":
    main()
