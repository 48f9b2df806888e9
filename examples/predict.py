"""Classify image files with a trained CIFAR-10 net: print the top-3 classes with probabilities.

    python examples/predict.py runs/r20 cat.jpg ship.png
    python examples/predict.py runs/r20/checkpoint.npz photo.jpg --depth 20 --shortcut A

The network (depth, plain, shortcut) is read from config.json beside the checkpoint unless given
as flags, and the per-pixel mean from mean.npy there (or --mean). Images of any size are
converted to RGB and resized to 32x32, as the CIFAR-10 images the net was trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cli

import tinyres
from tinyres import nn
from tinyres.checkpoint import load_checkpoint
from tinyres.data import CLASSES, to_float
from tinyres.nn import functional as F
from tinyres.train import build_model, model_name


def load_image(path: str | Path, size: int = 32) -> np.ndarray:
    """An image file as uint8 (size, size, 3) RGB, resized (aspect ratio not kept)."""
    from PIL import Image  # Pillow is optional: the [data] extra

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    except FileNotFoundError:
        raise cli.UsageError(f"{path}: no such image file") from None
    except OSError as e:  # Pillow's "cannot identify image file" and truncated files are OSErrors too
        raise cli.UsageError(f"{path}: not an image that Pillow can read ({cli.describe(e)})") from None


def load_network(ckpt: Path, depth: int, plain: bool, shortcut: str) -> nn.Module:
    """The net saved in checkpoint `ckpt`; UsageError if its weights are NaN or infinite."""
    model = build_model(depth, plain, shortcut)
    load_checkpoint(ckpt, model)
    bad = [name for name, a in model.state_dict().items() if not np.isfinite(a).all()]
    if bad:
        raise cli.UsageError(f"{ckpt}: the checkpoint's weights are not finite (NaN or inf in {bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run diverged before "
                             "it was saved; use another checkpoint")
    return model


def predict(model: nn.Module, images: np.ndarray, mean: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, 10) of uint8 (N, 32, 32, 3) images, in eval mode."""
    model.eval()
    with tinyres.no_grad():
        logits = model(tinyres.tensor(to_float(images, mean), device=device))
        return F.softmax(logits, dim=1).numpy()


def read_config(run_dir: Path) -> dict:
    """The run's config.json as a dict (empty when there is none)."""
    path = run_dir / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise cli.UsageError(f"{path}: not valid JSON ({e}); give the network with --depth instead") from None


def main(argv: list[str] | None = None) -> int:
    """Command line: a checkpoint (or run dir) and image files in, top-3 classes out."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("checkpoint", help="checkpoint.npz, or the run directory holding it")
    p.add_argument("images", nargs="+", help="image files (any size; converted to RGB 32x32)")
    p.add_argument("--depth", type=int, default=None, help="default: from config.json beside the checkpoint")
    p.add_argument("--plain", action="store_true", default=None, help="a plain net (default: from config.json)")
    p.add_argument("--shortcut", choices=["A", "B", "C"], type=str.upper, default=None)
    p.add_argument("--mean", default=None, help="per-pixel mean .npy (default: mean.npy beside the checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--top", type=int, default=3, help="how many classes to print, 1 to 10 (%(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.top <= len(CLASSES):
        raise cli.UsageError(f"--top {args.top}: give a number of classes from 1 to {len(CLASSES)}")
    cli.require("PIL", "data", "reading images (Pillow)")

    path = Path(args.checkpoint)
    run_dir, ckpt = (path, path / "checkpoint.npz") if path.is_dir() else (path.parent, path)
    config = read_config(run_dir)
    depth = args.depth if args.depth is not None else config.get("depth")
    if depth is None:
        raise cli.UsageError(f"no config.json in {run_dir}: give the network with --depth (and --plain / --shortcut)")
    cli.check_depth(int(depth))
    plain = args.plain if args.plain is not None else bool(config.get("plain", False))
    shortcut = args.shortcut or str(config.get("shortcut", "A"))
    mean_path = Path(args.mean) if args.mean else run_dir / "mean.npy"
    if not mean_path.exists():
        raise cli.UsageError(f"{mean_path} not found: the per-pixel mean of the training images is needed (--mean)")

    model = load_network(ckpt, int(depth), plain, shortcut).to(args.device)
    images = np.stack([load_image(f) for f in args.images])
    probs = predict(model, images, np.load(mean_path), args.device)
    print(f"{model_name(int(depth), plain, shortcut)} from {ckpt}")
    for name, pr in zip(args.images, probs):
        top = np.argsort(pr)[::-1][:args.top]
        print(f"{name}: " + "  ".join(f"{CLASSES[k]} {100 * pr[k]:.1f}%" for k in top))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
