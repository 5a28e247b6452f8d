"""The guards a training step runs under: a stop on SIGTERM/SIGINT that every rank takes after the same step, the
skip of a non-finite optimizer step (and a stop after several in a row), and the NaN injection that tests them.
Each decision is collective (a max over ranks), so every rank takes the same one. checkpoint.save_or_stop ends every
step with them."""
import math
import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

from common.checkpoint import latest
from common.dist import all_reduce


def _max(x):
    """Max of a python number over ranks (the number itself without a process group)."""
    return all_reduce(float(x), "max") if dist.is_initialized() else float(x)


def _main():
    return not dist.is_initialized() or dist.get_rank() == 0


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
        if stop and _main():
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


@contextmanager
def nan_outputs(model, active=True):
    """Fault injection (--inject-nan, tests): inside the block every floating-point output of model's forward is
    NaN, so the loss and the gradients built from it are NaN for real, and BadStepGuard must skip the step. A
    forward hook, so the training code a reader studies carries no test plumbing. active=False: does nothing."""
    if not active:
        yield
        return
    nan = lambda o: o * math.nan if torch.is_tensor(o) and o.is_floating_point() else o
    handle = model.register_forward_hook(lambda m, i, out: tuple(map(nan, out)) if isinstance(out, tuple) else nan(out))
    try:
        yield
    finally:
        handle.remove()
