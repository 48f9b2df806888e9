"""Reproduce the CIFAR-10 comparison of He et al. (2015): train several nets, tabulate, plot Figure 6.

    python examples/reproduce.py --data ../shared/data/cifar10-jpeg.tar.gz --out runs/reproduce
    python examples/reproduce.py --nets plain-20 resnet-20 resnet-110 --schedule paper --device cuda

Each net trains into its own directory under --out; finished runs are skipped and unfinished
ones resumed, so the command can be interrupted and started again. Writes results.md (a table
with the paper's Table 6 test errors beside ours) and fig6.png; for Figure 7, run
`examples/layer_responses.py` on the run directories. Nets can also train in separate
processes (one `--nets` each, same --out); `--report` then tabulates and plots the finished
runs without training. Under `mpiexec -n K` each net trains on K processes (see train_cifar.py);
rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for cli and plot_curves

import cli

from tinyres import distributed
from tinyres.atomic import write_text
from tinyres.data import CIFAR10
from tinyres.run import PAPER_TEST_ERROR
from tinyres.train import (
    SCHEDULES,
    TrainConfig,
    build_model,
    count_parameters,
    default_eval_every,
    first_below,
    model_name,
    read_metrics,
    train,
)

DEFAULT_NETS = ("plain-20", "plain-56", "resnet-20", "resnet-56")


def parse_net(spec: str) -> tuple[int, bool, str]:
    """(depth, plain, shortcut) from a name like 'plain-20', 'resnet-56' or 'resnet-56-b'."""
    m = re.fullmatch(r"(plain|resnet)-?(\d+)(?:-([abc]))?", spec.strip().lower())
    if not m or (m.group(1) == "plain" and m.group(3)):
        raise argparse.ArgumentTypeError(f"bad net {spec!r}: use plain-N, resnet-N or resnet-N-b / resnet-N-c")
    return int(m.group(2)), m.group(1) == "plain", (m.group(3) or "a").upper()


def machine() -> str:
    """A short description of this machine (CPU model and count; the GPU on 'cuda')."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


def gpu_name() -> str:
    """The name of GPU 0 as CuPy reports it."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of results: one row per net, the paper's Table 6 value beside ours."""
    header = ("| net | params | iterations | training error (%) | test error (%) | paper (Table 6) (%) "
              "| first below 10 % (iteration, time) | wall time |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = PAPER_TEST_ERROR.get(r["depth"]) if not r["plain"] and r["shortcut"] == "A" else None
        below = first_below(r["history"], 0.10)
        reached = "—" if below is None else f"{below['iter']:,} ({_hms(below['elapsed'])})"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['iterations']:,} | {100 * r['train_err']:.2f} | "
                     f"{100 * r['test_err']:.2f} | {'—' if paper is None else f'{100 * paper:.2f}'} | "
                     f"{reached} | {_hms(r['elapsed'])} |")
    return "\n".join(lines) + "\n"


def finished_run(run_dir: Path, depth: int, plain: bool, shortcut: str, iters: int) -> dict[str, Any]:
    """The final metrics of the finished run in `run_dir`, as `train` returns them, without training."""
    name = model_name(depth, plain, shortcut)
    history = read_metrics(run_dir)
    if not history or history[-1]["iter"] != iters:
        done = f"its log ends at iteration {history[-1]['iter']:,}" if history else "it has no metrics.jsonl"
        raise cli.UsageError(f"--report: {run_dir} is not a finished {iters:,}-iteration run of {name} ({done}); "
                         "train it first (the same command without --report)")
    n_params = count_parameters(build_model(depth, plain, shortcut))
    return {**history[-1], "name": name, "iterations": iters, "params": n_params, "out": str(run_dir),
            "history": history}


def run_folder_name(depth: int, plain: bool, shortcut: str) -> str:
    """The subfolder of --out that a net trains into: 'plain-20', 'resnet-56', 'resnet-56-b'."""
    return model_name(depth, plain, shortcut).lower().replace(" ", "").replace("(", "-").replace(")", "")


