"""Time a full ResNet training step (forward, loss, backward, SGD update) in tinyres and, when
it is importable, in PyTorch with the same network and recipe.

    python benchmarks/train_step.py                       # ResNet-20 and -56, CPU, batch 128
    python benchmarks/train_step.py --depth 20 --rounds 8 --threads 2   # the spread over 8 processes
    python benchmarks/train_step.py --depth 20 --device cuda

Each (framework, depth, thread count) is measured in its own fresh process, as a user runs one,
so peak memory (RSS on the CPU, memory-pool bytes on the GPU) belongs to that measurement alone;
the configurations alternate over `--rounds` rounds so that drift in machine load hits all alike.
Reported: the median step over all processes, the spread of the per-process medians, the
slowest process against the median one (a program fast in one process and slow in the next has
a bug), and against PyTorch both the ratio of the median steps and the median (and range) of
each round's ratio, its tinyres process against its PyTorch process. tinyres runs with each
`--threads` count (default: all cores, then one); PyTorch with its own default (all cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()


def measure_tinyres(depth: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    import tinyres
    from tinyres import models, optim
    from tinyres.nn import functional as F

    tinyres.nn.init.manual_seed(0)
    model = models.cifar_resnet(depth).to(device)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = tinyres.tensor(rng.standard_normal((batch, 3, 32, 32), dtype=np.float32), device=device)
    y = tinyres.tensor(rng.integers(0, 10, batch), device=device)
    fwd, bwd = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    dtypes = sorted({str(p.grad.dtype) for p in model.parameters()} | {str(loss.dtype)})
    return {"fwd": fwd, "bwd": bwd, "dtypes": dtypes, **_memory(device, "tinyres")}


def _torch_resnet(depth: int):
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.extra = cout - cin

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            if self.extra:  # option A: subsample and zero-pad the channels
                x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(out + x)

    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for k in range(n):
            layers.append(Block(cin, cout, stride if k == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    for m in layers:
        for p in m.modules():
            if isinstance(p, nn.Conv2d):
                nn.init.kaiming_normal_(p.weight, nonlinearity="relu")
    return nn.Sequential(*layers)


def measure_torch(depth: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _torch_resnet(depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fwd, bwd = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    mem = _memory(device, "torch")
    return {"fwd": fwd, "bwd": bwd, "dtypes": [str(loss.dtype).replace("torch.", "")],
            "threads": torch.get_num_threads(), "version": torch.__version__, **mem}


def _memory(device: str, framework: str) -> dict:
    if device == "cuda":
        if framework == "torch":
            import torch
            return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
        import cupy
        return {"peak_mb": cupy.get_default_memory_pool().total_bytes() / 2**20}
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(args) -> None:
    if args.root:  # another checkout of tinyres, e.g. an older revision to compare with
        sys.path.insert(0, args.root)
    fn = measure_torch if args.framework == "torch" else measure_tinyres
    out = fn(args.depth[0], args.batch_size, args.steps, args.warmup, args.device)
    if args.framework != "torch":
        import tinyres
        out["threads"] = tinyres.get_num_threads() if hasattr(tinyres, "get_num_threads") else None
        out["tinyres"] = str(Path(tinyres.__file__).parent)
    print("RESULT " + json.dumps(out))


def _run_child(framework: str, threads: int | None, depth: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--framework", framework, "--depth", str(depth),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device]
    if framework.startswith("tinyres@"):
        cmd += ["--root", framework.split("@", 1)[1]]
    env = {**os.environ, **({"TINYRES_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {framework} ResNet-{depth} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def blas_kernel() -> str:
    """NumPy's BLAS and the CPU kernel it runs (OPENBLAS_CORETYPE, when set, forces an older one)."""
    from threadpoolctl import threadpool_info
    info = next((i for i in threadpool_info() if i["user_api"] == "blas"), {})
    forced = f", OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" if "OPENBLAS_CORETYPE" in os.environ else ""
    return f"{info.get('internal_api', '?')} {info.get('version', '')} {info.get('architecture', '')}{forced}".strip()


