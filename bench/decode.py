"""What bounds generation on CPU (issue 25): the fp32 matrix products at decode size, or memory bandwidth?

    python bench/decode.py              # SmolLM2-135M-Instruct (setup.sh converts it), 8 prompts x 4 samples, 64 tokens

1. The products of one decoding step (30 layers' q, k, v, o, gate, up, down and the 49152 x 576 head) at 16 rows
   (one rank's share of the rollout) and at 506 rows (a training micro-batch), one thread: PyTorch's F.linear and
   vLLM's oneDNN product with prepacked weights (what its CPU backend runs), in GFLOP/s; and how fast one core
   streams memory (a sum over 1 GB), alone and with the other core streaming too.
2. The same rollout two ways, seconds per generate call (the first call left out): two engines side by side, one
   per process and core, 16 sequences each (what 2 ranks do), against one engine on both cores decoding all 32.
3. The same in the trainers' set-up (torchrun, 2 ranks, an Engine per rank): Engine.generate pooled (rank 0's engine
   decodes both ranks' prompts on both cores) against every_rank=False (each rank's own engine), calls alternating
   so that the machine's load hits both alike; a call's time is the slower rank's; and the CPU time the waiting rank
   uses during a pooled call.

    python bench/decode.py --ranks-only  # part 3 alone
"""
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "smollm2-135m-instruct"
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # [out, in]


def products(rows):
    from vllm import _custom_ops as ops
    torch.set_num_threads(1)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES] + [torch.randn(49152, 576)]
    x = {k: torch.randn(rows, k) for k in (576, 1536)}
    packed = [ops.create_onednn_mm(w.t(), 32) for w in weights]
    flop = 2 * rows * sum(w.numel() for w in weights)
    out = {}
    for name, step in [("F.linear", lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights]),
                       ("oneDNN prepacked", lambda: [ops.onednn_mm(h, x[w.shape[1]], None)
                                                     for w, h in zip(weights, packed)])]:
        step()
        best = min(_seconds(step) for _ in range(5))
        out[name] = (best, flop / best / 1e9)
    return out


def stream():
    torch.set_num_threads(1)
    a = torch.ones(2**28)  # 1 GB of fp32
    a.sum()
    return a.numel() * 4 / min(_seconds(a.sum) for _ in range(3)) / 1e9


def _seconds(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def generate(threads, prompts, calls=4):
    sys.path.insert(0, str(ROOT))
    from common import data
    from common.model import load
    from common.rollout import Engine
    torch.set_num_threads(threads)
    _, tok = load(str(MODEL))
    engine = Engine(str(MODEL), max_model_len=512, max_seqs=prompts * 4)
    torch.set_num_threads(threads)  # again: vLLM's CPU worker binds its own thread count when it starts
    batch = [data.format_prompt(tok, f"{17 * i + 3}+{29 * i + 11}") for i in range(prompts)]
    times = [_seconds(lambda: engine.generate(batch, n=4, max_new_tokens=64, seed=c, ignore_eos=True))
             for c in range(calls)]
    return times[1:]


def ranks(prompts=4, calls=6):
    """Part 3, on each rank of `torchrun --nproc_per_node 2`: rank 0 prints the seconds of each pooled and each
    per-rank call (after one warm-up call of each)."""
    sys.path.insert(0, str(ROOT))
    import torch.distributed as tdist
    from common import data, dist
    from common.model import load
    from common.rollout import Engine
    d = dist.setup(0)
    _, tok = load(str(MODEL))
    engine = Engine(str(MODEL), max_model_len=512, max_seqs=prompts * 4)
    assert engine.pooled, "the engine should pool here (CPU, 2 ranks on one machine, a small model)"
    mine = range(d.rank * prompts, (d.rank + 1) * prompts)  # rank-specific prompts, as in the trainers
    batch = [data.format_prompt(tok, f"{17 * i + 3}+{29 * i + 11}") for i in mine]

    def call(every_rank, seed):
        tdist.barrier()
        t, cpu = time.perf_counter(), time.process_time()
        engine.generate(batch, n=4, max_new_tokens=64, seed=seed, ignore_eos=True, every_rank=every_rank)
        cpu = time.process_time() - cpu
        tdist.barrier()  # the rollout ends when the slower rank has its samples
        return time.perf_counter() - t, cpu

    times, waiting = {True: [], False: []}, []
    for c in range(calls + 1):
        for every_rank in (c % 2 == 0, c % 2 == 1):  # alternate which goes first
            wall, cpu = call(every_rank, c)
            times[every_rank].append(wall)
            if every_rank and c:
                waiting.append(cpu)  # on rank 1: the CPU seconds it used while rank 0 decoded for it
    cpu = [None] * d.world if d.rank == 0 else None
    tdist.gather_object(waiting, cpu, dst=0)
    if d.rank == 0:
        print(" ".join(f"{t:.3f}" for t in times[True][1:]), "|", " ".join(f"{t:.3f}" for t in times[False][1:]),
              "|", " ".join(f"{t:.3f}" for t in cpu[1]))
    engine.shutdown()
    dist.cleanup()


def _ranks_line():
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--ranks"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: torchrun {__file__} --ranks failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    pooled, own, waiting = ([float(x) for x in part.split()] for part in out.stdout.strip().splitlines()[-1].split("|"))
    ratio = statistics.median(pooled) / statistics.median(own)
    print(f"trainer engines, 2 ranks: pooled {statistics.median(pooled):.2f} s per call "
          f"({', '.join(f'{t:.2f}' for t in pooled)}), each rank's own {statistics.median(own):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in own)}); pooled x own: {ratio:.2f}; CPU seconds rank 1 used while waiting "
          f"for a pooled call: {max(waiting):.2f} at most")


def _run(*args):
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _last(p):
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"error: {' '.join(p.args)} failed (exit {p.returncode})")
    return [float(x) for x in out.strip().splitlines()[-1].split()]


def main():
    if not MODEL.exists():
        raise SystemExit(f"error: {MODEL} not found: run `bash setup.sh` first (it converts the model)")
    if sys.argv[1:2] == ["--ranks-only"]:
        return _ranks_line()
    for rows in (16, 506):
        for name, (s, gf) in products(rows).items():
            print(f"products of one decoding step, {rows} rows, {name}: {s * 1e3:.1f} ms, {gf:.0f} GFLOP/s", flush=True)
    alone = _last(_run("--stream"))[0]
    pair = [_last(p)[0] for p in [_run("--stream"), _run("--stream")]]
    print(f"memory streamed by one core: {alone:.1f} GB/s alone, {pair[0]:.1f} and {pair[1]:.1f} GB/s two at once")
    side = [_run("--generate", "1", "4"), _run("--generate", "1", "4")]
    side = [max(t) for t in zip(*[_last(p) for p in side])]  # a rollout ends when both engines are done
    one = _last(_run("--generate", "2", "8"))
    print(f"two engines side by side (1 thread, 16 sequences each): {statistics.median(side):.2f} s per call "
          f"({', '.join(f'{t:.2f}' for t in side)})")
    print(f"one engine, 2 threads, 32 sequences: {statistics.median(one):.2f} s per call "
          f"({', '.join(f'{t:.2f}' for t in one)}); x side by side: {statistics.median(one) / statistics.median(side):.2f}")
    _ranks_line()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stream"]:
        print(stream())
    elif sys.argv[1:2] == ["--ranks"]:
        ranks()
    elif sys.argv[1:2] == ["--generate"]:
        print(" ".join(f"{t:.3f}" for t in generate(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
