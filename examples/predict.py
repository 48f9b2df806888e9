"""Classify image files with a trained CIFAR-10 net: print the top-3 classes with probabilities.

    python examples/predict.py runs/r20 cat.jpg ship.png
    python examples/predict.py runs/r20/checkpoint.npz photo.jpg --depth 20 --shortcut A

The network (depth, plain, shortcut) is read from config.json beside the checkpoint unless given
as flags, and the per-pixel mean from mean.npy there (or --mean). Images of any size are
converted to RGB and resized to 32x32, as the CIFAR-10 images the net was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tinyres
from tinyres import nn
from tinyres.checkpoint import load_checkpoint
from tinyres.data import CLASSES, to_float
from tinyres.nn import functional as F
from tinyres.train import build_model, model_name


def load_image(path: str | Path, size: int = 32) -> np.ndarray:
    """An image file as uint8 (size, size, 3) RGB, resized (aspect ratio not kept)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def predict(model: nn.Module, images: np.ndarray, mean: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, 10) of uint8 (N, 32, 32, 3) images, in eval mode."""
    model.eval()
    with tinyres.no_grad():
        logits = model(tinyres.tensor(to_float(images, mean), device=device))
        return F.softmax(logits, dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    """Command line: a checkpoint (or run dir) and image files in, top-3 classes out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint.npz, or the run directory holding it")
    p.add_argument("images", nargs="+", help="image files (any size; converted to RGB 32x32)")
    p.add_argument("--depth", type=int, default=None, help="default: from config.json beside the checkpoint")
    p.add_argument("--plain", action="store_true", default=None, help="a plain net (default: from config.json)")
    p.add_argument("--shortcut", choices=["A", "B", "C"], type=str.upper, default=None)
    p.add_argument("--mean", default=None, help="per-pixel mean .npy (default: mean.npy beside the checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--top", type=int, default=3, help="how many classes to print")
    args = p.parse_args(argv)

    path = Path(args.checkpoint)
    run_dir, ckpt = (path, path / "checkpoint.npz") if path.is_dir() else (path.parent, path)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    depth = args.depth if args.depth is not None else config.get("depth")
    if depth is None:
        p.error(f"no config.json in {run_dir}: give the network with --depth (and --plain / --shortcut)")
    plain = args.plain if args.plain is not None else bool(config.get("plain", False))
    shortcut = args.shortcut or str(config.get("shortcut", "A"))
    mean_path = Path(args.mean) if args.mean else run_dir / "mean.npy"
    if not mean_path.exists():
        p.error(f"{mean_path} not found: the per-pixel mean of the training images is needed (--mean)")

    model = build_model(int(depth), plain, shortcut)
    load_checkpoint(ckpt, model)
    model.to(args.device)
    images = np.stack([load_image(f) for f in args.images])
    probs = predict(model, images, np.load(mean_path), args.device)
    print(f"{model_name(int(depth), plain, shortcut)} from {ckpt}")
    for name, pr in zip(args.images, probs):
        top = np.argsort(pr)[::-1][:args.top]
        print(f"{name}: " + "  ".join(f"{CLASSES[k]} {100 * pr[k]:.1f}%" for k in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
