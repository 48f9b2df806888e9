"""Validate tinyres on a GPU machine in under ten minutes, keeping every result as soon as it exists.

    PYTHONPATH=. python benchmarks/validate_gpu.py                  # writes to $OUT, else gpu-validation/
    PYTHONPATH=. python benchmarks/validate_gpu.py --device cpu     # a rehearsal of every step on the CPU, tiny

The steps, in this order, each in child processes under its own time limit (one that overruns
is recorded as timed out and the next step runs):

  env        Python, NumPy, CuPy, CUDA runtime and driver, the GPU and its memory; the first
             kernels with their compile time
  gpu_tests  python -m pytest tests/test_gpu.py with TINYRES_REQUIRE_GPU=1
  train      the README's training command for 300 iterations on --data, --resume to 400, then
             examples/predict.py on a test image taken from the archive
  benchmark  benchmarks/train_step.py --depth 20 56 against PyTorch, and the first step's time
             and peak memory in use
  suite      the whole test suite with TINYRES_REQUIRE_GPU=1; last, as the longest step, whose
             GPU tests have run already

Each step writes <out>/<step>.json (status passed/failed/timed_out, seconds, commands with exit
codes, figures) and <out>/<step>.log (the commands' output); <out>/summary.md is rewritten after
every step, so a run cut short still leaves what it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinyres.atomic import write_text  # after the path is set: this runs from a checkout
from tinyres.train import read_metrics

PY = sys.executable
LIMITS = {"env": 45, "gpu_tests": 100, "train": 130, "benchmark": 110, "suite": 150}  # seconds; 535 in all
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class StepFailed(Exception):
    """A step's command failed or its result is wrong."""


class StepTimedOut(Exception):
    """A step ran past its time limit."""


class Step:
    """Runs one step's commands one after another, all before one deadline, output to <out>/<name>.log."""

    def __init__(self, name: str, limit: float, out: Path, env: dict[str, str]):
        self.name, self.limit, self.env = name, limit, env
        self.deadline = time.monotonic() + limit
        self.log_path = out / f"{name}.log"
        self.commands: list[dict] = []

    def run(self, cmd: list[str], **env: str) -> str:
        """Run `cmd` from the repo root; return its output, or raise StepFailed / StepTimedOut."""
        record = {"command": shlex.join(cmd), "rc": None, "seconds": None}
        self.commands.append(record)
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:
            log.write(f"$ {record['command']}\n")
            log.flush()
            start = log.tell()
            # its own session, so that a timeout kills the command's children too (pytest's, train_step's)
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                record["rc"] = proc.wait(timeout=max(self.deadline - t0, 0.01))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepTimedOut(f"{self.limit:g} s limit reached during `{record['command']}`") from None
            finally:
                record["seconds"] = round(time.monotonic() - t0, 2)
        with open(self.log_path) as log:
            log.seek(start)
            output = log.read()
        if record["rc"] != 0:
            last = [line for line in output.splitlines() if line.strip()][-1:]  # pytest's tally, or the exception
            raise StepFailed(f"exit code {record['rc']} from `{record['command']}`: {''.join(last)}")
        return output


def result_line(output: str) -> dict:
    """The JSON after 'RESULT ' in a command's output."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise StepFailed("the command printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


# ---- the steps: each returns (figures, one-line result) or raises -------------------------------

ENV_PROBE = r"""
import json, platform, time
import numpy
r = {"python": platform.python_version(), "numpy": numpy.__version__}
for name in ("PIL", "matplotlib", "torch", "pytest", "hypothesis"):
    try:
        r[name] = __import__(name).__version__
    except ImportError:
        r[name] = None
t0 = time.perf_counter()
try:
    import cupy
    r["cupy"] = cupy.__version__
except Exception:  # gpu_status() below says why
    r["cupy"] = None
r["import_cupy_s"] = time.perf_counter() - t0
from tinyres.backend import gpu_status
t0 = time.perf_counter()
status = gpu_status()  # compiles and runs an add, a sum and a matmul
r.update(first_kernels_s=time.perf_counter() - t0, usable=status.usable, broken=status.broken, reason=status.reason)
if status.usable:
    runtime = cupy.cuda.runtime
    free, total = cupy.cuda.Device(0).mem_info
    r.update(cuda_runtime=runtime.runtimeGetVersion(), cuda_driver=runtime.driverGetVersion(),
             gpu=runtime.getDeviceProperties(0)["name"].decode(), memory_gib=total / 2**30, free_gib=free / 2**30)
