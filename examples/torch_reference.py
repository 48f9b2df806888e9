"""Train the same CIFAR ResNet in PyTorch on the very batches tinyres's trainer sees, for comparison.

    python examples/torch_reference.py --depth 56 --iters 500 --data ../shared/data/cifar10-jpeg.tar.gz

The network is `benchmarks/train_step.py`'s PyTorch twin of tinyres's (option-A shortcuts,
He-initialized convolutions); the data are tinyres's: the same per-pixel mean, the same shuffle
and pad-crop-flip augmentation for a given seed (`tinyres.data.DataLoader`), batch 128, SGD with
momentum 0.9 and weight decay 1e-4. Prints the training error averaged over each window of
iterations and the test error at its end, like `train_cifar.py`'s log. PyTorch is not a
dependency of tinyres: install it yourself to run this.
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


def main(argv: list[str] | None = None) -> int:
    """Command line: train PyTorch's twin on tinyres's batches, print the errors per window."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--milestones", type=int, nargs="*", default=[], help="iterations where lr is divided by 10")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--window", type=int, default=250, help="iterations per reported window")
    p.add_argument("--data", default=None, help="CIFAR-10 archive (default: $TINYRES_DATA, else download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    args = p.parse_args(argv)
    cli.check_depth(args.depth)
    cli.check_at_least(1, iters=args.iters, batch_size=args.batch_size, window=args.window, threads=args.threads)
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
    data = cli.load_data(args.data)
    mean = per_pixel_mean(data.train_images).astype(np.float32)
    loader = DataLoader(data.train_images, data.train_labels, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        augment=True, mean=mean, seed=args.seed)
    net = _torch_resnet(args.depth).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)

    def test_error() -> float:
        net.eval()
        wrong = 0
        with torch.no_grad():
            for i in range(0, len(data.test_images), 1000):
                x = torch.from_numpy(to_float(data.test_images[i:i + 1000], mean))
                y = torch.from_numpy(data.test_labels[i:i + 1000].astype(np.int64))
                wrong += int((net(x.contiguous(memory_format=torch.channels_last)).argmax(1) != y).sum())
        net.train()
        return wrong / len(data.test_images)

    print(f"PyTorch {torch.__version__}, ResNet-{args.depth}, {args.iters:,} iterations, lr {args.lr} "
          f"(/10 at {args.milestones or 'never'}), seed {args.seed}")
    errs, start = [], time.perf_counter()
    for it, (x, y) in enumerate(loader.stream(), 1):
        out = net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        y = torch.from_numpy(y)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        errs.append(float((out.argmax(1) != y).float().mean()))
        if it % args.window == 0 or it == args.iters:
            n = (it - 1) % args.window + 1
            print(f"iter {it:6d}  train error {100 * np.mean(errs[-n:]):6.2f} % (iterations {it - n + 1}-{it})  "
                  f"test error {100 * test_error():6.2f} %  {time.perf_counter() - start:7.0f} s", flush=True)
        if it >= args.iters:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
