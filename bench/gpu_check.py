"""The GPU check: one command that runs everything this project does on a GPU and writes one report.

    python bench/gpu_check.py --out DIR            # on a CUDA machine: about 7 minutes on one H200
    python bench/gpu_check.py --out DIR --dry-run  # CPU: the same script at tiny sizes (Triton interpreter, gloo)

Sections (each one's failure is caught and reported with its traceback; the others still run):
  env       versions, the GPU, which optional packages are importable (vllm, tyro, math_verify, liger_kernel, flash_attn)
  tests     the `gpu`-marked tests (pytest -m gpu)
  kernels   fused lm_head -> log-prob (+ entropy) and GEM, N tokens x V = 151,936, D = 896 and 1,536, fp32 and bf16
            hidden states: triton and chunked against a naive full-logits reference (fp32 logits of the same inputs,
            no TF32): max error of the values and of both gradients, forward + backward ms (CUDA events, median
            of 5 after 2 warm-ups), peak memory beyond the inputs; Liger Kernel's fused linear cross-entropy
            (reduction="none": per-token values, so its backward recomputes like ours) on the log-prob-only work
  tune      Triton tile sizes and the backward's dz chunk, bf16, D = 896, log-prob only
  trainers  gem_sft.py (20 steps) and grpo.py (5 steps, --rollout hf) on a Qwen2.5-0.5B-shaped model with random
            weights (bench/memory.py's shape), torchrun on 1 GPU: NCCL, FSDP2 bf16 mixed precision, the compiled
            kernels; seconds per step and per phase, tokens/s, peak GPU memory, the generation backend's log-prob
            gap to the trainer (train/logprob_gap)
Writes DIR/gpu_check.json (everything) and DIR/gpu_check.md (the tables), after every section, so a run cut short
still leaves a report.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, max_len=32768)  # memory.py's
GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------------- report
class Report:
    """Sections in order, each {status: ok | failed | skipped, seconds, ..., traceback}; written after each one."""

    def __init__(self, out, dry):
        self.out, self.data = Path(out), {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "sections": {}}
        self.out.mkdir(parents=True, exist_ok=True)

    def section(self, name, fn, *a):
        t0 = time.time()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            res = fn(*a)
            status = "ok" if not res.get("failures") else "failed"
            entry = {"status": status, **res}
        except Exception as e:  # noqa: BLE001 - every failure is the report's content
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        entry["seconds"] = round(time.time() - t0, 1)
        self.data["sections"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)"
              + (f" {entry.get('error', '')}" if entry["status"] != "ok" else ""), flush=True)
        self.write()

    def write(self):
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def markdown(d):
    s = d["sections"]
    env = s.get("env", {})
    lines = [f"# GPU check ({'dry run, CPU' if d['dry_run'] else env.get('gpu', '?')}), {d['started']}", "",
             f"commit {env.get('commit', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"transformers {env.get('transformers', '?')}; packages: {env.get('packages', {})}", "",
             "| section | status | seconds |", "|---|---|---:|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in s.items()]
    t = s.get("tests", {})
    if "summary" in t:
        lines += ["", f"**gpu-marked tests**: {t['summary']}"]
    k = s.get("kernels", {})
    if k.get("rows"):
        lines += ["", f"## Fused kernels (N = {k['N']}, V = {k['V']}; errors against fp32 full logits of the same "
                      "inputs; grads: max |error| / max |reference|; memory: peak beyond the inputs, gradients included)",
                  "", "| work | D | dtype | impl | ms | x triton | x liger | extra MiB | x triton | x liger | "
                      "value err | 2nd value err | dh rel err | dW rel err |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in k["rows"]:
            if "error" in r:
                lines.append(f"| {r['work']} | {r['D']} | {r['dtype']} | {r['impl']} | failed: {r['error'][:80]} "
                             "| | | | | | | | | |")
                continue
            f = lambda x, p=".3g": "" if x is None else format(x, p)  # noqa: E731
            lines.append(f"| {r['work']} | {r['D']} | {r['dtype']} | {r['impl']} | {f(r['ms'], '.2f')} | "
                         f"{f(r.get('x_triton_ms'), '.2f')} | {f(r.get('x_liger_ms'), '.2f')} | "
                         f"{f(r['extra_mib'], '.0f')} | {f(r.get('x_triton_mem'), '.2f')} | {f(r.get('x_liger_mem'), '.2f')} | "
                         f"{f(r.get('err_value'))} | {f(r.get('err_value2'))} | {f(r.get('err_dh'))} | {f(r.get('err_dw'))} |")
    tu = s.get("tune", {})
    if tu.get("rows"):
        lines += ["", "## Triton settings (bf16, log-prob only)", "", "| setting | ms | extra MiB |", "|---|---:|---:|"]
        lines += [f"| {r['setting']} | {r.get('ms', float('nan')):.2f} | {r.get('extra_mib', float('nan')):.0f} |"
                  if "error" not in r else f"| {r['setting']} | failed: {r['error'][:80]} | |" for r in tu["rows"]]
    tr = s.get("trainers", {})
    if tr.get("runs"):
        lines += ["", "## Trainers (1 GPU, torchrun)", "", "| run | status | s/step (median) | phases (median s) | "
                  "tokens/s | peak GPU GiB (allocated / reserved) | logprob_gap |", "|---|---|---:|---|---|---:|---:|"]
        for r in tr["runs"]:
            ph = ", ".join(f"{k} {v:.2f}" for k, v in r.get("phases", {}).items())
            tps = ", ".join(f"{k} {v:.0f}" for k, v in r.get("tokens_per_s", {}).items())
            mem = r.get("memory") or {}
            gap = r.get("logprob_gap")
            lines.append(f"| {r['name']} | {r['status']} | {r.get('step_s', float('nan')):.2f} | {ph} | {tps} | "
                         f"{mem.get('max_allocated', 0) / GiB:.2f} / {mem.get('max_reserved', 0) / GiB:.2f} | "
                         f"{'' if gap is None else format(gap, '.3g')} |")
    fails = [(k, v) for k, v in s.items() if v["status"] == "failed"]
    fails += [(f"trainers/{r['name']}", r) for r in tr.get("runs", []) if r["status"] != "ok"]
    fails += [(f"kernels/{r['work']}/{r['D']}/{r['dtype']}/{r['impl']}", r) for r in k.get("rows", []) if "error" in r]
    if fails:
        lines += ["", "## Failures"]
        for name, v in fails:
            text = v.get("traceback") or v.get("error") or v.get("log_tail") or f"failed: {v.get('failures')}"
            lines += ["", f"### {name}", "```", text[-4000:], "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- env
def env_section(args):
    import importlib.util
    import torch
    import transformers
    r = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    try:
        import triton
        r["triton"] = triton.__version__
    except ImportError:
        r["triton"] = None
    r["packages"] = {m: importlib.util.find_spec(m) is not None
                     for m in ("vllm", "tyro", "math_verify", "liger_kernel", "flash_attn")}
    r["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        r |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "gpu_memory_gib": round(p.total_memory / GiB, 1),
              "sms": p.multi_processor_count}
    return r


# ---------------------------------------------------------------------------------------------------- tests
def tests_section(args):
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in f.read_text())
    xml = Path(args.out) / "gpu_tests.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", *files], cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_tests)
    import xml.etree.ElementTree as ET
    cases = []
    for c in ET.parse(xml).getroot().iter("testcase"):
        state = "failed" if c.find("failure") is not None or c.find("error") is not None else \
            "skipped" if c.find("skipped") is not None else "passed"
        cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "state": state})
    n = {k: sum(c["state"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    out = {"files": files, "cases": cases, "summary": ", ".join(f"{v} {k}" for k, v in n.items()),
           "log_tail": p.stdout[-6000:] + p.stderr[-2000:]}
    if n["failed"] or p.returncode not in (0, 5):  # 5: nothing collected / all deselected
        out["failures"] = [c["test"] for c in cases if c["state"] == "failed"] or [f"pytest exit code {p.returncode}"]
        out["traceback"] = out["log_tail"]
    return out


# ---------------------------------------------------------------------------------------------------- kernels
def _timer(dev):
    """fn -> ms of one call: CUDA events on a GPU, perf_counter on CPU."""
    import torch

    def run(fn):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return run


def measure(fn, inputs, dev, warm, reps):
    """fn(*inputs) builds a scalar loss; backward into the inputs. -> (outputs, grads, median ms, extra bytes):
    extra = peak allocated during one call - allocated before it (the inputs); CPU: None."""
    import torch
    timer = _timer(dev)

    def once():
        for x in inputs:
            x.grad = None
        loss, outs = fn(*inputs)
        loss.backward()
        return outs
    for _ in range(warm):
        once()
    ms = sorted(timer(once) for _ in range(reps))[reps // 2]
    for x in inputs:
        x.grad = None
    extra = None
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outs = once()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        outs = once()
    return [o.detach() if o is not None else None for o in outs], [x.grad for x in inputs], ms, extra


def _errs(outs, grads, ref_outs, ref_grads):
    """value errors (max |x - ref|, fp32 outputs), gradient errors (max |x - ref| / max |ref|)."""
    e = {}
    for k, (o, r) in enumerate(zip(outs, ref_outs)):
        if o is not None and r is not None:
            e["err_value" if k == 0 else "err_value2"] = (o.float() - r.float()).abs().max().item()
    for name, g, r in zip(("err_dh", "err_dw"), grads, ref_grads):
        e[name] = ((g.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
    return e


def kernels_section(args):
    import torch
    from common import kernels as K
    from gem_sft import gem_loss
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference and fp32 runs in full precision
    N, V = args.N, args.V
    rows = []
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger_none = LigerFusedLinearCrossEntropyLoss(reduction="none")
        liger_f32 = LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=torch.float32)
    except Exception:  # noqa: BLE001 - not installed, or no GPU backend for it
        liger_none = liger_f32 = None

    def naive_lp(h, w, y, a, b, ref=False):  # full logits; ref: fp32 from the same (rounded) inputs
        z = (h.float() @ w.float().T) if ref else (h @ w.T).float()
        lp = z.log_softmax(-1)
        logp = lp.gather(1, y[:, None])[:, 0]
        ent = -(lp.exp() * lp).sum(-1) if b is not None else None
        return (logp * a).sum() + ((ent * b).sum() if b is not None else 0), (logp, ent)

    def fused_lp(impl):
        def fn(h, w, y, a, b):
            logp, ent = K.token_logprobs(h, w, y, with_entropy=b is not None, impl=impl)
            return (logp * a).sum() + ((ent * b).sum() if b is not None else 0), (logp, ent)
        return fn

    def liger_lp(mod):
        def fn(h, w, y, a, b):
            logp = -mod(w, h, y)
            return (logp * a).sum(), (logp, None)
        return fn

    def gem_fn(impl, beta=0.7):
        def fn(h, w, y, a, b):
            if impl == "naive":
                loss, ce = gem_loss((h.float() @ w.float().T), y, beta)
                return (loss * a).sum(), (loss, ce)
            loss, ce, _ = K.token_gem(h, w, y, beta, impl=impl)
            return (loss * a).sum(), (loss, ce)
        return fn

    works = {"logp+entropy": ({"triton": fused_lp("triton"), "chunked": fused_lp("chunked"), "naive": naive_lp},
                              lambda *x: naive_lp(*x, ref=True)),
             "logp": ({"triton": fused_lp("triton"), "chunked": fused_lp("chunked"), "naive": naive_lp,
                       **({"liger": liger_lp(liger_none), "liger-fp32-accum": liger_lp(liger_f32)} if liger_none else {})},
                      lambda *x: naive_lp(*x, ref=True)),
             "gem": ({"triton": gem_fn("triton"), "chunked": gem_fn("chunked")}, gem_fn("naive"))}
    for D in args.dims:
        for dtype in args.dtypes:
            dt = getattr(torch, dtype)
            g = torch.Generator().manual_seed(D)
            h = torch.randn(N, D, generator=g).to(dev, dt).requires_grad_()
            w = (torch.randn(V, D, generator=g) * 0.05).to(dev, dt).requires_grad_()
            y = torch.randint(0, V, (N,), generator=g).to(dev)
            a = torch.randn(N, generator=g).to(dev)
            for work, (impls, ref_fn) in works.items():
                b = torch.randn(N, generator=g).to(dev) if work == "logp+entropy" else None
                ref_outs, ref_grads, ref_ms, ref_extra = measure(lambda h, w: ref_fn(h, w, y, a, b), [h, w], dev, 1, 1)
                ref_grads = [x.clone() for x in ref_grads]
                rows.append({"work": work, "D": D, "dtype": dtype, "impl": "naive fp32 (reference)", "ms": ref_ms,
                             "extra_mib": ref_extra / MiB if ref_extra is not None else None})
                got = {}
                for impl, fn in impls.items():
                    row = {"work": work, "D": D, "dtype": dtype, "impl": impl}
                    try:
                        outs, grads, ms, extra = measure(lambda h, w: fn(h, w, y, a, b), [h, w], dev, args.warm, args.reps)
                        row |= {"ms": ms, "extra_mib": extra / MiB if extra is not None else None,
                                **_errs(outs, grads, ref_outs, ref_grads)}
                        got[impl] = row
                    except Exception as e:  # noqa: BLE001
                        row |= {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                    rows.append(row)
                    h.grad = w.grad = None
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                for r in got.values():
                    for base in ("triton", "liger"):
                        if base in got and got[base]["ms"]:
                            r[f"x_{base}_ms"] = r["ms"] / got[base]["ms"]
                            if r["extra_mib"] is not None and got[base]["extra_mib"]:
                                r[f"x_{base}_mem"] = r["extra_mib"] / got[base]["extra_mib"]
                del ref_outs, ref_grads
            del h, w
    failures = [f"{r['work']}/{r['D']}/{r['dtype']}/{r['impl']}" for r in rows if "error" in r]
    return {"N": N, "V": V, "rows": rows, "failures": failures}


def tune_section(args):
    import torch
    from common import kernels as K
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    N, V, D = args.N, args.V, args.dims[0]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dev, dt).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.05).to(dev, dt).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(dev)
    a = torch.randn(N, generator=g).to(dev)
    blocks, dz = dict(K.TRITON_BLOCKS), K.TRITON_DZ_ELEMS
    settings = [("default " + str(blocks) + f" dz {dz}", {}, dz)]
    settings += [(f"{c} dz {dz}", c, dz) for c in args.tune_blocks]
    settings += [(f"default, dz {e}", {}, e) for e in args.tune_dz]
    rows = []
    for name, c, e in settings:
        K.TRITON_BLOCKS.update(c)
        K.TRITON_DZ_ELEMS = e
        try:
            def fn(h, w):
                logp, _ = K.token_logprobs(h, w, y, with_entropy=False, impl="triton")
                return (logp * a).sum(), (logp,)
            _, _, ms, extra = measure(fn, [h, w], dev, args.warm, args.reps)
            rows.append({"setting": name, "ms": ms, "extra_mib": extra / MiB if extra is not None else float("nan")})
        except Exception as ex:  # noqa: BLE001
            rows.append({"setting": name, "error": f"{type(ex).__name__}: {ex}", "traceback": traceback.format_exc()})
        finally:
            K.TRITON_BLOCKS.clear()
            K.TRITON_BLOCKS.update(blocks)
            K.TRITON_DZ_ELEMS = dz
    return {"rows": rows, "failures": [r["setting"] for r in rows if "error" in r]}


# ---------------------------------------------------------------------------------------------------- trainers
def trainers_section(args):
    import torch
    from common.model import build_tiny
    model = str(build_tiny(ROOT / "runs" / "qwen0.5b-shape", seed=0, **SHAPE)) if not args.dry_run else "tiny"
    runs = []
    base = ROOT / "runs" / "gpu_check"  # not under --out: checkpoints and HF exports (GBs) stay out of the report
    common = ["--model", model, "--rollout", "hf", "--max-len", "512", "--save-every", "0"]
    plan = [("gem_sft", "gem_sft", ["--max-steps", str(args.sft_steps), "--batch-size", "64", "--micro-batch-size", "32",
                                    "--log-every", "1", "--eval-k", "0", "--train-size", "2000", "--eval-size", "8"]),
            ("grpo", "grpo", ["--steps", str(args.rl_steps), "--prompts-per-step", "32", "--n-samples", "8",
                              "--max-new-tokens", "64", "--mini-batches", "1", "--micro-batch-size", "64",
                              "--eval-every", "0", "--eval-size", "16", "--eval-k", "2", "--lr", "1e-6"]),
            ("grpo, engine fp32", "grpo", ["--steps", "2", "--prompts-per-step", "32", "--n-samples", "8",
                                           "--max-new-tokens", "64", "--mini-batches", "1", "--micro-batch-size", "64",
                                           "--eval-every", "0", "--eval-size", "4", "--eval-k", "1", "--lr", "1e-6",
                                           "--engine-dtype", "float32"])]
    plan = [p for p in plan if not args.trainers or p[0] in args.trainers.split(";")]
    for name, trainer, extra in plan:
        out = base / name.replace(", ", "-").replace(" ", "-")
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        mem = out / "gpu_memory.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(_free_port()),
               __file__, "--worker", trainer, "--", *common, "--out-dir", str(out), *extra]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, GPU_CHECK_MEMORY=str(mem)), capture_output=True,
                               text=True, timeout=args.timeout_trainer)
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            log += f"\n[gpu_check] killed: no exit after {args.timeout_trainer} s (--timeout-trainer)"
        r = {"name": name, "cmd": " ".join(cmd[cmd.index("--worker") + 1:]), "rc": rc, "wall_s": time.time() - t0,
             "status": "ok" if rc == 0 else "failed", "log_tail": log[-5000:]}
        r |= _run_metrics(out / "metrics.jsonl", trainer, responses=32 * 8)
        r["memory"] = json.loads(mem.read_text()) if mem.exists() else None
        runs.append(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"model": model, "runs": runs, "failures": [r["name"] for r in runs if r["status"] != "ok"]}


def _run_metrics(path, trainer, responses):
    """Medians over the steps after the first (which compiles the kernels and allocates Adam's state); responses:
    responses per RL step."""
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [r for r in rows if "train/loss" in r]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    later = train[1:] or train
    if trainer == "gem_sft":
        return {"steps": len(train), "step_s": med([r["train/time_step"] for r in later]),
                "phases": {}, "tokens_per_s": {"trained": med([r["train/tokens_per_s"] for r in later])},
                "loss_first_last": [train[0]["train/loss"], train[-1]["train/loss"]] if train else None, "rows": train}
    phases = sorted({k[len("train/time_"):] for r in train for k in r if k.startswith("train/time_")})
    return {"steps": len(train),
            "step_s": med([sum(r[f"train/time_{p}"] for p in phases) for r in later]),
            "phases": {p: med([r[f"train/time_{p}"] for r in later]) for p in phases},
            "tokens_per_s": {"generated": med([r["train/gen_tokens_per_s"] for r in later]),
                             "response tokens in the update": med([r["train/response_len"] * responses /
                                                                   r["train/time_update"] for r in later])},
            "logprob_gap": med([r["train/logprob_gap"] for r in later]), "rows": train,
            "reward": [r["train/reward"] for r in train]}


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(trainer, argv):
    """One torchrun rank: the trainer's main(), then its peak GPU memory into $GPU_CHECK_MEMORY."""
    import importlib
    import torch
    from common import config, dist
    mod = importlib.import_module(trainer)
    sys.argv = [f"{trainer}.py", *argv]
    with config.one_line_errors():
        mod.main(config.cli(mod.Args, argv))
    if torch.cuda.is_available() and os.environ.get("GPU_CHECK_MEMORY"):
        Path(os.environ["GPU_CHECK_MEMORY"]).write_text(json.dumps(
            {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved()}))
    dist.exit_cleanly()


# ---------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="report folder")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes, the Triton interpreter, gloo")
    ap.add_argument("--sections", default="env,tests,trainers,kernels,tune")
    ap.add_argument("--trainers", default="", help="trainer runs to do, ';'-separated names (default: all)")
    ap.add_argument("--timeout-trainer", type=int, default=0, help="seconds per trainer run (default 150, dry run 600)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.extra)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.N, args.V = (64, 1000) if args.dry_run else (8192, 151936)
    args.dims = [32] if args.dry_run else [896, 1536]
    args.dtypes = ["float32"] if args.dry_run else ["bfloat16", "float32"]
    args.warm, args.reps = (1, 1) if args.dry_run else (2, 5)
    args.tune_blocks = [dict(BN=32, BV=32, BD=16)] if args.dry_run else [
        dict(BN=64, BV=128, BD=64, num_warps=4, num_stages=3), dict(BN=128, BV=256, BD=64, num_warps=8, num_stages=3),
        dict(BN=128, BV=128, BD=128, num_warps=8, num_stages=2), dict(BN=256, BV=128, BD=64, num_warps=8, num_stages=3)]
    args.tune_dz = [0] if args.dry_run else [0, 2**26]
    args.sft_steps, args.rl_steps = (2, 1) if args.dry_run else (20, 5)
    args.timeout_tests = 300 if args.dry_run else 120
    # a GRPO run of 5 steps took 85 s on an H200 up to its final HF export (2 GB), which 115 s did not cover
    args.timeout_trainer = args.timeout_trainer or (600 if args.dry_run else 200)
    rep = Report(args.out, args.dry_run)
    fns = {"env": env_section, "tests": tests_section, "kernels": kernels_section, "tune": tune_section,
           "trainers": trainers_section}
    for name in args.sections.split(","):
        rep.section(name, fns[name], args)
    bad = [k for k, v in rep.data["sections"].items() if v["status"] != "ok"]
    print(f"[gpu_check] report: {Path(args.out) / 'gpu_check.md'}; " + (f"FAILED: {', '.join(bad)}" if bad else "all ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
