"""Held-out evaluation: k samples per prompt -> unbiased pass@k, maj@k, distinct final answers,
response length. Each rank evaluates its slice of the prompts with its own engine; the sums are
all-reduced, so every rank returns the same global figures."""
from collections import Counter
from math import comb

from common import dist, rewards
from common.data import format_prompt


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), for c correct out of n samples."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples, got n={n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers, correct):
    """Majority vote over the k extracted answers (None = no answer, never voted for). Ties go to the
    answer seen first, so the result is deterministic. Returns 1.0 if the voted answer is correct."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return float(correct[answers.index(winner)])


def evaluate(engine, rows, tokenizer, k=8, temperature=1.0, max_new_tokens=256, seed=0, ks=None,
             rank=0, world=1, return_samples=False):
    """Global pass@{1..k}, maj@k, distinct answers per prompt, mean length over `rows`."""
    ks = sorted({1, k} | set(ks or [])) if k > 1 else [1]
    mine = rows[rank::world]
    prompts = [format_prompt(tokenizer, r["question"]) for r in mine]
    # every rank calls it, with no rows too: one engine may generate for all ranks (rollout.Engine.generate)
    groups = engine.generate(prompts, n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    texts = [s.text for g in groups for s in g]
    golds = [r["answer"] for r in mine for _ in range(k)]
    scores, stats = rewards.score_batch(texts, golds) if texts else ([], {"timeouts": 0, "errors": 0})
    sums = {f"pass@{kk}": 0.0 for kk in ks} | {f"maj@{k}": 0.0, "distinct_answers": 0.0, "response_len": 0.0,
                                              "truncated": 0.0, "reward_failures": stats["timeouts"] + stats["errors"]}
    samples = []
    for gi, (r, g) in enumerate(zip(mine, groups)):
        correct = scores[gi * k:(gi + 1) * k]
        answers = [_norm(rewards.extract_answer(s.text)) for s in g]
        for kk in ks:
            sums[f"pass@{kk}"] += pass_at_k(k, int(sum(correct)), kk)
        sums[f"maj@{k}"] += maj_at_k(answers, correct)
        sums["distinct_answers"] += len({a for a in answers if a is not None})
        sums["response_len"] += sum(len(s.response_ids) for s in g) / k
        sums["truncated"] += sum(s.finish == "length" for s in g) / k
        samples.append({"question": r["question"], "gold": r["answer"], "responses": [s.text for s in g],
                        "rewards": correct})
    n_prompts = len(mine)
    counts = {key: n_prompts for key in sums} | {"reward_failures": float(rank == 0)}  # failures: a global count
    out = dist.mean_metrics(sums, counts) if world > 1 else {key: sums[key] / counts[key] if counts[key] else float("nan") for key in sums}
    return (out, samples) if return_samples else out


def _norm(a):
    return None if a is None else a.replace(" ", "")
