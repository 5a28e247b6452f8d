"""Checkpoints: sharded save/resume for exact continuation, stop on SIGTERM/SIGINT, a NaN-step guard,
and the HF export of the trained model (safetensors, loadable by transformers and vLLM).

Layout: run_dir/checkpoints/step_000123/ holds the torch.distributed.checkpoint (DCP) files of the model
and optimizer (FSDP2 DTensors, each rank writes its shards), one rank_00000.pt per rank (scheduler,
`extra`, every RNG state: python, numpy, torch CPU, CUDA) and meta.json, written last, listing every
file with its size. A save is written into step_000123.tmp/ and renamed by rank 0 once every rank has
finished, so a crash mid-save leaves the previous checkpoint the newest complete one.
DCP pickles its own metadata: resume only from checkpoints your runs wrote. The per-rank files are
read with torch.load(weights_only=True), meta.json is JSON.

    stop, guard = checkpoint.StopFlag(), checkpoint.BadStepGuard(5, out)  # after dist.setup
    start, ckpt = 0, checkpoint.latest(out)  # every rank (shared filesystem)
    if ckpt:
        st = checkpoint.resume(ckpt, policy, opt, sched); start, ref_shards = st["step"], st["extra"]["ref"]
    for step in range(start, total):
        ...; loss.backward(); gn = clip_grad_norm_(...).full_tensor().item()
        if guard.check(math.isfinite(gn)): opt.step(); sched.step()
        opt.zero_grad(set_to_none=True)
        stopping = stop.should_stop()
        if (step + 1) % save_every == 0 or step + 1 == total or stopping:
            checkpoint.save(out, step + 1, policy, opt, sched, extra={"ref": ref_shards})
        if stopping: break  # then skip export/eval, dist.cleanup(), exit 0
"""
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

META = "meta.json"
_NAME = re.compile(r"step_(\d+)")


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _max(x):
    """Max of a python number over ranks (the number itself without a process group)."""
    if not dist.is_initialized():
        return float(x)
    from common.dist import all_reduce
    return all_reduce(float(x), "max")


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


def _meta(path):
    """meta.json of a complete checkpoint folder (every listed file present with its size), else None."""
    try:
        meta = json.loads((path / META).read_text())
        named, files = _NAME.fullmatch(path.name), meta["files"]
        needed = {".metadata", *(f"rank_{r:05d}.pt" for r in range(int(meta["world"])))}
        ok = (not named or int(named.group(1)) == int(meta["step"])) and needed <= set(files) \
            and all((path / f).stat().st_size == size for f, size in files.items())
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _complete(root):
    """[(step, path)] of the complete checkpoints under root, oldest first."""
    named = [(int(m.group(1)), p) for p in Path(root).glob("step_*") if (m := _NAME.fullmatch(p.name))]
    return sorted((s, p) for s, p in named if p.is_dir() and _meta(p) is not None)


def latest(run_dir):
    """Newest complete checkpoint under run_dir/checkpoints (a Path), or None. Unfinished `.tmp`
    folders and folders with a missing/unreadable meta.json or a missing/truncated file are skipped."""
    found = _complete(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


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
    in place and restore this rank's RNG states. Returns {"step": int, "extra": this rank's extra}."""
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
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    if scheduler is not None:
        scheduler.load_state_dict(mine["scheduler"])
    _barrier()
    _set_rng_state(mine["rng"])  # last: nothing after this may draw random numbers
    return {"step": int(meta["step"]), "extra": mine["extra"]}


def save_or_stop(step, total, save_every, run_dir, model, optimizer, stop, guard, extra=None, keep_last=2,
                 export=None, name="trainer"):
    """The end of every training step (collective): checkpoint `step` every `save_every` steps (0: never
    on a schedule), at the last step and when a stop signal came, unless the last steps were non-finite
    (the checkpoint before them stays the newest). export = (tokenizer,) also writes an HF folder inside the
    checkpoint. Returns True when the run must stop now (a signal: the caller exits 0 after cleanup)."""
    stopping = stop.should_stop()
    if ((save_every and step % save_every == 0) or step == total or stopping) and not guard.consecutive:
        path = save(run_dir, step, model, optimizer, extra=extra, keep_last=keep_last)
        if export:
            export_hf(model, export[0], path / "hf", _rank_world()[0] == 0)
    if stopping and _rank_world()[0] == 0:
        print(f"[{name}] stopped by signal after step {step}; resume with --resume", flush=True)
    return stopping


class StopFlag:
    """The first SIGTERM/SIGINT sets a flag (the trainer finishes its step, saves and exits 0); a second
    SIGINT raises KeyboardInterrupt. `should_stop()` is collective (max over ranks), so every rank stops
    after the same step even when the signal reaches the ranks at different times. torchrun forwards
    SIGTERM/SIGINT to the workers and SIGKILLs them after --shutdown-timeout seconds (default 30)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum  # no printing here: a signal handler must not re-enter stdout

    def should_stop(self):
        stop = _max(self.signum is not None) > 0
        if stop and _rank_world()[0] == 0:
            print(f"[checkpoint] stop requested ({signal.Signals(self.signum).name if self.signum else 'other rank'}):"
                  f" saving and exiting", flush=True)
        return stop

    def restore(self):
        """Put the previous signal handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)


class BadStepGuard:
    """Skip optimizer steps whose loss/grad norm is not finite on any rank (all ranks agree) and stop the
    run after `max_bad_steps` consecutive ones. `check(finite)` is collective; True = take the step."""

    def __init__(self, max_bad_steps=5, run_dir=None):
        self.max_bad_steps, self.run_dir = max_bad_steps, run_dir
        self.consecutive = self.total = 0

    def check(self, finite):
        if _max(not bool(finite)) == 0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad_steps:
            last = latest(self.run_dir) if self.run_dir is not None else None
            raise RuntimeError(f"{self.consecutive} consecutive non-finite steps (loss/grad norm); last good "
                               f"checkpoint: {last or 'none'} ({self.total} non-finite steps in this run)")
        return False


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
