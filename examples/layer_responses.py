"""Figure 7 of He et al. (2015): standard deviations of the layer responses on CIFAR-10.

    python examples/layer_responses.py runs/plain20 runs/plain56 runs/r20 runs/r56 --out fig7.png --limit 2000

Each argument is a run directory (or its checkpoint.npz) written by `train_cifar.py`. A response
is the output of a 3x3 convolution after batch normalization, before the ReLU or the addition;
its std is taken over all its values on the test images. The top panel shows the layers in
network order, the bottom one each net's stds sorted from largest to smallest. The paper finds
ResNets' responses generally smaller than plain nets', and smaller for deeper ResNets.
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
from tinyres.data import to_float
from tinyres.train import build_model, model_name

DEPTH_COLORS = {20: "#f0a30a", 32: "#1f77b4", 44: "#2ca02c", 56: "#d62728", 110: "#000000", 1202: "#9467bd"}


def layer_responses(model: nn.Module, images: np.ndarray, mean: np.ndarray, batch_size: int = 500,
                    device: str = "cpu") -> np.ndarray:
    """Std of each 3x3 conv layer's response (after BN, before ReLU/addition), in layer order: (L,)."""
    sums: list[np.ndarray] = []   # per layer: [sum, sum of squares, count], in float64
    conv3_out: dict[int, object] = {}  # id -> 3x3 conv output of this forward (kept alive: ids stay unique)
    layer = 0

    def watch(module: nn.Module, inputs: tuple, y):
        # A forward hook on every conv and batch norm: note the outputs of 3x3 convs, and record
        # the batch norm that takes one of them as its input.
        nonlocal layer
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            conv3_out[id(y)] = y
        elif isinstance(module, nn.BatchNorm2d) and id(inputs[0]) in conv3_out:
            a = y.numpy().astype(np.float64)
            stats = np.array([a.sum(), np.square(a).sum(), a.size])
            if layer == len(sums):
                sums.append(stats)
            else:
                sums[layer] += stats
            layer += 1

    handles = [m.register_forward_hook(watch) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    was_training = model.training
    model.eval()
    try:
        with tinyres.no_grad():
            for i in range(0, len(images), batch_size):
                layer = 0
                conv3_out.clear()
                model(tinyres.tensor(to_float(images[i:i + batch_size], mean), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stds = []
    for s, ss, n in sums:
        m = s / n
        stds.append(np.sqrt(max(ss / n - m * m, 0.0)))
    return np.array(stds)


def load_trained(path: str | Path, device: str = "cpu") -> tuple[nn.Module, np.ndarray, str, dict]:
    """(model, per-pixel mean, label, config) from a run dir or its checkpoint.npz."""
    path = Path(path)
    run_dir, ckpt = (path, path / "checkpoint.npz") if path.is_dir() else (path.parent, path)
    if not (run_dir / "config.json").exists():
        raise cli.UsageError(f"{path}: no config.json in {run_dir}; give run folders written by train_cifar.py")
    config = json.loads((run_dir / "config.json").read_text())
    depth, plain, shortcut = int(config["depth"]), bool(config["plain"]), str(config.get("shortcut", "A"))
    model = build_model(depth, plain, shortcut)
    load_checkpoint(ckpt, model)
    mean = np.load(run_dir / "mean.npy")
    return model.to(device), mean, model_name(depth, plain, shortcut), config


def plot_responses(results: list[tuple[str, int, bool, np.ndarray]], out: str | Path) -> Path:
    """Draw Figure 7 (std per layer: in layer order on top, sorted below) into PNG `out`."""
    from matplotlib.figure import Figure  # renders with Agg: no display, no pyplot state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 7))
    top, bottom = fig.subplots(2, 1)
    for label, depth, plain, stds in results:
        color = DEPTH_COLORS.get(depth, "#7f7f7f")
        style = {"color": color, "linestyle": "--" if plain else "-", "linewidth": 1.2, "marker": "o",
                 "markersize": 2.5}
        x = np.arange(1, len(stds) + 1)
        top.plot(x, stds, label=label, **style)
        bottom.plot(x, np.sort(stds)[::-1], label=label, **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("std")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return cli.save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    """Command line: run dirs or checkpoints in, Figure 7 PNG out."""
    p = cli.ArgumentParser(__doc__)
    p.add_argument("runs", nargs="+", help="run directories (or their checkpoint.npz)")
    p.add_argument("--data", default=None, help="CIFAR-10 archive (default: $TINYRES_DATA, else the cache)")
    p.add_argument("--limit", type=int, default=None, help="use the first N test images (default: all 10k)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="fig7.png", help="the PNG to write")
    args = p.parse_args(argv)
    cli.check_at_least(1, limit=args.limit, batch_size=args.batch_size)
    cli.require("matplotlib", "plot", "drawing Figure 7")
    cli.check_writable_folder(Path(args.out).parent, "--out")
    data = cli.load_data(args.data)
    images = data.test_images[:args.limit] if args.limit else data.test_images
    results = []
    for run in args.runs:
        model, mean, label, config = load_trained(run, args.device)
        stds = layer_responses(model, images, mean, args.batch_size, args.device)
        results.append((label, int(config["depth"]), bool(config["plain"]), stds))
        print(f"{label}: {len(stds)} layers, std mean {stds.mean():.3f}, max {stds.max():.3f}")
    print(f"wrote {plot_responses(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
