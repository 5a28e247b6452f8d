"""Rule-based answer verification for math RL (GSM8K / MATH / \\boxed{N} arithmetic).

extract_answer -> cheap normalisation + exact-number fast path -> math-verify (sympy) for the rest.
sympy can hang on adversarial answers, and math-verify's own timeout uses SIGALRM (main thread only,
elsewhere it raises and every item silently scores 0). So score_batch runs math-verify in a persistent
pool of worker processes with signals disabled, and enforces a hard per-item limit from the parent by
killing and respawning the worker. Nothing here evals model output.
"""
import atexit
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import deque
from fractions import Fraction
from multiprocessing.connection import wait

_GROUP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}  # those torchrun passes on
MAX_SCAN = 100_000      # only the tail of a longer response is scanned (answers come last)
MAX_ANSWER = 1_000      # longer extracted answers are junk, and sympy on them is slow
MAX_EXPONENT = 10_000   # 9^{100000} is a real number sympy will happily try to expand

# ---------------------------------------------------------------- extraction (all linear-time)

# a box opener (also after a stray extra backslash, as in JSON-escaped output), \\ or \{ \} (literals), a brace
_BOX_TOKENS = re.compile(r"\\{1,2}(?:boxed|fbox)\s*\{|\\\\|\\[{}]|[{}]")

def _last_box(text: str) -> str | None:
    """Content of the last-opened complete \\boxed{..}/\\fbox{..}: one pass with a brace stack."""
    stack, best = [], None  # stack: (is_box, content_start)
    for m in _BOX_TOKENS.finditer(text):
        t = m.group()
        if len(t) == 2 and t[0] == "\\":
            continue  # \\ (newline) or escaped \{ \}: literal, not grouping
        if t == "}":
            if stack:
                is_box, start = stack.pop()
                if is_box and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            stack.append((t != "{", m.end()))
    return text[best[0]:best[1]] if best else None

def extract_answer(text: str) -> str | None:
    """Last \\boxed{}/\\fbox{}, else last '#### N', else last 'The answer is[:] X'."""
    text = text[-MAX_SCAN:]
    ans = _last_box(text)
    if ans is None and (i := text.rfind("####")) >= 0:
        ans = text[i + 4:].split("\n", 1)[0]
    if ans is None and (i := text.lower().rfind("the answer is")) >= 0:
        ans = text[i + 13:].split("\n", 1)[0].lstrip(" :").rstrip(" .$").lstrip("$")
    ans = ans.strip() if ans is not None else None
    return ans or None

def format_ok(response: str) -> bool:
    return _last_box(response[-MAX_SCAN:]) is not None

# ---------------------------------------------------------------- normalisation + fast path

_UNITS = (r"(?:(?:square|sq\.?|cubic)\s+)?(?:units?|cm|centimeters?|mm|m|meters?|km|kilometers?|inch(?:es)?|in"
          r"|f(?:ee|oo)?t|yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|days?|weeks?|months?|years?"
          r"|dollars?|cents?|pounds?|lbs?|ounces?|oz|kg|grams?|g|liters?|gallons?|degrees?|percent|people"
          r"|students?|points?)(?:\s*\^\{?[23]\}?)?")
_SUBS = [  # (pattern, replacement), applied in order; all patterns are simple (no nested quantifiers)
    (r"\\(?:text\w*|math(?:rm|bf|it|sf)|mbox)\s*\{([^{}]*)\}", r" \1 "),  # \text{Evelyn} -> Evelyn
    (r"\\(?:left|right)(?![a-zA-Z])", ""),
    (r"\\[!,;: ]", " "), (r"~", " "),
    (r"\\[dt]frac", r"\\frac"),
    (r"\\\$|\$", ""),
    (r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\circ|\\degree|°", ""),
    (r"\\?%", ""),
    (r"\{,\}", ","),
]
_SUBS = [(re.compile(p), r) for p, r in _SUBS]
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_UNITS = re.compile(rf"(?<=[\d}}])(?:\s+{_UNITS})+$")  # "5 cm" but not "5m"
_TOWER = re.compile(r"\^\s*\{[\d\s.+\-*()]*\^|\^\s*\d+\s*\^")  # numeric exponent with its own exponent
_EXPONENT = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL = re.compile(r"\d{5,}\s*!")

def _clean(s: str) -> str:
    """Drop presentation-only markup but keep spaces (they matter to LaTeX, e.g. '\\pi r')."""
    s = s.strip()
    for p, r in _SUBS:
        s = p.sub(r, s)
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return _TRAILING_UNITS.sub("", s).strip()

def _norm(s: str) -> str:
    s = re.sub(r"\s+", "", _clean(s))
    return s.split("=", 1)[1] if re.match(r"[a-zA-Z]=[^=]+$", s) else s  # 'x=5' -> '5'

def _num(s: str) -> Fraction | None:
    """Exact value of a plain int / decimal / a/b / \\frac{a}{b}, else None (no sympy)."""
    if len(s) > 40:
        return None
    try:
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)|-?\d+/\d+", s):
            return Fraction(s)
        if m := re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s):
            return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
    except (ValueError, ZeroDivisionError):
        pass
    return None

