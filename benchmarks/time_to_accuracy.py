"""Time to accuracy of finished runs: when each first beat 10 % test error (and the paper's figure), and where it ended.

    python benchmarks/time_to_accuracy.py runs/fast runs/torch-fast examples/results/paper/resnet-20

Reads each run folder's config.json and metrics.jsonl, as train_cifar.py writes them (and
examples/torch_reference.py with --out), and prints one markdown row per run: the framework, the
schedule, the final evaluation, and the iteration and wall time (the run's own clock, across
resumes, evaluations included) of its first evaluation below each target. A run that has not
ended says at which iteration it stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinyres.progress import hms
from tinyres.run import PAPER_TEST_ERROR, first_below
from tinyres.rundir import read_jsonl
from tinyres.train import model_name

TARGET = 0.10


def schedule_of(config: dict) -> str:
    """The lr schedule in a few words."""
    kind = config.get("lr_schedule", "multistep")
    if kind == "multistep":
        steps = " and ".join(f"{m:,}" for m in config.get("milestones", []) if m < config["iters"])
        return f"lr {config['lr']:g}, /10 at {steps}" if steps else f"lr {config['lr']:g}"
    return f"{kind} to lr {config['lr']:g}"


def row(folder: Path) -> list[str]:
    """One table row for the run in `folder`."""
    config = json.loads((folder / "config.json").read_text())
    history = read_jsonl(folder / "metrics.jsonl")
    if not history:
        raise SystemExit(f"time_to_accuracy.py: {folder}/metrics.jsonl holds no evaluation yet")
    net = model_name(config["depth"], config.get("plain", False), config.get("shortcut", "A"))
    last = history[-1]
    split = last.get("split", "test")
    iters = config["iters"]
    state = "" if last["iter"] >= iters else f" (at {last['iter']:,} of {iters:,})"
    paper = None if config.get("plain") or config.get("shortcut", "A") != "A" else PAPER_TEST_ERROR.get(config["depth"])

    def when(error: float | None) -> str:
        if error is None:
            return "–"
        first = first_below(history, error)
        return f"{first['iter']:,} it, {hms(first['elapsed'])}" if first else "not yet" if state else "never"

    return [str(folder), net, config.get("framework", "tinyres"),
            f"{schedule_of(config)}, {iters:,} it", f"{100 * last['test_err']:.2f} % {split}{state}",
            hms(last["elapsed"]), when(TARGET), f"{when(paper)}" + (f" ({100 * paper:.2f} %)" if paper else "")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (config.json and metrics.jsonl)")
    args = p.parse_args(argv)
    header = ["run", "net", "framework", "schedule", "last evaluation", "wall time",
              f"first below {100 * TARGET:g} %", "first below the paper's figure"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in args.runs:
        print("| " + " | ".join(row(folder)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
