"""Train the same CIFAR ResNet in PyTorch on the very batches tinyres's trainer sees, for comparison.

    python examples/torch_reference.py --depth 56 --iters 500 --data ../shared/data/cifar10-jpeg.tar.gz
    python examples/torch_reference.py --schedule fast --window 500 --data ../shared/data/cifar10-jpeg.tar.gz --out runs/torch-fast

The network is `benchmarks/train_step.py`'s PyTorch twin of tinyres's (option-A shortcuts,
He-initialized convolutions); the data are tinyres's: the same per-pixel mean, the same shuffle
and pad-crop-flip augmentation for a given seed (`tinyres.data.DataLoader`), batch 128. The
recipe is `train_cifar.py`'s for the same --schedule (the paper's: SGD with momentum 0.9,
weight decay 1e-4, lr 0.1 /10 at the milestones; fast: PyTorch's own OneCycleLR with the same
arguments), with PyTorch's SGD and schedulers. Prints the training error averaged over each
window of iterations and the test error at its end, like `train_cifar.py`'s log, and when the
test error first fell below 10%. With --out, the run's folder gets train_cifar.py's config.json,
metrics.jsonl and train_log.jsonl (the same rows, "framework" in the config), so plot_curves.py
and benchmarks/time_to_accuracy.py read it as a tinyres run. PyTorch is not a dependency of
tinyres: install it yourself to run this.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # for the PyTorch twin

import cli

from tinyres.data import DataLoader, per_pixel_mean, to_float
from tinyres.run import TrainConfig, error_targets, make_scheduler, split_data
from tinyres.rundir import RunDir
from tinyres.train import SCHEDULES


def recipe(args) -> TrainConfig:
    """The recipe train_cifar.py trains with for the same --schedule, --iters, --milestones and --lr."""
    if args.schedule:
        settings = cli.schedule_settings(args.schedule, args.iters, args.milestones)
    else:
        settings = {"iters": args.iters or 500, "milestones": tuple(args.milestones or ())}
    if args.lr is not None:
        settings["lr"] = args.lr
    # PyTorch has no warm-up that ends on the training error: this twin trains without the paper's for ResNet-110
    return TrainConfig(depth=args.depth, val_split=args.val_split, warmup=False, **settings)


def window_means(losses: list[float], errs: list[float], it: int, every: int) -> tuple[float, float]:
    """Mean training loss and error over the iterations since the last multiple of `every` before `it`."""
    n = (it - 1) % every + 1
    return float(np.mean(losses[-n:])), float(np.mean(errs[-n:]))


def build_parser() -> cli.ArgumentParser:
    """The command line: the net, the recipe, the data."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="train_cifar.py's recipe of that name (default: 500 iterations at lr 0.1, no milestones)")
    p.add_argument("--iters", type=int, default=None, help="total iterations (overrides --schedule)")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="iterations where lr is divided by 10")
    p.add_argument("--lr", type=float, default=None, help="learning rate; onecycle: its peak")
    p.add_argument("--val-split", action="store_true", help="train on 45k images, evaluate on the 5k held out")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--window", type=int, default=250, help="iterations per reported window: one evaluation each")
    p.add_argument("--out", default=None, help="a new folder for the run's config and logs, as train_cifar.py's")
    p.add_argument("--data", default=None, help="CIFAR-10 archive (default: $TINYRES_DATA, else download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: train PyTorch's twin on tinyres's batches, print the errors per window."""
    args = build_parser().parse_args(argv)
    cfg = recipe(args)
    cli.check_depth(args.depth)
    cli.check_at_least(1, iters=cfg.iters, batch_size=args.batch_size, window=args.window, threads=args.threads)
    cli.check_at_least(0, seed=args.seed)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise cli.UsageError("this script needs PyTorch, which tinyres does not depend on: pip install torch") from None
    from train_step import _torch_resnet

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = RunDir(args.out) if args.out else None
    if out is not None:
        cli.check_writable_folder(out.out, "--out")
        if out.metrics.exists():
            raise cli.UsageError(f"--out {out.out}: holds a run already (metrics.jsonl); choose a new folder")
    data = cli.load_data(args.data)
    train_x, train_y, eval_x, eval_y, split = split_data(data, cfg)
    mean = per_pixel_mean(train_x).astype(np.float32)
    loader = DataLoader(train_x, train_y, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        augment=True, mean=mean, seed=args.seed)
    net = _torch_resnet(args.depth).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    sched = make_scheduler(opt, cfg, torch.optim.lr_scheduler)  # PyTorch's classes, the same arguments

    def test_loss_and_error() -> tuple[float, float]:
        net.eval()
        loss_sum, wrong = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(eval_x), 1000):
                x = torch.from_numpy(to_float(eval_x[i:i + 1000], mean))
                y = torch.from_numpy(eval_y[i:i + 1000].astype(np.int64))
                logits = net(x.contiguous(memory_format=torch.channels_last))
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                wrong += int((logits.argmax(1) != y).sum())
        net.train()
        return loss_sum / len(eval_x), wrong / len(eval_x)

    print(f"PyTorch {torch.__version__}, ResNet-{args.depth}, {cfg.iters:,} iterations, {cfg.lr_schedule} lr {cfg.lr} "
          f"(milestones {list(cfg.milestones) or 'none'}), momentum {cfg.momentum}, nesterov {cfg.nesterov}, "
          f"weight decay {cfg.weight_decay}, seed {args.seed}, {len(train_x):,} training images, {split} error "
          f"on {len(eval_x):,}")
    if out is not None:
        out.start({**cfg.to_dict(), "framework": f"PyTorch {torch.__version__}", "threads": torch.get_num_threads(),
                   "data_path": args.data, "seed": args.seed, "batch_size": args.batch_size, "out": args.out},
                  mean)
    losses, errs, targets, start = [], [], error_targets(cfg), time.perf_counter()
    for it, (x, y) in enumerate(loader.stream(), 1):
        lr = opt.param_groups[0]["lr"]
        logits = net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        y = torch.from_numpy(y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        errs.append(float((logits.argmax(1) != y).float().mean()))
        if out is not None and (it % 50 == 0 or it == cfg.iters):
            train_loss, train_err = window_means(losses, errs, it, 50)
            out.append(out.train_log, {"iter": it, "lr": lr, "train_loss": train_loss, "train_err": train_err,
                                       "elapsed": round(time.perf_counter() - start, 3)})
        if it % args.window == 0 or it == cfg.iters:
            n = (it - 1) % args.window + 1
            train_loss, train_err = window_means(losses, errs, it, args.window)
            test_loss, err = test_loss_and_error()
            seconds = time.perf_counter() - start
            print(f"iter {it:6d}  train error {100 * train_err:6.2f} % (iterations {it - n + 1}-{it})  "
                  f"{split} error {100 * err:6.2f} %  {seconds:7.0f} s", flush=True)
            crossed = [e for e in targets if err < e]
            targets = [e for e in targets if e not in crossed]
            for e in crossed:
                print(f"{split} error below {100 * e:.2f}% for the first time: iteration {it:,}, {seconds:.0f} s",
                      flush=True)
            if out is not None:
                row = {"iter": it, "lr": lr, "train_loss": train_loss, "train_err": train_err, "test_loss": test_loss,
                       "test_err": err, "split": split, "elapsed": round(seconds, 3),
                       "threads": torch.get_num_threads()}
                out.append(out.metrics, {**row, "first_below": crossed} if crossed else row)
        if it >= cfg.iters:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
