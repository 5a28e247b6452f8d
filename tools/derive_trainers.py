"""Maintainer tool: write remax.py, raftpp.py and reinforce_rej.py from grpo.py, replacing only the
algorithm lines, so `diff grpo.py <trainer>.py` is exactly the papers' difference. Run after any edit
of grpo.py's shared parts:  python tools/derive_trainers.py"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRPO = (ROOT / "grpo.py").read_text()


def part(a, b):
    """The text of grpo.py from marker a up to (not including) marker b."""
    i = GRPO.index(a)
    return GRPO[i:GRPO.index(b, i)]


DOC = part('"""GRPO', "import json")
ADV_FN = part("def group_advantages", "def main")
FLAGS = part("    no_std_norm: bool", "    seed: int")
ALGO = part("        # 4. advantages: THE ALGORITHM\n", "        # 5. ")
GEN = part("        groups = engine.generate(", "        t[\"score\"]")


def derive(name, doc, adv_fn, flags, algo, gen=None, extra=()):
    s = GRPO
    for old, new in [(DOC, doc), (ADV_FN, adv_fn), (FLAGS, flags), (ALGO, algo), *([(GEN, gen)] if gen else []),
                     ('"runs/grpo"', f'"runs/{name}"'), ("# default runs/grpo", f"# default runs/{name}"),
                     ("[grpo]", f"[{name}]"), *extra]:
        assert old in s, (name, old[:60])
        s = s.replace(old, new)
    (ROOT / f"{name}.py").write_text(s)


derive("remax",
       '''"""ReMax (Li et al. 2023): REINFORCE with the greedy response's reward as the baseline; no critic.

    torchrun --nproc_per_node 2 remax.py --model runs/gem_sft-gem/hf            # built-in task, CPU
    torchrun --nproc_per_node 8 remax.py --model Qwen/Qwen2.5-Math-1.5B --data gsm8k_train.jsonl ...

For each prompt, n sampled responses and one greedy response come from the same vLLM call. The
baseline is b(x) = r(x, greedy); every token of sampled response i gets A_i = r_i - b(x), with no
whitening. The greedy responses are not trained on: one extra short generation per prompt is the
whole overhead over plain REINFORCE. `--loss-agg seq-mean-token-sum` with one mini-batch is the paper's
estimator; the default is verl's clipped token-mean variant.
"""
''',
       '''def remax_advantages(r, r_greedy):
    """r [P, n], r_greedy [P, 1] -> A [P, n] = r - r(greedy): the greedy reward is the baseline."""
    return r - r_greedy


''',
       "",
       '''        # 4. advantages: THE ALGORITHM
        adv = remax_advantages(r, r_greedy).flatten()
        keep = torch.ones(len(ids), dtype=torch.bool)
''',
       GEN.replace("n=args.n_samples,\n", "n=args.n_samples, greedy=True,\n")
          .replace('''        samples = [s for g in groups for s in g]
        scores, rstats = rewards.score_batch([s.text for s in samples], [r["answer"] for r in batch for _ in range(args.n_samples)])
        r = torch.tensor(scores, dtype=torch.float32).view(P, args.n_samples)
''', '''        scores, rstats = rewards.score_batch([s.text for g in groups for s in g],
                                             [r["answer"] for r in batch for _ in range(args.n_samples + 1)])
        r, r_greedy = torch.tensor(scores, dtype=torch.float32).view(P, args.n_samples + 1).split([args.n_samples, 1], 1)
        samples = [s for g in groups for s in g[:-1]]  # the greedy responses are scored, never trained on
        scores = r.flatten().tolist()
'''))

derive("raftpp",
       '''"""RAFT++ (Xiong et al. 2025): rejection sampling fine-tuning on the group's best responses, with
importance sampling and clipping.

    torchrun --nproc_per_node 2 raftpp.py --model runs/gem_sft-gem/hf           # built-in task, CPU
    torchrun --nproc_per_node 8 raftpp.py --model Qwen/Qwen2.5-Math-1.5B --data gsm8k_train.jsonl ...

For each prompt, n responses; only those with the group's maximal reward, when that reward is a
success (> 0), are kept with A = 1; all others get A = 0 and are dropped from the update (they carry
no policy gradient; `--keep-rejected` keeps them in the token-mean denominator like the authors'
release). The loss on the kept responses is -min(s A, clip(s, 1-eps, 1+eps) A); `--no-clip` is plain
RAFT (SFT on self-generated positives).
"""
''',
       '''def raft_advantages(r):
    """r [P, n] -> A [P, n]: 1 for the responses with the group's best reward when it is a success, else 0."""
    best = (r == r.max(1, keepdim=True).values) & (r > 0)
    return best.float()


''',
       '''    no_clip: bool = False                # plain RAFT: no importance-sampling clip
    keep_rejected: bool = False          # keep A = 0 responses in the loss denominator (authors' release)
''',
       '''        # 4. advantages: THE ALGORITHM
        adv = raft_advantages(r).flatten()
        keep = (adv > 0) | args.keep_rejected  # rejected responses carry no gradient: drop them
''',
       extra=[("args.clip_eps_high, args.dual_clip)", "args.clip_eps_high, args.dual_clip, not args.no_clip)")])

derive("reinforce_rej",
       '''"""Reinforce-rej (Xiong et al. 2025): REINFORCE on the ±1 reward, with the prompts whose responses are
all correct or all wrong rejected.

    torchrun --nproc_per_node 2 reinforce_rej.py --model runs/gem_sft-gem/hf    # built-in task, CPU
    torchrun --nproc_per_node 8 reinforce_rej.py --model Qwen/Qwen2.5-Math-1.5B --data gsm8k_train.jsonl ...

For each prompt, n responses. Every prompt whose group has zero reward variance is dropped; for the
others A_i = r_i on the ±1 scale (correct +1, wrong -1; `--reward-scale 01` is the authors' release,
where wrong responses get A = 0). No mean subtraction, no std normalisation. Clipped loss, token-mean
over the kept tokens, dual-clip c = 3 for A < 0.
"""
''',
       '''def reject_advantages(r, scale="pm1"):
    """r [P, n] 0/1 -> (A [P, n], keep [P, n]): A = r on the ±1 (or 0/1) scale, only for mixed groups."""
    keep = (r.std(1, keepdim=True) > 0).expand_as(r)
    return (2 * r - 1 if scale == "pm1" else r), keep


''',
       '''    reward_scale: Literal["pm1", "01"] = "pm1"  # correct +1 / wrong -1, or the release's 1 / 0
''',
       '''        # 4. advantages: THE ALGORITHM
        adv, keep = reject_advantages(r, args.reward_scale)
        adv, keep = adv.flatten(), keep.flatten()
''',
       extra=[("    dual_clip: float = 0.0               # c > 1", "    dual_clip: float = 3.0               # c > 1")])
print("derived remax.py raftpp.py reinforce_rej.py from grpo.py")
