"""Peak memory per component of grpo.py and gem_sft.py on a Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14/2
heads, vocabulary 151,936, tied; random weights, the built-in tokenizer, built in code) on 2 CPU ranks, against
the floor: the bytes the design cannot avoid.

    python bench/memory.py                          # both trainers, 2 ranks
    python bench/memory.py --trainer grpo --steps 2 # one of them
    python bench/memory.py --limit-gib 17           # the watchdog (default 17): kill a run whose ranks pass it

Each trainer runs unchanged under torchrun; this file is the script torchrun starts (`--worker`): it wraps a few
functions of the trainer's modules (model load, FSDP wrap, pi_ref copy, engine start, generate, log-prob passes,
the RL update, weight sync, each step's save_or_stop, the HF export) with phase markers, then calls the trainer's
main(). A thread samples the rank's anonymous RSS (RssAnon of /proc/self/status: tensors live there; the safetensors
files mapped while loading are page cache, reclaimable, and not counted) every 5 ms, so each phase has its level
at the end and its peak. The parent samples every process of the run the same way for the total on 2 ranks.

Floor (per rank, from first principles; N = parameters, tied head counted once; W = world size):
  trainer parameters, gradients: N/W x 4 bytes each (fp32 FSDP2 shards); Adam: 2 x N/W x 4;
  pi_ref: N/W x 4 only when the run needs it (--kl-coef > 0 or --log-kl-ref);
  engine weights: N x (engine dtype bytes); KV cache: layers x 2 (K, V) x kv_heads x head_dim x (dtype bytes)
  x max_len x the sequences the engine holds at once (rollout.kv_cache_bytes: the same formula the engine uses).
Activations, gathered parameters and the interpreter/libraries have floor 0: the ratio column shows them as bytes.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2 ** 30
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, max_len=32768)
MODEL_DIR = ROOT / "runs" / "qwen0.5b-shape"
RUNS = {  # the runs of issue 16: GRPO 4 prompts x 4, 32 new tokens, 1 mini-batch; GEM SFT 3 steps
    "grpo": ["--prompts-per-step", "4", "--n-samples", "4", "--max-new-tokens", "32", "--mini-batches", "1",
             "--eval-every", "0", "--eval-size", "2", "--eval-k", "2", "--micro-batch-size", "2", "--save-every", "0"],
    "gem_sft": ["--max-steps", "3", "--batch-size", "16", "--micro-batch-size", "2", "--train-size", "400",
                "--eval-size", "2", "--eval-k", "0", "--log-every", "1", "--save-every", "0"],
}


def anon_bytes(pid="self"):
    """RssAnon of a process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


# ------------------------------------------------------------------------------------------------------ floor
def param_count(cfg):
    """Parameters of a Qwen2 config (tied head counted once), as count_params would report."""
    h, L, V, I = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
    layer = attn + 3 * h * I + 2 * h              # gate, up, down; two RMSNorms
    return V * h * (1 if cfg.tie_word_embeddings else 2) + L * layer + h


