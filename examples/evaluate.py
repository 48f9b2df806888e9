"""Test error of a trained CIFAR-10 net; with --export, write its weights alone for sharing.

    python examples/evaluate.py examples/results/weights/resnet-20.npz --data ../shared/data/cifar10-jpeg.tar.gz
    python examples/evaluate.py runs/fast --export resnet-20.npz     # the run's checkpoint, less the optimizer

The file may be a run's checkpoint (or its folder), a file written by --export, or a state dict of
`tinyres.save(model.state_dict(), path)` with the network given by --depth and the mean by --mean,
as for predict.py. The error is measured on the 10,000 test images of --data in eval mode (batch
norm's running statistics), as the trainer measures it.

--export keeps what classifying needs: the network's weights and buffers, the run's config (which
names the network) and the per-pixel mean of its training images. The optimizer's momentum, the
schedule and the data-loader position stay behind, so a ResNet-20 takes about 1 MB, and the file
cannot resume training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cli
import predict

import tinyres
from tinyres.checkpoint import checkpoint_state
from tinyres.run import evaluate
from tinyres.train import model_name


def main(argv: list[str] | None = None) -> int:
    """Command line: a checkpoint in; its test error out, and with --export its weights file."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("checkpoint", help="checkpoint.npz, the run directory holding it, an exported file or a state dict")
    p.add_argument("--data", default=None, help="CIFAR-10: archive, batches or image folder (as train_cifar.py)")
    p.add_argument("--export", default=None, metavar="OUT",
                   help="write the weights, config and mean alone to OUT (.npz) for predict.py and this script")
    p.add_argument("--no-eval", action="store_true", help="with --export: write the file without measuring first")
    p.add_argument("--depth", type=int, default=None, help="for a file that does not say which network it holds")
    p.add_argument("--plain", action="store_true", default=None, help="a plain net (as --depth)")
    p.add_argument("--shortcut", choices=["A", "B", "C"], type=str.upper, default=None, help="(as --depth)")
    p.add_argument("--mean", default=None, help="per-pixel mean .npy, for a file that holds none")
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (%(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    cli.check_at_least(1, batch_size=args.batch_size)
    if args.no_eval and args.export is None:
        raise cli.UsageError("--no-eval: only with --export (without it there is nothing left to do)")
    out = Path(args.export) if args.export is not None else None
    if out is not None:
        cli.check_writable_folder(out.parent, "--export")  # before the evaluation, not after it

    ckpt, model, config, mean = predict.load_trained(args.checkpoint, args.depth, args.plain, args.shortcut,
                                                     args.mean)
    name = model_name(config["depth"], config["plain"], config["shortcut"])
    if not args.no_eval:
        data = cli.load_data(args.data)
        model.to(args.device)
        loss, err = evaluate(model, data.test_images, data.test_labels, mean, args.batch_size, args.device)
        print(f"{name} from {ckpt}: test error {100 * err:.2f}% ({round(err * len(data.test_labels)):,} of "
              f"{len(data.test_labels):,} test images wrong), test loss {loss:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        model.to("cpu")
        tinyres.save(checkpoint_state(model, extra={"config": config, "mean": np.asarray(mean)}), out)
        print(f"wrote {name}'s weights, config and mean to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