def _absurd(s: str) -> bool:
    return (len(s) > MAX_ANSWER or bool(_TOWER.search(s)) or bool(_FACTORIAL.search(s))
            or any(len(e) > 5 or int(e) > MAX_EXPONENT for e in _EXPONENT.findall(s)))

def _prepare(response: str, gold: str) -> tuple[float | None, str, str]:
    """(decided score or None, pred, gold): settles the common cases without sympy or IPC."""
    pred = extract_answer(response)
    gold = extract_answer(gold) if ("\\boxed" in gold or "\\fbox" in gold or "####" in gold) else gold.strip()
    if not pred or not gold or _absurd(pred) or _absurd(gold):
        return 0.0, "", ""
    np_, ng = _norm(pred), _norm(gold)
    if np_ == ng:
        return 1.0, pred, gold
    a, b = _num(np_), _num(ng)
    if a is not None and b is not None and (a == b or (a.denominator == b.denominator == 1)):
        return float(a == b), pred, gold  # two different integers can't be equal for sympy either
    return None, _clean(pred), _clean(gold)

# ---------------------------------------------------------------- math-verify

def _mv_equal(pred: str, gold: str, timeout: int | None = None) -> bool:
    """math-verify equivalence. timeout=None: no SIGALRM (callers kill the process instead)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse("\\boxed{" + gold + "}", cfg, parsing_timeout=timeout)
    p = parse("\\boxed{" + pred + "}", cfg, parsing_timeout=timeout)
    return bool(g and p and verify(g, p, timeout_seconds=timeout))

def score(response: str, gold: str, timeout_s: float = 2.0) -> float:
    """1.0 if the response's final answer is equivalent to gold, else 0.0. Cheap cases are decided
    here; anything needing sympy goes through the worker pool so it gets the same hard time limit."""
    try:
        decided, _, _ = _prepare(response, gold)
        return decided if decided is not None else score_batch([response], [gold], timeout_s=timeout_s)[0][0]
    except Exception:
        return 0.0

# ---------------------------------------------------------------- process pool with hard timeouts

def _worker(conn):
    import logging
    os.setpgrp()  # out of the rank's process group (see _Pool._spawn), then the signals back
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GROUP_SIGNALS)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeouts
    try:  # first calls are slow (imports, grammar): pay that here, not in an item's time limit
        _mv_equal(r"(1, \frac{\pi}{2})", "x - 1")
    except Exception:
        pass  # e.g. math_verify missing: every item will then be counted as an error, not hang the pool
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        fn, pred, gold = msg
        try:
            conn.send(bool(fn(pred, gold)))
        except Exception:
            conn.send("error")

class _Pool:
    def __init__(self, n: int):
        self.ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if self.ctx.get_start_method() == "forkserver":  # forked respawns start with sympy already imported
            self.ctx.set_forkserver_preload(["__main__", __name__, "math_verify"])
        self.procs = [self._spawn() for _ in range(n)]

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        # torchrun passes a SIGTERM/SIGINT it gets to each rank's whole process group, and the rank then finishes
        # its step (guards.StopFlag): the workers and the forkserver (started by the first start(); a worker
        # looks dead to us when it dies) must not die then. They start with these signals blocked; a worker
        # unblocks them once in a group of its own. The parent kills workers by pid; they exit when it dies.
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()  # first: starting it unblocks SIGINT/SIGTERM (it ignores them itself)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child.close()
        p.conn, p.ready, p.job = parent, False, None  # job: (index, deadline)
        return p

    def replace(self, p):
        p.kill(); p.join(); p.conn.close()
        self.procs[self.procs.index(p)] = self._spawn()

    def close(self):
        for p in self.procs:
            try:
                p.conn.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(1)
            if p.is_alive():
                p.kill()

    def run(self, jobs, fn, timeout_s: float):
        """jobs: [(i, pred, gold)] -> ({i: bool}, timeouts, errors). Never raises, never stalls."""
        todo, out, timeouts, errors = deque(jobs), {}, 0, 0
        alive_at = time.monotonic()  # last time any worker made progress
        while todo or any(p.job for p in self.procs):
            now = time.monotonic()
            for p in self.procs:
                if p.ready and p.job is None and todo:
                    p.job = (todo[0][0], now + timeout_s)
                    try:
                        p.conn.send((fn,) + todo.popleft()[1:])
                    except OSError:
                        pass  # dead worker: noticed below, item counted as an error
            if todo and not any(p.ready for p in self.procs) and now - alive_at > 120:
                errors += len(todo); todo.clear()  # workers can't even start: give up, score 0
            deadlines = [p.job[1] for p in self.procs if p.job]
            wait([p.conn for p in self.procs] + [p.sentinel for p in self.procs],
                 max(0.0, min(deadlines) - now) if deadlines else 0.5)
            for p in list(self.procs):
                try:
                    while p.conn.poll():
                        msg, alive_at = p.conn.recv(), time.monotonic()
                        if msg == "ready":
                            p.ready = True
                        else:
                            out[p.job[0]] = msg is True
                            errors += msg == "error"
                            p.job = None
                    dead = not p.is_alive()
                except (EOFError, OSError):
                    dead = True
                late = p.job is not None and time.monotonic() > p.job[1]
                if dead or late:
                    if p.job:
                        timeouts += late and not dead
                        errors += dead
                    self.replace(p)
        return out, timeouts, errors

_pool, _pool_lock = None, threading.Lock()

def _shutdown():
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None

atexit.register(_shutdown)

def score_batch(responses: list[str], golds: list[str], *, timeout_s: float = 2.0, workers: int | None = None,
                format_coef: float = 0.0, scale: str = "01", _fn=None) -> tuple[list[float], dict]:
    """Score many responses; math-verify runs in worker processes under a hard per-item time limit.
    _fn: test-only override of the worker's comparison (a picklable module-level function)."""
    global _pool
    assert len(responses) == len(golds) and scale in ("01", "pm1")
    correct, jobs, timeouts, errors = [0.0] * len(responses), [], 0, 0
    fmt = [format_ok(r) for r in responses]
    for i, (r, g) in enumerate(zip(responses, golds)):
        try:
            decided, pred, gold = _prepare(r, g)
        except Exception:
            decided, errors = 0.0, errors + 1
        if decided is None:
            jobs.append((i, pred, gold))
        else:
            correct[i] = decided
    if jobs:
        n = workers or min(2, os.cpu_count() or 1)
        with _pool_lock:  # one batch at a time owns the pool; callers from any thread are fine
            try:
                if _pool is None or len(_pool.procs) != n:
                    _shutdown()
                    _pool = _Pool(n)
                out, timeouts, n_err = _pool.run(jobs, _fn or _mv_equal, timeout_s)
            except Exception:  # the pool itself broke (e.g. can't start processes): score 0, count, retry next call
                for p in getattr(_pool, "procs", []):
                    p.kill()
                _pool, out, n_err = None, {}, len(jobs)
        errors += n_err
        for i, ok in out.items():
            correct[i] = float(ok)
    rewards = [(2 * c - 1 if scale == "pm1" else c) + (format_coef * f if format_coef > 0 else 0.0)
               for c, f in zip(correct, fmt)]
    stats = {"timeouts": timeouts, "errors": errors, "format_ok": sum(fmt) / max(1, len(fmt))}
    return rewards, stats
