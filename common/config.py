"""Command-line arguments every trainer shares: the run, its data, held-out evaluation and checkpoints. Each
trainer's own `Args(RunArgs)` dataclass, at the top of its file, adds the algorithm's knobs (tyro reads the
comment after each field as its --help text; a trainer re-declares a field to change its default)."""
from dataclasses import dataclass
from typing import Literal


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
