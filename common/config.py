"""Command-line arguments every trainer shares: the run, its data, held-out evaluation and checkpoints. Each
trainer's own `Args(RunArgs)` dataclass, at the top of its file, adds the algorithm's knobs (tyro reads the
comment after each field as its --help text; a trainer re-declares a field to change its default)."""
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.dist import print0


@dataclass
class RunArgs:
    model: str = "runs/gem_sft-gem/hf"   # start model: an HF folder (gem_sft.py writes runs/gem_sft-gem/hf), "tiny" or a hub id
    data: str = "builtin"                # "builtin", a .jsonl/.json/.parquet file, or a hub id name[:split]
    out_dir: str = ""                    # run folder (default runs/<trainer>)
    seed: int = 0                        # data order, sampling and every other random choice
    prompt_key: str = "question"         # data file field with the problem
    answer_key: str = "answer"           # data file field with the gold answer (GSM8K '#### N' and \boxed{} are reduced)
    skip_bad_rows: bool = False          # skip (and count) invalid rows instead of stopping
    eval_data: str = ""                  # held-out file (default: the last --eval-size rows of --data / the task's split)
    max_len: int = 512                   # prompt + response token limit (capped by the model's positions)
    train_size: int = 8000               # built-in task: training problems
    eval_size: int = 200                 # held-out problems
    difficulty: int = 2                  # built-in task: operations per problem
    max_num: int = 5                     # built-in task: operands are 1..max_num
    micro_batch_size: int = 64           # sequences per forward/backward on one rank (memory, not math)
    eval_k: int = 4                      # samples per held-out prompt (pass@1 and pass@k; 0 = no evaluation)
    eval_temperature: float = 1.0        # held-out sampling temperature
    rollout: Literal["vllm", "hf"] = "vllm"  # generation backend (hf: plain transformers, slower)
    gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory (colocated with the trainer)
    vocab_parallel: bool = True          # 2+ ranks, tied embedding: each rank keeps its vocabulary rows, never gathered (memory; same math)
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # vLLM's weights and KV cache (auto: bf16 on GPU, fp32 on CPU)
    train_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # trainer: bfloat16 = bf16 matmuls, fp32 master weights/optimizer/reductions (auto: bf16 on GPU, fp32 on CPU)
    track: Literal["none", "wandb", "tensorboard"] = "none"  # extra metrics sink besides metrics.jsonl
    trust_remote_code: bool = False      # allow model code from the hub (off: safer)
    save_every: int = 50                 # sharded checkpoint every N steps, at the end and on SIGTERM (0: only those)
    keep_last: int = 2                   # complete checkpoints kept (0 = all)
    export_every_save: bool = False      # also write an HF folder (safetensors) into every checkpoint
    resume: bool = False                 # continue from the latest complete checkpoint in the run folder (error if none)
    resume_override: bool = False        # with --resume: apply changed flags that alter the math or data order
    overwrite: bool = False              # replace the run in --out-dir (deletes its checkpoints; logs go to previous-*/)
    max_bad_steps: int = 5               # stop after this many consecutive non-finite steps
    inject_nan: tuple[int, ...] = ()     # fault injection (tests): steps whose loss is made NaN

    def __post_init__(self):
        """Checks that need no model or data, made as the command line is parsed: before any process group,
        model or engine starts, so a bad flag costs a second and prints one line (rank 0), exit code 2."""
        if self.track != "none" and importlib.util.find_spec(self.track) is None:
            _usage_error(f"--track {self.track} needs the optional {self.track} package: pip install {self.track}")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it before the script starts
        for flag in ("prompts_per_step", "batch_size"):  # every rank takes an equal share of the global batch
            if getattr(self, flag, world) % world:
                _usage_error(f"--{flag.replace('_', '-')} {getattr(self, flag)} is not divisible by the {world} ranks")
        if getattr(self, "max_new_tokens", 1) < 1:
            _usage_error(f"--max-new-tokens {self.max_new_tokens}: a response needs at least 1 token")
        rows = getattr(self, "prompts_per_step", 0) // world * getattr(self, "n_samples", 0)  # responses per rank
        if rows and getattr(self, "mini_batches", 1) > rows:  # an empty mini-batch would crash in the forward
            _usage_error(f"--mini-batches {self.mini_batches}: each rank has only {rows} responses per step "
                         f"(--prompts-per-step {self.prompts_per_step} / {world} ranks x --n-samples {self.n_samples})")
        if getattr(self, "tis_cap", 0) < 0:
            _usage_error(f"--tis-cap {self.tis_cap}: the cap C of the weights min(pi_old / pi_engine, C) must be > 0 "
                         f"(0 turns the correction off)")
        if getattr(self, "n_samples", 1) < getattr(self, "min_samples", 1):
            _usage_error(f"--n-samples {self.n_samples}: this algorithm needs groups of at least {self.min_samples} "
                         f"responses (one response has no group variance: every advantage would be 0)")

    @staticmethod
    def flag_error(message):
        """A bad flag found while the command line is parsed, here or in a trainer's own __post_init__ (DAPO's): one
        `error:` line (rank 0) and exit code 2. (An exception would reach tyro, which draws a box around it.)"""
        _usage_error(message)