def _have_torch() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration, alternating")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="tinyres thread counts to time (default: all cores, then 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--baseline", metavar="PATH", help="also time the tinyres of this checkout (e.g. an older "
                    "revision: git worktree add PATH REV), at its own thread setting")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--framework", default="tinyres", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or ([cores, 1] if args.device == "cpu" and cores > 1 else [cores])
    configs = [("tinyres", t) for t in (threads if args.device == "cpu" else [None])]
    configs += [(f"tinyres@{Path(args.baseline).resolve()}", None)] if args.baseline else []
    configs += [] if args.no_torch or not _have_torch() else [("torch", None)]
    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{cores} cores | Python {platform.python_version()} | NumPy {np.__version__} ({blas_kernel()}) | "
          f"device {args.device} | batch {args.batch_size} | {args.rounds} processes each")
    rows = []
    for depth in args.depth:
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for i in range(args.rounds):
            for c in configs:
                r = _run_child(*c, depth, args)
                if r:
                    runs[c].append({**r, "round": i})
        rows += [_summary(depth, framework, rs, args.batch_size) for (framework, _), rs in runs.items() if rs]
    _print_table(rows, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _summary(depth: int, framework: str, runs: list[dict], batch: int) -> dict:
    """One table row from the processes of one configuration."""
    steps = [a + b for r in runs for a, b in zip(r["fwd"], r["bwd"])]
    per_process = [statistics.median(a + b for a, b in zip(r["fwd"], r["bwd"])) for r in runs]
    step = statistics.median(steps)
    return {"depth": depth, "framework": framework, "threads": runs[0].get("threads"),
            "fwd_s": statistics.median(t for r in runs for t in r["fwd"]),
            "bwd_s": statistics.median(t for r in runs for t in r["bwd"]), "step_s": step,
            "process_step_s": per_process, "rounds": [r["round"] for r in runs],
            "slowest_over_median": max(per_process) / statistics.median(per_process),
            "img_per_s": batch / step, "peak_mb": max(r["peak_mb"] for r in runs),
            "dtypes": runs[0]["dtypes"], "version": runs[0].get("version", ""), "tinyres": runs[0].get("tinyres")}


def round_ratios(row: dict, ref: dict) -> list[float]:
    """Each round's tinyres process against the PyTorch process of the same round: pairs taken
    minutes apart drift with the machine less than the medians of all rounds do."""
    torch_step = dict(zip(ref["rounds"], ref["process_step_s"]))
    return [s / torch_step[i] for i, s in zip(row["rounds"], row["process_step_s"]) if i in torch_step]


def _print_table(rows: list[dict], device: str) -> None:
    mem = "peak RSS MB" if device == "cpu" else "peak pool MB"
    print(f"| net | framework | threads | forward s | backward+update s | step s | processes' steps s | "
          f"slowest / median | images/s | {mem} | dtypes | vs PyTorch | rounds vs PyTorch: median (range) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if q["depth"] == r["depth"] and q["framework"] == "torch"), None)
        mine = ref is not None and r["framework"].startswith("tinyres")  # this checkout or --baseline's
        ratio = f"{r['step_s'] / ref['step_s']:.2f}x" if mine else ""
        paired = round_ratios(r, ref) if mine else []
        paired_text = f"{statistics.median(paired):.2f}x ({min(paired):.2f}–{max(paired):.2f})" if paired else ""
        name = r["framework"] + (f" {r['version']}" if r["version"] else "")
        spread = f"{min(r['process_step_s']):.3f}–{max(r['process_step_s']):.3f}"
        print(f"| ResNet-{r['depth']} | {name} | {r['threads'] or ''} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | "
              f"{r['step_s']:.3f} | {spread} | {r['slowest_over_median']:.2f} | {r['img_per_s']:.0f} | "
              f"{r['peak_mb']:.0f} | {','.join(r['dtypes'])} | {ratio} | {paired_text} |")


if __name__ == "__main__":
    main()
