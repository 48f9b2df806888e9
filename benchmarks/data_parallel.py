"""Data-parallel training on one machine: K ranks x 1 thread against 1 process x K threads, and what the
ranks spend talking.

    python benchmarks/data_parallel.py                   # 2 ranks x 1 thread vs 1 process x 2 threads
    python benchmarks/data_parallel.py --ranks 4 --rounds 5
    python benchmarks/data_parallel.py --cluster 2 4 8 16 32   # and a model on paper of P one-core ranks

Both train ResNet-20 on the same global batch (128) with the trainer's step (`tinyres.run.train_step`):
the ranks with synchronized batch norm and `DistributedDataParallel`, each on its part of the
batch. Each measurement is a fresh process (a fresh `mpiexec` job for the ranks), and the two
alternate over `--rounds` rounds so that drift in the machine's load hits both alike.
Reported: images per second (median over all timed steps of a configuration), each round's
ratio, and for the ranks the messages of a step (count and bytes of all-reduces and broadcasts)
with the seconds spent in them, inside the step (which includes waiting for the slower rank)
and alone (the same messages sent back to back after a barrier, which is their pure cost).

`--cluster P ...` adds a model on paper of P ranks of one core each, on a network of
`--latency-us` and `--bandwidth-gbs`: a step costs the measured one-thread step of 128/P images
(timed here, in fresh processes) plus the step's messages, each small all-reduce 2 log2(P)
latencies (recursive doubling) and the gradient bucket a ring all-reduce, 2 (P - 1) latencies and
2 (P - 1) / P of its bytes over the bandwidth. Nothing overlaps, as in tinyres now.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))


def _step_setup(batch: int, parallel: bool):
    import tinyres
    from tinyres import distributed as dist
    from tinyres import models, nn, optim

    tinyres.nn.init.manual_seed(0)
    model = models.cifar_resnet(20)
    k, r = dist.get_world_size(), dist.get_rank()
    if parallel:
        model = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    part = slice(r * batch // k, (r + 1) * batch // k)
    return model, opt, tinyres.tensor(x[part]), tinyres.tensor(y[part])


class Messages:
    """Wraps `tinyres.distributed`'s all_reduce and broadcast to count, size and time each call."""

    def __init__(self):
        from tinyres import distributed as dist
        self.dist, self.calls = dist, []
        self.all_reduce, self.broadcast = dist.all_reduce, dist.broadcast
        dist.all_reduce = self._timed(self.all_reduce, "all_reduce")
        dist.broadcast = self._timed(self.broadcast, "broadcast")

    def _timed(self, fn, kind):
        def timed(a, *args, **kw):
            t0 = time.perf_counter()
            out = fn(a, *args, **kw)
            self.calls.append((kind, int(getattr(a, "nbytes", 0)), time.perf_counter() - t0, a.shape, a.dtype))
            return out
        return timed

    def replay(self, repeats: int) -> float:
        """Seconds that the recorded messages of one step take sent back to back (the median of `repeats`)."""
        times = []
        for _ in range(repeats):
            arrays = [(kind, np.zeros(shape, dtype)) for kind, _, _, shape, dtype in self.calls]
            self.dist.barrier()
            t0 = time.perf_counter()
            for kind, a in arrays:
                (self.all_reduce if kind == "all_reduce" else self.broadcast)(a)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _child(args) -> None:
    """One configuration in this process: print a JSON line of its step times (and messages)."""
    from tinyres import distributed as dist
    from tinyres.run import train_step

    parallel = args.child == "ranks"
    if parallel:
        dist.init_process_group()
    model, opt, x, y = _step_setup(args.batch_size, parallel)
    for _ in range(args.warmup):
        train_step(model, opt, x, y)
    messages = Messages() if parallel else None
    steps = []
    for i in range(args.steps):
        if messages is not None:
            messages.calls = []
        t0 = time.perf_counter()
        train_step(model, opt, x, y)
        steps.append(time.perf_counter() - t0)
    out = {"steps": steps}
    if messages is not None:
        calls = messages.calls  # the last step's
        out.update(calls=[(kind, n) for kind, n, *_ in calls], in_step=sum(c[2] for c in calls),
                   grad_seconds=sum(c[2] for c in calls if c[1] > 2 ** 16), alone=messages.replay(20))
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)


