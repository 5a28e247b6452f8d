"""torchrun for the tests' multi-rank workers (tests/_*_worker.py)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(worker, *args, nproc=2, env=None, timeout=600):
    """Run tests/<worker> on `nproc` ranks to completion, assert it succeeded and return its stdout. On a time-out
    SIGKILL torchrun and every worker (each sits in a session of its own, so torchrun's process group alone would
    leave them running). env: extra environment variables."""
    import psutil
    p = subprocess.Popen([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                          str(nproc), str(ROOT / "tests" / worker), *map(str, args)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for q in [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True):
            q.send_signal(signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, out[-3000:] + err[-4000:]
    return out