print("RESULT " + json.dumps(r))
"""


def step_env(step: Step, args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    # an empty kernel cache, so that the first kernels' time includes their compilation
    r = result_line(step.run([PY, "-c", ENV_PROBE], CUPY_CACHE_DIR=str(work / "cold-cache-env")))
    if args.device == "cuda" and not r["usable"]:
        raise StepFailed(f"no usable GPU: {r['reason']}")
    if not r["usable"]:
        return r, f"Python {r['python']}, NumPy {r['numpy']}; no GPU: {r['reason']}"
    runtime, driver = (f"{v // 1000}.{v % 1000 // 10}" for v in (r["cuda_runtime"], r["cuda_driver"]))  # 13020: 13.2
    return r, (f"Python {r['python']}, NumPy {r['numpy']}, CuPy {r['cupy']}, CUDA {runtime} (driver {driver}), "
               f"{r['gpu']} {r['memory_gib']:.0f} GiB; "
               f"import cupy {r['import_cupy_s']:.1f} s, first kernels {r['first_kernels_s']:.2f} s")


def pytest_step(*paths: str):
    """A step that runs pytest on `paths` (all tests when none), with TINYRES_REQUIRE_GPU=1 on the GPU."""
    def step_pytest(step: Step, args: argparse.Namespace, work: Path) -> tuple[dict, str]:
        select = ["-k", args.select] if args.select else []
        output = step.run([PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *select, *paths],
                          **({"TINYRES_REQUIRE_GPU": "1"} if args.device == "cuda" else {}))
        summary = [line.strip("= ") for line in output.splitlines() if line.strip()][-1]  # "41 passed in 12.3s"
        return {"pytest": summary}, summary
    return step_pytest


def first_test_image(archive: Path, work: Path) -> Path:
    """The first test/<class>/<image> of an image-folder archive, extracted to `work`/<class>/."""
    with tarfile.open(archive) as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if member.isfile() and "test" in path.parts[:-2] and path.suffix.lower() in IMAGE_SUFFIXES:
                target = work / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                return target
    raise StepFailed(f"{archive} holds no test/<class>/<image> to classify")


def step_train(step: Step, args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    data = Path(args.data)
    if not data.is_file():
        raise StepFailed(f"no CIFAR-10 archive at {data}: copy cifar10-jpeg.tar.gz there or pass --data")
    run, (iters, more), batch = work / "run", args.train_iters, 128 if args.device == "cuda" else 8
    size = [] if args.device == "cuda" else ["--depth", "8", "--batch-size", str(batch)]
    step.run([PY, "examples/train_cifar.py", "--schedule", "short", "--data", str(data), "--out", str(run),
              "--iters", str(iters), "--eval-every", str(iters // 2), "--device", args.device, "--quiet", *size])
    step.run([PY, "examples/train_cifar.py", "--out", str(run), "--resume", "--iters", str(more), "--quiet"])
    image = first_test_image(data, work)
    prediction = step.run([PY, "examples/predict.py", str(run), str(image), "--device", args.device])
    rows = read_metrics(run)
    if not rows or rows[-1]["iter"] != more:
        raise StepFailed(f"the resumed run should end at iteration {more}; metrics.jsonl: {rows}")
    last = rows[-1]
    ips = more * batch / last["elapsed"]
    figures = {"metrics": rows, "images_per_s_with_evaluation": ips, "test_image_class": image.parent.name,
               "prediction": prediction.strip().splitlines()[-1]}
    return figures, (f"{more} iterations: train err {100 * last['train_err']:.1f}%, test err "
                     f"{100 * last['test_err']:.1f}%, {ips:.0f} img/s with evaluations; predict "
                     f"({image.parent.name}): {figures['prediction'].split(': ', 1)[-1]}")


FIRST_STEP = r"""
import json, sys, time
import numpy as np
import tinyres
from tinyres import models, optim
from tinyres.nn import functional as F
depth, batch, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tinyres.manual_seed(0)
model = models.cifar_resnet(depth).to(device)
opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
rng = np.random.default_rng(0)
x = tinyres.tensor(rng.standard_normal((batch, 3, 32, 32), dtype=np.float32), device=device)
y = tinyres.tensor(rng.integers(0, 10, batch), device=device)
def step():
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss.item()  # a copy to the host, queued after the update: waits for the GPU
    return time.perf_counter() - t0
r = {"depth": depth, "first_step_s": step(), "second_step_s": step()}
if device == "cuda":
    import cupy
    class Peak(cupy.cuda.MemoryHook):  # counts the pool's blocks in use during one step
        name = "Peak"
        def __init__(self):
            self.now = self.peak = cupy.get_default_memory_pool().used_bytes()
        def malloc_postprocess(self, **kw):
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)
        def free_postprocess(self, **kw):
            self.now -= kw["mem_size"]
    hook = Peak()
    with hook:
        step()
    r["peak_in_use_mb"] = hook.peak / 2**20