def _run(config: str, args, batch: int | None = None, threads: int | None = None) -> dict:
    threads = threads or (1 if config == "ranks" else args.ranks)
    env = {**os.environ, "TINYRES_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(batch or args.batch_size)]
    if config == "ranks":
        cmd = [MPIEXEC, "-n", str(args.ranks), *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="K: ranks of 1 thread, against 1 process of K threads")
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cluster", type=int, nargs="*", default=[], metavar="P", help="ranks of the model on paper")
    ap.add_argument("--latency-us", type=float, default=30.0, help="the model's network latency (10 GbE: 30)")
    ap.add_argument("--bandwidth-gbs", type=float, default=1.2, help="the model's bandwidth, GB/s (10 GbE: 1.2)")
    ap.add_argument("--child", choices=["one", "ranks"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if not MPIEXEC:
        raise SystemExit("no mpiexec on PATH or beside python: pip install -e '.[mpi]'")
    k = args.ranks
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {platform.machine()} | "
          f"{os.cpu_count()} cores | Python {platform.python_version()} | NumPy {np.__version__} | "
          f"ResNet-20, global batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    runs: dict[str, list[dict]] = {"one": [], "ranks": []}
    for r in range(args.rounds):
        for config in (("one", "ranks") if r % 2 == 0 else ("ranks", "one")):
            runs[config].append(_run(config, args))
    ips = {c: args.batch_size / statistics.median([s for run in rs for s in run["steps"]]) for c, rs in runs.items()}
    ratios = [statistics.median(b["steps"]) and statistics.median(a["steps"]) / statistics.median(b["steps"])
              for a, b in zip(runs["one"], runs["ranks"])]
    print(f"1 process x {k} threads: {ips['one']:.0f} images/s")
    print(f"{k} ranks x 1 thread:     {ips['ranks']:.0f} images/s  ({ips['ranks'] / ips['one']:.2f}x; rounds: "
          + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    last = runs["ranks"][-1]
    n_reduce = [n for kind, n in last["calls"] if kind == "all_reduce"]
    n_bcast = [n for kind, n in last["calls"] if kind == "broadcast"]
    grads = [n for n in n_reduce if n > 2 ** 16]
    step = statistics.median([s for run in runs["ranks"] for s in run["steps"]])
    print(f"messages per step: {len(n_reduce)} all-reduces of {sum(n_reduce):,} bytes "
          f"({len(grads)} gradient bucket(s) of {sum(grads):,} bytes, {len(n_reduce) - len(grads)} batch-norm "
          f"sums of {sum(n_reduce) - sum(grads):,} bytes), {len(n_bcast)} broadcast(s) of {sum(n_bcast):,} bytes")
    in_step = statistics.median([run["in_step"] for run in runs["ranks"]])
    grad_s = statistics.median([run["grad_seconds"] for run in runs["ranks"]])
    alone = statistics.median([run["alone"] for run in runs["ranks"]])
    print(f"seconds per step in them: {1e3 * in_step:.1f} ms inside the step of {1e3 * step:.0f} ms "
          f"({100 * in_step / step:.1f} %, waiting for the slower rank included; gradients {1e3 * grad_s:.1f} ms), "
          f"{1e3 * alone:.2f} ms sent back to back alone")
    if args.cluster:
        cluster_model(args, len(n_reduce) - len(grads) + len(n_bcast) + 1, sum(grads))  # + the trainer's stop flags


def cluster_model(args, small: int, grad_bytes: int) -> None:
    """Print the model on paper of P one-core ranks (see the module's docstring)."""
    alpha, beta = args.latency_us * 1e-6, args.bandwidth_gbs * 1e9
    one = args.batch_size / statistics.median(_run("one", args, threads=1)["steps"])
    print(f"model: P ranks of one core, {args.latency_us:g} us latency, {args.bandwidth_gbs:g} GB/s; "
          f"{small} small messages and {grad_bytes:,} gradient bytes per step; one core alone: {one:.0f} images/s")
    print("| P | images per rank | compute s | messages s | step s | images/s | speed-up over one core |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for p in args.cluster:
        if args.batch_size % p:
            continue
        compute = statistics.median(_run("one", args, batch=args.batch_size // p, threads=1)["steps"])
        steps = math.ceil(math.log2(p))
        talk = small * 2 * steps * alpha + 2 * (p - 1) * alpha + 2 * (p - 1) / p * grad_bytes / beta
        step = compute + talk
        print(f"| {p} | {args.batch_size // p} | {compute:.4f} | {talk:.4f} | {step:.4f} | "
              f"{args.batch_size / step:.0f} | {args.batch_size / step / one:.1f}x |")


if __name__ == "__main__":
    main()
