"""Classify image files with a trained CIFAR-10 net: print the top-3 classes with probabilities.

    python examples/predict.py runs/r20/checkpoint.npz cat.jpg ship.png
    python examples/predict.py runs/r20 photo.jpg                       # the run folder: its checkpoint.npz
    python examples/predict.py weights.npz photo.jpg --depth 20 --mean mean.npy   # a bare state dict

A training run's checkpoint says which network it holds (depth, plain, shortcut) and holds the
per-pixel mean of the training images, so it needs nothing else; nor does a file written by
`evaluate.py --export` (the weights alone, about 1 MB for a ResNet-20). A file of
`tinyres.save(model.state_dict(), path)` does not: give the network with --depth (--plain,
--shortcut) and the mean with --mean. Checkpoints of older runs take both from config.json and
mean.npy beside them. Images of any size are converted to RGB and resized to 32x32, as the CIFAR-10
images the net was trained on; an image that cannot be read is reported and the others are answered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cli

import tinyres
from tinyres import nn
from tinyres.checkpoint import is_checkpoint
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


def read_checkpoint(ckpt: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
    """The network's state dict in `ckpt`, the run config saved with it (empty if none) and its mean image (or None)."""
    doc = tinyres.load(ckpt)
    if is_checkpoint(doc):
        extra = doc.get("extra", {})
        return doc["model"], extra.get("config") or {}, extra.get("mean")
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):  # {"model": state_dict, ...}, saved by hand
        doc = doc["model"]
    if isinstance(doc, dict) and doc and all(isinstance(v, np.ndarray) for v in doc.values()):
        return doc, {}, None
    raise cli.UsageError(f"{ckpt}: holds neither a training checkpoint nor a state dict of arrays")


def choose_network(saved: dict[str, Any], source: str, depth: int | None, plain: bool | None,
                   shortcut: str | None) -> tuple[int, bool, str]:
    """(depth, plain, shortcut): as `saved` (a run config) says, which flags may repeat but not contradict;
    from the flags where nothing is saved."""
    if "depth" not in saved:
        if depth is None:
            raise cli.UsageError(f"{source} does not say which network it holds (and there is no config.json "
                                 "beside it): give the network with --depth (and --plain / --shortcut)")
        return int(depth), bool(plain), shortcut or "A"
    net = (int(saved["depth"]), bool(saved.get("plain", False)), str(saved.get("shortcut", "A")).upper())
    given = {"--depth": (depth, net[0]), "--plain": (plain, net[1]), "--shortcut": (shortcut, net[2])}
    wrong = [f"{flag} {value}" if flag != "--plain" else flag for flag, (value, saved_value) in given.items()
             if value is not None and value != saved_value]
    if wrong:
        raise cli.UsageError(f"{' '.join(wrong)}: {source} holds {model_name(*net)}; leave out the network flags, "
                             "which are for files that do not say which network they hold")
    return net


def load_network(ckpt: Path, state: dict[str, np.ndarray], depth: int, plain: bool, shortcut: str) -> nn.Module:
    """The net of `state`; UsageError if the weights do not fit it or are NaN or infinite."""
    model = build_model(depth, plain, shortcut)
    errors = model.state_dict_errors(state)
    if errors:
        first = errors[0] if len(errors[0]) < 160 else errors[0][:160] + " ..."
        raise cli.UsageError(f"{ckpt}: the weights do not fit {model_name(depth, plain, shortcut)}: {first}")
    model.load_state_dict(state)
    bad = [name for name, a in model.state_dict().items() if not np.isfinite(a).all()]
    if bad:
        raise cli.UsageError(f"{ckpt}: the checkpoint's weights are not finite (NaN or inf in {bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run diverged before "
                             "it was saved; use another checkpoint")
    return model


def load_trained(checkpoint: str | Path, depth: int | None = None, plain: bool | None = None,
                 shortcut: str | None = None, mean_file: str | None = None
                 ) -> tuple[Path, nn.Module, dict[str, Any], np.ndarray]:
    """(checkpoint file, network, run config, per-pixel mean) of a checkpoint, its run folder or a state dict.

    The config is the run's, with the network's depth, plain and shortcut filled in from the flags
    where the file does not say; the mean comes from the file, else `mean_file`, else mean.npy beside it.
    """
    path = Path(checkpoint)
    run_dir, ckpt = (path, path / "checkpoint.npz") if path.is_dir() else (path.parent, path)
    state, saved, mean = read_checkpoint(ckpt)
    source = str(ckpt)
    if not saved and (run_dir / "config.json").exists():  # a checkpoint of an older run, or weights in a run dir
        saved, source = read_config(run_dir), str(run_dir / "config.json")
    depth, plain, shortcut = choose_network(saved, source, depth, plain, shortcut)
    cli.check_depth(depth)
    if mean_file is not None or mean is None:
        mean_path = Path(mean_file) if mean_file else run_dir / "mean.npy"
        if not mean_path.exists():
            raise cli.UsageError(f"{ckpt} holds no per-pixel mean and {mean_path} does not exist: give the mean of "
                                 "the training images with --mean")
        mean = np.load(mean_path)
    model = load_network(ckpt, state, depth, plain, shortcut)
    return ckpt, model, {**saved, "depth": depth, "plain": plain, "shortcut": shortcut}, mean


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
    """Command line: a checkpoint (or run dir) and image files in, top-3 classes out; status 2 if an image failed."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("checkpoint", help="checkpoint.npz, the run directory holding it, or a tinyres.save state dict")
    p.add_argument("images", nargs="+", help="image files (any size; converted to RGB 32x32)")
    p.add_argument("--depth", type=int, default=None, help="for a file that does not say which network it holds")
    p.add_argument("--plain", action="store_true", default=None, help="a plain net (as --depth)")
    p.add_argument("--shortcut", choices=["A", "B", "C"], type=str.upper, default=None, help="(as --depth)")
    p.add_argument("--mean", default=None, help="per-pixel mean .npy, for a file that holds none")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--top", type=int, default=3, help="how many classes to print, 1 to 10 (%(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.top <= len(CLASSES):
        raise cli.UsageError(f"--top {args.top}: give a number of classes from 1 to {len(CLASSES)}")
    cli.require("PIL", "data", "reading images (Pillow)")

    ckpt, model, config, mean = load_trained(args.checkpoint, args.depth, args.plain, args.shortcut, args.mean)
    model.to(args.device)
    net = model_name(config["depth"], config["plain"], config["shortcut"])
    names, images = [], []
    for name in args.images:
        try:
            images.append(load_image(name))
            names.append(name)
        except cli.UsageError as e:  # the other images still get their answer
            print(f"predict.py: error: {e}", file=sys.stderr)
    if images:
        probs = predict(model, np.stack(images), mean, args.device)
        print(f"{net} from {ckpt}")
        for name, pr in zip(names, probs):
            top = np.argsort(pr)[::-1][:args.top]
            print(f"{name}: " + "  ".join(f"{CLASSES[k]} {100 * pr[k]:.1f}%" for k in top))
    return 0 if len(images) == len(args.images) else 2


if __name__ == "__main__":
    sys.exit(cli.run(main))
