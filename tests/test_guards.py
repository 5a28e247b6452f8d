"""common/guards.py: the non-finite step guard, the stop flag on SIGTERM/SIGINT and the NaN injection (--inject-nan)
in one process. Across 2 ranks (a NaN on one rank, SIGTERM mid-run): tests/test_checkpoint.py."""
import math
import os
import signal
import time

import pytest
import torch

from common import guards


def test_bad_step_guard(tmp_path):
    guard = guards.BadStepGuard(3, tmp_path)
    assert guard.check(True) and not guard.check(torch.tensor(False)) and guard.check(math.isfinite(1.0))
    assert not guard.check(False) and not guard.check(False)
    assert (guard.consecutive, guard.total) == (2, 3)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps .loss/grad norm.; last good checkpoint: none"):
        guard.check(False)


def test_stop_flag_signals():
    stop = guards.StopFlag()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.restore()


def test_nan_outputs_makes_a_real_nan_step_the_guard_skips():
    """--inject-nan: inside guards.nan_outputs the model's outputs are NaN (tuples too), so the loss and the
    gradients are NaN for real and the guard skips the step; outside it, and with active=False, nothing changes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with guards.nan_outputs(model, active=False):
        assert torch.isfinite(model(x)).all()
    with guards.nan_outputs(model):
        loss = model(x).sum()
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert not math.isfinite(gn.item()) and not guards.BadStepGuard(3).check(math.isfinite(gn.item()))
    assert torch.isfinite(model(x)).all()  # the hook is gone
    pair = torch.nn.Module()
    pair.forward = lambda x: (x * 2, x.long(), "text")
    with guards.nan_outputs(pair):
        a, ids, text = pair(torch.ones(2))  # the module's __call__ runs the hook
    assert torch.isnan(a).all() and ids.dtype == torch.long and text == "text"