def cli(cls, argv=None):
    """tyro.cli(cls), plus `--config RUN/args.json`: a run's saved arguments become the defaults and the flags on
    the command line override them, so `torchrun ... grpo.py --config runs/grpo/args.json --seed 1` replays a run
    with one change. Keys starting with "_" (provenance: world size, git commit, versions) are not arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if at is None:
        return _tyro_cli(cls, args=argv)
    path = argv[at].partition("=")[2] or (argv[at + 1] if at + 1 < len(argv) else "")
    del argv[at:at + (1 if "=" in argv[at] else 2)]
    try:
        saved = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError) as e:
        _usage_error(f"--config {path!r}: {e}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(saved) - set(names)):
        _usage_error(f"--config {path}: {', '.join(unknown)} are not arguments of {cls.__module__}.py")
    default = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    return _tyro_cli(cls, args=argv, default=default)


def _tyro_cli(cls, **kw):
    """tyro.cli, with a bad flag or value as one `error:` line (tyro draws a box of 5-12 lines on stderr): the box's
    first paragraph, e.g. "error: Unrecognized options: --nope (grpo.py --help lists the flags)". --help is untouched
    (stdout)."""
    import io
    import tyro
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            return tyro.cli(cls, **kw)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(box.getvalue())
            raise
        _usage_error(f"{_box_message(box.getvalue())} ({Path(sys.argv[0]).name} --help lists the flags)")


def _box_message(text):
    """The first paragraph of a tyro error box (its title line and border dropped), as one line."""
    body = []
    for line in text.splitlines()[1:]:
        x = line.strip().strip("│╭╮╰╯").strip()
        if set(x) <= set("─ ") or x.startswith("For full helptext"):  # a rule: the first paragraph ends
            if body:
                break
            continue
        body.append(x)
    return " ".join(body) or " ".join(text.split()) or "bad command line"


class InputError(ValueError):
    """A known bad input found while the run works (data, lengths, a checkpoint that does not fit the flags): the
    trainers print it as one `error:` line and exit with code 2 on every rank (`one_line_errors`), like the flag
    checks above, instead of a traceback per rank. every_rank=False: only some ranks meet it (e.g. a prompt in
    this rank's share of a batch), so the rank that meets it prints it, whichever it is."""

    def __init__(self, message, every_rank=True):
        super().__init__(message)
        self.every_rank = every_rank


@contextlib.contextmanager
def one_line_errors():
    """Around a trainer's main(): an InputError becomes one `error:` line (rank 0) and exit code 2 on every rank.
    Each rank meets the same input, so each stops on its own; no collective is needed (nor safe: the other rank
    may be inside one)."""
    try:
        yield
    except InputError as e:
        if not e.every_rank:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        _usage_error(str(e))


def _usage_error(message):
    """The `error:` line (rank 0 prints it) and exit code 2 on every rank. The first rank to exit makes torchrun stop
    the others, so the other ranks give rank 0 a moment to print first (a bad flag at 2 ranks once ended with no
    line at all: rank 1 exited, torchrun stopped rank 0 before it printed)."""
    if int(os.environ.get("RANK", "0")):
        import time
        time.sleep(5)
    print0(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)