print("RESULT " + json.dumps(r))
"""


def step_benchmark(step: Step, args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    table = Path(args.out) / "train_step.json"
    step.run([PY, "benchmarks/train_step.py", "--device", args.device, "--depth", *map(str, args.bench_depths),
              "--steps", "10" if args.device == "cuda" else "1", "--rounds", "1", "--json", str(table)])
    rows = json.loads(table.read_text())
    missing = [d for d in args.bench_depths if not any(r["depth"] == d and r["framework"] == "tinyres" for r in rows)]
    if missing:
        raise StepFailed(f"train_step.py measured no tinyres step for depth {missing}; see the log")
    depth, batch = args.bench_depths[0], 128 if args.device == "cuda" else 8
    first = result_line(step.run([PY, "-c", FIRST_STEP, str(depth), str(batch), args.device],
                                 CUPY_CACHE_DIR=str(work / "cold-cache-first-step")))  # the first step compiles
    parts = []
    for d in args.bench_depths:
        ours = next(r for r in rows if r["depth"] == d and r["framework"] == "tinyres")
        torch = next((r for r in rows if r["depth"] == d and r["framework"] == "torch"), None)
        vs = f" vs PyTorch {torch['img_per_s']:.0f} ({ours['step_s'] / torch['step_s']:.1f}x its time)" if torch else ""
        parts.append(f"ResNet-{d} {ours['img_per_s']:.0f} img/s{vs}")
    peak = f", peak in use {first['peak_in_use_mb']:.0f} MB" if "peak_in_use_mb" in first else ""
    return ({"train_step": rows, "first_step": first},
            "; ".join(parts) + f"; first ResNet-{depth} step {first['first_step_s']:.1f} s "
                               f"(then {first['second_step_s']:.3f} s){peak}")


STEPS = {"env": step_env, "gpu_tests": pytest_step("tests/test_gpu.py"), "train": step_train,
         "benchmark": step_benchmark, "suite": pytest_step()}


# ---- running and recording --------------------------------------------------------------------

def run_step(name: str, args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    """Run step `name`, write <out>/<name>.json, and return what it wrote."""
    out = Path(args.out)
    step = Step(name, args.limits[name], out, env)
    t0 = time.monotonic()
    result = {"step": name, "status": "passed", "limit_s": step.limit, "figures": {}, "line": "", "error": None}
    try:
        result["figures"], result["line"] = STEPS[name](step, args, work)
    except StepTimedOut as e:
        result.update(status="timed_out", error=str(e))
    except Exception as e:  # noqa: BLE001 - any failure of a step is recorded and the next step runs
        result.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, StepFailed) else str(e))
    log = step.log_path.read_text(errors="replace") if step.log_path.exists() else ""
    result.update(seconds=round(time.monotonic() - t0, 2), commands=step.commands, output_tail=log[-3000:])
    write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    return result


def write_summary(args: argparse.Namespace, results: list[dict], started: str) -> None:
    lines = ["# tinyres GPU validation", "",
             f"Command: `{shlex.join([Path(PY).name, *sys.argv])}`  ", f"Started: {started}; device {args.device}", "",
             "| step | status | seconds (limit) | result |", "|---|---|---|---|"]
    done = {r["step"]: r for r in results}
    for name in args.steps:
        r = done.get(name)
        if r is None:
            lines.append(f"| {name} | not run yet | ({args.limits[name]:g}) | |")
        else:
            text = r["line"] if r["status"] == "passed" else r["error"]
            lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} ({r['limit_s']:g}) | "
                         f"{text.replace('|', '/')} |")
    lines += ["", "Each step's figures, commands and output: `<step>.json`, `<step>.log`."]
    write_text(Path(args.out) / "summary.md", "\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-validation",
                   help="folder for the results (default: $OUT, else gpu-validation/)")
    p.add_argument("--data", default=str(ROOT / "data" / "cifar10-jpeg.tar.gz"),
                   help="CIFAR-10 archive for the training step (default: data/cifar10-jpeg.tar.gz in the repo)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a rehearsal on the CPU with tiny sizes, no GPU required")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="steps to run, in order")
    p.add_argument("--select", default=None, help="pytest -k expression for both test steps (default: all tests)")
    p.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="change a step's time limit")
    args = p.parse_args(argv)
    args.limits = dict(LIMITS)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in LIMITS:
            p.error(f"--limit {item}: no step {name!r} (steps: {', '.join(LIMITS)})")
        args.limits[name] = float(seconds)
    args.steps = [s for s in STEPS if s in args.steps]
    args.train_iters = (300, 400) if args.device == "cuda" else (4, 6)
    args.bench_depths = [20, 56] if args.device == "cuda" else [8]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the steps; exit status 0 when every one passed."""
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tinyres-validate-") as tmp:
        work = Path(tmp)
        # the children import this checkout, and keep decoded data out of ~/.cache
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "XDG_CACHE_HOME": str(work / "cache")}
        env.pop("TINYRES_REQUIRE_GPU", None)
        write_summary(args, results, started)
        for name in args.steps:
            results.append(run_step(name, args, work, env))
            write_summary(args, results, started)
            print(f"{name}: {results[-1]['status']} in {results[-1]['seconds']:.1f} s", flush=True)
    print(f"results in {args.out}/summary.md")
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