def floor(cfg, world, trainer, engine_bytes, kv_bytes, ref):
    """Per-rank floor in bytes by component."""
    n = param_count(cfg)
    shard = -(-n // world) * 4
    f = {"trainer params (FSDP shard)": shard, "gradients (FSDP shard)": shard, "Adam m, v (FSDP shard)": 2 * shard,
         "pi_ref copy (shard)": shard if ref else 0}
    if trainer != "gem_sft":
        f |= {"engine weights": n * engine_bytes, "engine KV cache": kv_bytes}
    return f


# ------------------------------------------------------------------------------------------------------ worker
class Tracer:
    """Phase markers of one rank: level (RssAnon at the end) and peak (max sampled since the previous marker)."""

    def __init__(self, path):
        self.path, self.peak, self.lock = path, anon_bytes(), threading.Lock()
        self.t0 = time.time()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            a = anon_bytes()
            with self.lock:
                self.peak = max(self.peak, a)
            time.sleep(0.005)

    def mark(self, phase, **extra):
        a = anon_bytes()
        with self.lock:
            peak, self.peak = max(self.peak, a), a
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": phase, "t": time.time() - self.t0, "level": a, "peak": peak, **extra}) + "\n")


def worker(trainer, argv):
    """Run `trainer`.main() with phase markers (this process is one torchrun rank)."""
    import importlib
    import torch
    from common import checkpoint, config, dist, model as M, rollout
    tr = Tracer(Path(os.environ["MEMTRACE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.jsonl")
    mod = importlib.import_module(trainer)

    def wrap(owner, name, phase, info=None):
        fn = getattr(owner, name)

        def wrapped(*a, **kw):
            tr.mark(f"before {phase}")
            out = fn(*a, **kw)
            tr.mark(phase, **(info(out, a) if info else {}))
            return out
        setattr(owner, name, wrapped)

    local = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    wrap(M, "load", "load")
    wrap(dist, "wrap_fsdp", "wrap", lambda m, a: {"bytes": local(p.to_local() if hasattr(p, "to_local") else p
                                                                 for p in m.parameters())})
    wrap(dist, "local_shards", "ref", lambda s, a: {"bytes": local(s)})
    wrap(rollout.Engine, "__init__", "engine", lambda _, a: {  # the code before issue 16: 1 GiB, fp32
        "kv_bytes": getattr(a[0], "kv_bytes", int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")) * GiB),
        "engine_dtype": str(getattr(a[0], "dtype", "float32"))})
    wrap(rollout.Engine, "generate", "generate")
    wrap(rollout.Engine, "sleep", "engine sleep")
    wrap(M, "batched_logprobs", "logprob")
    if hasattr(mod, "rl_update"):
        wrap(mod, "rl_update", "update")
    wrap(rollout.Engine, "sync", "sync")
    wrap(checkpoint, "save_or_stop", "step")
    wrap(checkpoint, "export_hf", "export")
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **kw):  # forward + backward end here; Adam's state (m, v) exists from the first step on
        tr.mark("before optimizer step")
        out = orig_step(self, *a, **kw)
        tr.mark("optimizer step", adam_bytes=local(t.to_local() if hasattr(t, "to_local") else t
                                                   for s in self.state.values() for t in s.values()
                                                   if torch.is_tensor(t) and t.dim() > 0))
        return out
    torch.optim.AdamW.step = step
    sys.argv = [f"{trainer}.py", *argv]
    mod.main(config.cli(mod.Args, argv))
    tr.mark("end")
    dist.exit_cleanly()


# ------------------------------------------------------------------------------------------------------ parent
def run(trainer, args, extra):
    """torchrun the trainer with markers; sample every process of the run. Returns (per-rank marks, total peak,
    seconds per step, killed)."""
    import shutil
    import psutil
    out = ROOT / "runs" / f"memory-{trainer}"
    shutil.rmtree(out, ignore_errors=True)
    trace = out / "trace"
    trace.mkdir(parents=True)
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", str(args.nproc), "--master-port", str(_free_port()),
           __file__, "--worker", trainer, "--", "--model", str(MODEL_DIR), "--out-dir", str(out),
           "--max-len", str(args.max_len), *RUNS[trainer], *(["--steps", str(args.steps)] if trainer != "gem_sft" else []),
           *extra]
    env = dict(os.environ, MEMTRACE_DIR=str(trace))
    log = open(out / "console.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    total_peak, killed, rows_seen = 0, None, []
    while p.poll() is None:
        try:
            procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = sum(anon_bytes(q.pid) for q in procs)
        total_peak = max(total_peak, total)
        if total > args.limit_gib * GiB and killed is None:
            killed = f"killed by the watchdog at {total / GiB:.1f} GiB (limit {args.limit_gib})"
            for q in procs:
                try:
                    q.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
        m = out / "metrics.jsonl"
        if m.exists():
            n = sum(1 for line in open(m) if '"train/' in line)
            if n > len(rows_seen):
                rows_seen += [time.time()] * (n - len(rows_seen))
        time.sleep(0.02)
    p.wait()
    log.close()
    marks = {int(f.stem[4:]): [json.loads(x) for x in open(f)] for f in sorted(trace.glob("rank*.jsonl"))}
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    train = [r for r in rows if "train/loss" in r]
    if trainer == "gem_sft":  # wall time between step rows (the first step includes Adam's allocation: left out)
        sps = [b - a for a, b in zip(rows_seen, rows_seen[1:])]
    else:
        sps = [sum(v for k, v in r.items() if k.startswith("train/time_")) for r in train]
    if p.returncode and not killed:
        killed = f"exit code {p.returncode}: " + (out / "console.log").read_text()[-2000:]
    return marks, total_peak, sps, killed


def components(trainer, marks, cfg, world):
    """Measured bytes per component on one rank (from its phase markers)."""
    by = {}
    for m in marks:
        by.setdefault(m["phase"], []).append(m)
    first = lambda ph: by[ph][0] if ph in by else None  # noqa: E731
    base = first("before load")["level"]
    c = {"interpreter, libraries (before load)": base}
    c["trainer params (FSDP shard)"] = first("wrap")["level"] - first("before wrap")["level"] + \
        (first("load")["level"] - base)  # what stays of the load after the wrap
    c["model load + wrap (transient peak)"] = max(first("load")["peak"], first("wrap")["peak"]) - first("wrap")["level"]
    c["pi_ref copy (shard)"] = first("ref")["level"] - first("before ref")["level"] if "ref" in by else 0
    if "engine" in by:
        e = first("engine")
        c["engine KV cache"] = e["kv_bytes"]
        c["engine weights"] = e["level"] - first("before engine")["level"] - e["kv_bytes"]
        c["engine start (transient peak)"] = e["peak"] - e["level"]
    adam = first("optimizer step")
    c["Adam m, v (FSDP shard)"] = adam["adam_bytes"] if adam else 0
    c["forward + backward (peak over level before)"] = max(
        (m["peak"] - p["level"] for p, m in zip(marks, marks[1:]) if m["phase"] == "before optimizer step"), default=0)
    c["optimizer step (peak over level before)"] = max(
        (m["peak"] - p["level"] for p, m in zip(marks, marks[1:]) if m["phase"] == "optimizer step"), default=0)
    steady = lambda ph: max((m["peak"] - b["level"] for m, b in zip(by.get(ph, []), by.get("before " + ph, []))),  # noqa: E731
                            default=0)
    if trainer != "gem_sft":
        c["generate (peak over level)"] = steady("generate")
        c["log-prob passes (peak over level)"] = steady("logprob")
        ups = list(zip(by.get("update", []), by.get("before update", [])))
        c["update: grads + activations + gathered params (peak)"] = max(
            (u["peak"] - b["level"] - (c["Adam m, v (FSDP shard)"] if i == 0 else 0) for i, (u, b) in enumerate(ups)),
            default=0)
        c["weight sync (peak over level)"] = steady("sync")
    c["export (peak over level)"] = steady("export")
    steps = [m for m in marks if m["phase"] in ("before update", "step", "sync", "update", "before sync", "generate",
                                                "logprob", "before generate", "before logprob", "optimizer step",
                                                "before optimizer step")]
    c["PEAK during steps"] = max(m["peak"] for m in steps)
    c["PEAK whole run"] = max(m["peak"] for m in marks)
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", nargs="+", default=["grpo", "gem_sft"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="RL steps (gem_sft: 3, the issue's run)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--limit-gib", type=float, default=17.0, help="watchdog: kill a run whose processes pass this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more trainer flags, after --")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.extra)
    from common.model import build_tiny, tiny_config
    cfg = tiny_config(**SHAPE)
    build_tiny(MODEL_DIR, seed=0, **SHAPE)
    load = os.getloadavg()
    import platform
    print(f"model: Qwen2.5-0.5B shape, {param_count(cfg) / 1e6:.1f}M parameters (tied), vocabulary {cfg.vocab_size}; "
          f"{args.nproc} ranks; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"load average before: {load[0]:.1f}")
    for trainer in args.trainer:
        t0 = time.time()
        marks, total_peak, sps, killed = run(trainer, args, args.extra)
        per_rank = {r: components(trainer, m, cfg, args.nproc) for r, m in marks.items() if m}
        eng = next((m for ms in marks.values() for m in ms if m["phase"] == "engine"), None)
        ref = any(m["phase"] == "ref" for ms in marks.values() for m in ms)
        f = floor(cfg, args.nproc, trainer, {"float32": 4, "bfloat16": 2}.get(eng["engine_dtype"], 4) if eng else 4,
                  eng["kv_bytes"] if eng else 0, ref)
        if killed:
            print(f"\n{trainer}: {killed}")
        print(f"\n{trainer}.py {' '.join(RUNS[trainer])} {' '.join(args.extra)}   ({time.time() - t0:.0f} s, load "
              f"average after {os.getloadavg()[0]:.1f}){' engine ' + eng['engine_dtype'] if eng else ''}")
        print(f"{'component (per rank, GiB)':55s} " + " ".join(f"{'rank ' + str(r):>7s}" for r in per_rank) +
              f" {'floor':>7s} {'ratio':>6s}")
        names = list(next(iter(per_rank.values())))
        fl_total = sum(f.values())
        for name in names:
            vals = [c[name] for c in per_rank.values()]
            fl = f.get(name, fl_total if name.startswith("PEAK") else 0)
            ratio = f"{max(vals) / fl:6.2f}" if fl else "     -"
            print(f"{name:55s} " + " ".join(f"{v / GiB:7.2f}" for v in vals) + f" {fl / GiB:7.2f} {ratio}")
        print(f"{'gradients (FSDP shard, exist during the update)':55s} " + " ".join(f"{'':>7s}" for _ in per_rank) +
              f" {f['gradients (FSDP shard)'] / GiB:7.2f}")
        print(f"total on {args.nproc} ranks (all processes, sampled together): peak {total_peak / GiB:.2f} GiB; "
              f"floor {args.nproc * fl_total / GiB:.2f} GiB; ratio {total_peak / (args.nproc * fl_total):.2f}")
        if sps:
            print(f"seconds per step: {', '.join(f'{s:.1f}' for s in sps)}")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
