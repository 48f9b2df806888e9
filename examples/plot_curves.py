"""Figure 6 of He et al. (2015): training and test error of plain nets and ResNets on CIFAR-10.

    python examples/plot_curves.py runs/plain20 runs/plain56 runs/r20 runs/r56 --out fig6.png

Each argument is a run directory written by `train_cifar.py`. As in the paper, thin dashed lines are
training error, drawn densely from train_log.jsonl (one point per `log_every` iterations; runs
older than that file fall back to the training error of each evaluation in metrics.jsonl), and
bold lines are test error from metrics.jsonl; one colour per depth (two runs of the same net get
two colours and their folder names); plain nets on the left, ResNets on the right (a panel only
where there are runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for cli

import cli

from tinyres.train import read_metrics, read_train_log

# one colour per depth, close to the paper's figure
DEPTH_COLORS = {20: "#f0a30a", 32: "#1f77b4", 44: "#2ca02c", 56: "#d62728", 110: "#000000", 1202: "#9467bd"}
FALLBACK_COLORS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's label, depth, plain flag, evaluation rows and (possibly empty) dense training rows."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise cli.UsageError(f"{run_dir}: not a training run (no config.json); give the folders train_cifar.py wrote")
    config = json.loads((run_dir / "config.json").read_text())
    depth, plain = int(config["depth"]), bool(config.get("plain", False))
    shortcut = str(config.get("shortcut", "A")).upper()
    label = f"plain-{depth}" if plain else f"ResNet-{depth}" + ("" if shortcut == "A" else f" ({shortcut})")
    return {"label": label, "depth": depth, "plain": plain, "rows": read_metrics(run_dir),
            "train_rows": read_train_log(run_dir), "dir": str(run_dir)}


def training_curve(run: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(iterations, training error %): the dense log when the run has one, else the evaluation rows."""
    rows = run["train_rows"] or run["rows"]
    return [r["iter"] for r in rows], [100 * r["train_err"] for r in rows]


def label_and_color_runs(runs: list[dict[str, Any]]) -> None:
    """Give each run its "label" and "color": one colour per depth, as in the paper, and runs that would
    look alike (the same net twice in a panel) another colour and their folder in the label."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    spare = iter(FALLBACK_COLORS * len(runs))
    taken: set[tuple[bool, str]] = set()
    for r in runs:
        if counts[r["label"]] > 1:
            r["label"] += f" ({Path(r['dir']).name})"
        color = DEPTH_COLORS.get(r["depth"]) or next(spare)
        while (r["plain"], color) in taken:
            color = next(spare)
        taken.add((r["plain"], color))
        r["color"] = color


def figure_6(run_dirs: list[str | Path], ymax: float | None = None) -> Any:
    """The matplotlib Figure of Figure 6: a panel for the plain nets and one for the ResNets (only those with runs)."""
    # The object-oriented Figure renders PNGs with the Agg backend and never touches pyplot's
    # global state or a display, so this runs on headless machines and inside other programs.
    from matplotlib.figure import Figure

    runs = sorted((load_run(d) for d in run_dirs), key=lambda r: (r["depth"], r["label"]))
    runs = [r for r in runs if r["rows"]]
    if not runs:
        raise cli.UsageError("none of the runs has an evaluation in metrics.jsonl yet: nothing to plot")
    label_and_color_runs(runs)
    panels = [plain for plain in (True, False) if any(r["plain"] == plain for r in runs)]
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    top = 0.0
    for ax, plain in zip(axes, panels):
        group = [r for r in runs if r["plain"] == plain]
        for r in group:
            train_its, train_err = training_curve(r)
            test_its, test_err = [row["iter"] for row in r["rows"]], [100 * row["test_err"] for row in r["rows"]]
            ax.plot(train_its, train_err, "--", color=r["color"], linewidth=0.7)
            ax.plot(test_its, test_err, "-", color=r["color"], linewidth=2.2, label=r["label"])
            top = max(top, *train_err, *test_err)
        split = group[0]["rows"][-1].get("split", "test")
        ax.set_title("plain networks" if plain else "residual networks (ResNets)")
        ax.set_xlabel("iterations")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=9, title=f"dashed: training, bold: {split}", title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, ymax if ymax is not None else min(100.0, max(20.0, 1.05 * top)))
    fig.tight_layout()
    return fig


def plot_curves(run_dirs: list[str | Path], out: str | Path = "fig6.png", ymax: float | None = None) -> Path:
    """Draw Figure 6 (error % vs iterations; plain | ResNet panels) from run dirs into PNG `out`."""
    return cli.save_figure(figure_6(run_dirs, ymax), out)


def main(argv: list[str] | None = None) -> int:
    """Command line: run dirs in, PNG out."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("runs", nargs="+", help="run directories holding config.json, metrics.jsonl and train_log.jsonl")
    p.add_argument("--out", default="fig6.png", help="the PNG to write")
    p.add_argument("--ymax", type=float, default=None, help="top of the error axis in %% (default: fit the data)")
    args = p.parse_args(argv)
    cli.require("matplotlib", "plot", "plot_curves.py")
    path = plot_curves(args.runs, args.out, args.ymax)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
