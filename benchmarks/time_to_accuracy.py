"""Time to accuracy of finished runs: when each first beat 10 % test error (and the paper's figure), and where it ended.

    python benchmarks/time_to_accuracy.py runs/fast runs/torch-fast examples/results/paper/resnet-20

Reads each run folder's config.json and metrics.jsonl, as train_cifar.py writes them (and
examples/torch_reference.py with --out), and prints one markdown row per run: the framework, the
schedule, the thread counts its evaluations record, the final evaluation, and the iteration and
wall time (the run's own clock, across resumes, evaluations included) of its first evaluation below
each target. A run that has not ended says at which iteration it stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinyres.progress import hms
from tinyres.run import TrainConfig, error_targets, first_below
from tinyres.rundir import read_jsonl
from tinyres.train import load_run_config, model_name


def schedule_of(config: TrainConfig) -> str:
    """The lr schedule in a few words."""
    if config.lr_schedule == "multistep":
        steps = " and ".join(f"{m:,}" for m in config.milestones if m < config.iters)
        return f"lr {config.lr:g}, /10 at {steps}" if steps else f"lr {config.lr:g}"
    return f"{config.lr_schedule} to lr {config.lr:g}"


def row(folder: Path) -> list[str]:
    """One table row for the run in `folder`."""
    config = load_run_config(folder)
    framework = json.loads((folder / "config.json").read_text()).get("framework", "tinyres")
    history = read_jsonl(folder / "metrics.jsonl")
    if not history:
        raise SystemExit(f"time_to_accuracy.py: {folder}/metrics.jsonl holds no evaluation yet")
    last = history[-1]
    state = "" if last["iter"] >= config.iters else f" (at {last['iter']:,} of {config.iters:,})"
    ended = f"{100 * last['test_err']:.2f} % {last.get('split', 'test')}{state}"
    threads = ", ".join(str(n) for n in sorted({r["threads"] for r in history if "threads" in r})) or "–"
    ten, *paper = error_targets(config)  # 10 %, and the paper's figure for the net where it gives one

    def when(error: float) -> str:
        first = first_below(history, error)
        return f"{first['iter']:,} it, {hms(first['elapsed'])}" if first else "not yet" if state else "never"

    return [str(folder), model_name(config.depth, config.plain, config.shortcut), framework, threads,
            f"{schedule_of(config)}, weight decay {config.weight_decay:g}, {config.iters:,} it", ended,
            hms(last["elapsed"]), when(ten),
            f"{when(paper[0])} ({100 * paper[0]:.2f} %)" if paper else "–"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (config.json and metrics.jsonl)")
    args = p.parse_args(argv)
    header = ["run", "net", "framework", "threads", "schedule", "last evaluation", "wall time",
              "first below 10 %", "first below the paper's figure"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in args.runs:
        print("| " + " | ".join(row(folder)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