def train_all(configs: list[TrainConfig], data: CIFAR10) -> list[dict[str, Any]] | None:
    """Train (or resume, or skip when finished) each run in turn: their final metrics; None after Ctrl-C."""
    rows = []
    for config in configs:
        name = model_name(config.depth, config.plain, config.shortcut)
        shape = (f"one cycle of the lr up to {config.lr:g}" if config.lr_schedule == "onecycle"
                 else f"lr /10 at {', '.join(map(str, config.milestones))}" if config.lr_schedule == "multistep"
                 else f"{config.lr_schedule} lr from {config.lr:g}")
        if distributed.get_rank() == 0:
            print(f"== {name}: {config.iters:,} iterations, {shape} -> {config.out}", file=sys.stderr)
        try:
            result = train(config, data=data)
        except KeyboardInterrupt as e:  # the run saved a checkpoint: running this again resumes it
            print(f"\n{e}" if str(e) else "\ninterrupted", file=sys.stderr)
            return None
        except OSError as e:  # the data is loaded: what fails now is reading or writing the run
            raise cli.UsageError(f"--out {config.out}: {cli.describe(e)}") from e
        rows.append({**result, "depth": config.depth, "plain": config.plain, "shortcut": config.shortcut})
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line: which nets, how long, where."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--nets", nargs="+", type=parse_net, default=[parse_net(n) for n in DEFAULT_NETS],
                   metavar="NET", help=f"nets to train (default: {' '.join(DEFAULT_NETS)})")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="short",
                   help="paper: 64k iterations (lr /10 at 32k, 48k); short: 2k (/10 at 1.5k, 1.9k); fast: 15k, one "
                        "cycle of the lr (see train_cifar.py --help)")
    p.add_argument("--iters", type=int, default=None,
                   help="total iterations; the schedule's lr milestones scale with it (the paper's: to 50%% and "
                        "75%% of the run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-split", action="store_true", help="evaluate on 5k images held out from training")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--data", default=None, help="CIFAR-10 archive (default: $TINYRES_DATA, else download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=None,
                   help="iterations between evaluations (default: 500, or 1000 on the paper's 64k; at most the run)")
    p.add_argument("--out", default="runs/reproduce", help="one subdirectory per net, results.md and fig6.png")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tabulate and plot the finished runs under --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: train each net (skipping finished runs), then write results.md and fig6.png."""
    args = build_parser().parse_args(argv)
    cli.join_mpi_job()

    cli.check_at_least(1, iters=args.iters, batch_size=args.batch_size, eval_every=args.eval_every)
    for depth, plain, shortcut in args.nets:
        cli.check_depth(depth, f"--nets {model_name(depth, plain, shortcut)}")
    cli.require("matplotlib", "plot", "drawing fig6.png")
    settings = cli.schedule_settings(args.schedule, args.iters)
    iters = settings["iters"]
    eval_every = args.eval_every if args.eval_every is not None else default_eval_every(iters)
    out = Path(args.out)
    runs = [(depth, plain, shortcut, out / run_folder_name(depth, plain, shortcut))
            for depth, plain, shortcut in args.nets]
    if args.report:
        data = None
        rows = [{**finished_run(run_dir, depth, plain, shortcut, iters), "depth": depth, "plain": plain,
                 "shortcut": shortcut} for depth, plain, shortcut, run_dir in runs]
    else:
        configs = [TrainConfig(depth=depth, plain=plain, shortcut=shortcut, **settings, batch_size=args.batch_size,
                               val_split=args.val_split, device=args.device,
                               seed=args.seed, out=str(run_dir), resume=True, eval_every=eval_every,
                               progress=not args.quiet)
                   for depth, plain, shortcut, run_dir in runs]
        for config in configs:
            cli.check_config(config)
        cli.check_writable_folder(out, "--out")
        data = cli.load_data(args.data)
        cli.check_data_fits(configs[0], len(data.train_images))
        with cli.removed_if_left_empty(out):
            rows = train_all(configs, data)
        if rows is None:
            return 130
    if distributed.get_rank() != 0:
        return 0
    command = " ".join(["python examples/reproduce.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    text = results_markdown(args, iters, rows, data, command)
    write_text(out / "results.md", text)
    from plot_curves import plot_curves  # imports matplotlib: only once there is something to draw

    fig = plot_curves([run_dir for *_, run_dir in runs], out / "fig6.png")
    print(text)
    print(f"wrote {out / 'results.md'} and {fig}", file=sys.stderr)
    return 0


def results_markdown(args: argparse.Namespace, iters: int, rows: list[dict[str, Any]], data: CIFAR10 | None,
                     command: str) -> str:
    """results.md: the table of `rows`, how its errors were measured, and where they come from."""
    split = rows[0].get("split", "test") if rows else "test"
    evaluated = (f"{TrainConfig().val_size:,} validation images held out from training" if split == "val"
                 else f"{len(data.test_images) if data else 10_000:,} test images")
    if args.report:
        provenance = (f"Tabulated from the finished runs' logs (`{command}`) on {machine()}. Each run's "
                      "config.json holds its command-line settings and data path.")
    else:
        device = f"GPU: {gpu_name()}" if args.device == "cuda" else "CPU only"
        provenance = f"Command: `{command}`  \nMachine: {machine()}; {device}.  \nData: {data.source}"
    return (f"# CIFAR-10: plain nets and ResNets ({args.schedule} schedule, {iters:,} iterations)\n\n"
            + results_table(rows)
            + "\nTraining error: mean over the last evaluation interval (augmented batches). "
            f"Test error: on the {evaluated}. The paper trains 64k iterations on the original lossless "
            "CIFAR-10; a shorter schedule or a lossy (JPEG) copy of the data gives higher errors, so compare "
            f"trends, not digits.\n\n{provenance}\n\n![Figure 6](fig6.png)\n")


if __name__ == "__main__":
    sys.exit(cli.run(main))
