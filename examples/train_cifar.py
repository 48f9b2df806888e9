"""Train a CIFAR-10 ResNet (or plain net) of He et al. (2015) with tinyres.

    python examples/train_cifar.py --schedule short --data ../shared/data/cifar10-jpeg.tar.gz --out runs/r20
    python examples/train_cifar.py --depth 110 --device cuda --out runs/r110      # the paper's 64k iterations
    python examples/train_cifar.py --out runs/r110 --resume

Ctrl-C saves a checkpoint; `--resume` continues exactly where the run stopped, with the settings
saved in the run's config.json. Flags given with --resume change them from there on and are recorded
in config.json (e.g. --iters, --lr, --milestones, --data); those that would change the run's network,
batches, split or warm-up (--depth, --plain, --shortcut, --batch-size, --seed, --val-split, --warmup)
are refused.

    mpiexec -n 2 python examples/train_cifar.py --schedule short --out runs/r20-mpi2   # pip install -e '.[mpi]'

trains the same run in 2 processes, each on half of every batch of 128 (README: several processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cli

from tinyres import distributed
from tinyres.progress import hms
from tinyres.run import LR_SCHEDULES, ResumeError
from tinyres.train import (
    SCHEDULES,
    DivergenceError,
    TrainConfig,
    default_eval_every,
    error_targets,
    first_below,
    load_run_config,
    model_name,
    train,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per TrainConfig field that people change."""
    d = TrainConfig()
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--depth", type=int, default=d.depth, help="6n+2 layers: 20, 32, 44, 56, 110, 1202 (%(default)s)")
    p.add_argument("--plain", action="store_true", help="a plain net: no shortcut connections")
    p.add_argument("--shortcut", choices=["A", "B", "C"], default=d.shortcut, type=str.upper,
                   help="A: identity, zero-padded where shapes change; B: projections there; C: all projections "
                        "(%(default)s)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="paper",
                   help="paper: 64k iterations, lr /10 at 32k and 48k; short: 2k, /10 at 1.5k and 1.9k; fast: 15k, "
                        "one cycle of the lr up to 0.2 and down, Nesterov, weight decay 5e-4 (%(default)s); "
                        "flags below override a schedule's settings")
    p.add_argument("--iters", type=int, default=None,
                   help="total iterations (overrides --schedule); the schedule's lr milestones scale with it, "
                        "e.g. the paper's to 50%% and 75%% of the run, unless --milestones is given (with --resume "
                        "the run's milestones are kept: those already passed cannot move)")
    p.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="iterations at which the lr is divided by 10, at most --iters (overrides --schedule)")
    p.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=None,
                   help="multistep: /10 at each milestone; onecycle: PyTorch's OneCycleLR peaking at --lr; cosine: a "
                        "linear rise over --pct-start of the run, then half a cosine to 0 (default: the schedule's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate; onecycle: its peak (paper: 0.1)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum; onecycle: the highest of its cycle (paper: 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (paper: 1e-4)")
    p.add_argument("--pct-start", type=float, default=None, help="onecycle, cosine: the part of the run the lr rises")
    p.add_argument("--anneal-strategy", choices=["cos", "linear"], default=None, help="onecycle: the curve's shape")
    p.add_argument("--div-factor", type=float, default=None,
                   help=f"onecycle, cosine: the lr starts at --lr / this ({d.div_factor:g})")
    p.add_argument("--final-div-factor", type=float, default=None,
                   help=f"onecycle: the lr ends at --lr / --div-factor / this ({d.final_div_factor:g})")
    p.add_argument("--base-momentum", type=float, default=None,
                   help=f"onecycle: the lowest momentum of its cycle ({d.base_momentum})")
    p.add_argument("--cycle-momentum", action=argparse.BooleanOptionalAction, default=None,
                   help="onecycle: cycle the momentum against the lr (on)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per iteration (%(default)s)")
    p.add_argument("--warmup", choices=["auto", "on", "off"], default="auto",
                   help="lr 0.01 until the training error is below 80%% (auto: for depth >= 110)")
    p.add_argument("--no-augment", action="store_true", help="no pad/crop/flip augmentation")
    p.add_argument("--val-split", action="store_true", help="train on 45k images, evaluate on 5k held out")
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device, help="(%(default)s)")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 archive or folder (default: $TINYRES_DATA, else the download cache)")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, data order and augmentation (%(default)s)")
    p.add_argument("--out", default=d.out,
                   help="run directory for config.json, metrics.jsonl, checkpoint.npz (%(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--eval-every", type=int, default=None,
                   help="iterations between evaluations (default: 1000 for 64k iterations, 500 for shorter runs)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="iterations between checkpoints (default: every 10 minutes, and at the end)")
    p.add_argument("--prefetch", type=int, default=d.prefetch,
                   help="batches prepared ahead in a background thread (%(default)s)")
    p.add_argument("--no-sync-bn", action="store_true",
                   help="under mpiexec: batch statistics of each process's images alone, not of the whole batch")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


# flags that override a field of the --schedule preset when given (None: not given)
PRESET_FLAGS = ("lr_schedule", "lr", "momentum", "nesterov", "weight_decay", "pct_start", "anneal_strategy",
                "div_factor", "final_div_factor", "base_momentum", "cycle_momentum")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed flags describe (--iters, --milestones and the lr flags override --schedule)."""
    settings = cli.schedule_settings(args.schedule, args.iters, args.milestones)
    settings.update({f: getattr(args, f) for f in PRESET_FLAGS if getattr(args, f) is not None})
    return TrainConfig(
        depth=args.depth, plain=args.plain, shortcut=args.shortcut, **settings, batch_size=args.batch_size,
        warmup={"auto": None, "on": True, "off": False}[args.warmup], augment=not args.no_augment,
        val_split=args.val_split, device=args.device, data_path=args.data, seed=args.seed, out=args.out,
        resume=args.resume, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every if args.eval_every is not None else default_eval_every(settings["iters"]),
        prefetch=args.prefetch, progress=not args.quiet, sync_bn=not args.no_sync_bn)


# the TrainConfig fields that each flag sets, where they differ from the flag's name
FLAG_FIELDS = {"schedule": ("iters", "milestones", *PRESET_FLAGS), "no_augment": ("augment",), "data": ("data_path",),
               "quiet": ("progress",), "no_sync_bn": ("sync_bn",)}


def resume_config(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> TrainConfig:
    """The config saved in --out, changed only where a flag was given: `--out DIR --resume` is enough."""
    for action in parser._actions:  # parse again with no defaults, to see which flags were given
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    given.pop("debug", None)
    requested = config_from_args(args)
    changes = {f: getattr(requested, f) for flag in given for f in FLAG_FIELDS.get(flag, (flag,))}
    try:
        saved = load_run_config(args.out)
    except (ValueError, TypeError) as e:
        raise cli.UsageError(f"{Path(args.out) / 'config.json'}: not a run config ({e}); repair it or choose "
                             "another --out") from e
    refuse_fixed_changes(saved, changes, args.out)
    return dataclasses.replace(saved, **{**changes, "out": args.out, "resume": True})


# what a resumed run keeps: its network, and what fixes its batches, its evaluation set and its kind of schedule
KEPT_ON_RESUME = ("depth", "plain", "shortcut", "batch_size", "seed", "val_split", "warmup")


def refuse_fixed_changes(saved: TrainConfig, changes: dict[str, Any], out: str) -> None:
    """Raise UsageError, in one line, for a flag given with --resume that would change what a run keeps."""
    changed = [f for f in KEPT_ON_RESUME if f in changes and changes[f] != getattr(saved, f)]
    if changed:
        flags = ", ".join(f"--{f.replace('_', '-')} ({getattr(saved, f)!r} in the run, {changes[f]!r} given)"
                          for f in changed)
        raise cli.UsageError(f"{flags}: {out} holds a run of {model_name(saved.depth, saved.plain, saved.shortcut)} "
                             "that keeps its network, batch size, seed, validation split and warm-up when resumed; "
                             "leave the flag out, or start a new run with another --out")


def check_start(config: TrainConfig) -> None:
    """Raise UsageError for flags that cannot start a run, before any data is read."""
    cli.check_config(config)
    out = Path(config.out)
    cli.check_writable_folder(out, "--out")
    if (out / "checkpoint.npz").exists() and not config.resume:
        raise cli.UsageError(f"--out {out} already holds a run (checkpoint.npz): add --resume to continue it, "
                             "or choose another --out")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print the final error; exit status 130 after Ctrl-C, 143 after SIGTERM, 1 on divergence."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.join_mpi_job()
    if args.resume and (Path(args.out) / "config.json").exists():
        config = resume_config(parser, argv, args)
    else:
        config = config_from_args(args)
    check_start(config)
    data = cli.load_data(config.data_path)
    cli.check_data_fits(config, len(data.train_images))
    try:
        with cli.removed_if_left_empty(Path(config.out)):
            result = train(config, data=data)
    except KeyboardInterrupt as e:
        print(f"\n{e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports
    except DivergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ResumeError as e:
        raise cli.UsageError(str(e)) from e
    except OSError as e:  # the data is loaded: what fails now is reading or writing the run in --out
        raise cli.UsageError(f"--out {config.out}: {cli.describe(e)}") from e
    if "test_err" in result and distributed.get_rank() == 0:
        print(f"{result['name']}: {result['iterations']} iterations, train error {100 * result['train_err']:.2f}%, "
              f"{result['split']} error {100 * result['test_err']:.2f}% (out: {result['out']})")
        for error in error_targets(config):
            row = first_below(result["history"], error)
            if row is not None:
                print(f"{result['split']} error first below {100 * error:.2f}% at iteration {row['iter']:,}, "
                      f"{hms(row['elapsed'])} into the run")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
