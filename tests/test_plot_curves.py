"""examples/plot_curves.py on real (tiny) runs: dense training error from train_log.jsonl, test error per evaluation."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from test_train import synthetic_cifar, tiny_config

from tinyres.train import read_metrics, read_train_log, train

pytest.importorskip("matplotlib")

PLOT_CURVES = Path(__file__).resolve().parents[1] / "examples" / "plot_curves.py"


def plot_curves():
    spec = importlib.util.spec_from_file_location("plot_curves", PLOT_CURVES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_6_from_tiny_runs_dense_and_old(tmp_path, capsys):
    data = synthetic_cifar(128, 32)
    runs = []
    for depth, plain in ((8, True), (8, False)):
        runs.append(tmp_path / f"{'plain' if plain else 'resnet'}{depth}")
        train(tiny_config(runs[-1], plain=plain, iters=12, log_every=2, eval_every=6), data=data)
    old = tmp_path / "old-resnet"  # a run from before the dense log: its curve comes from the evaluations
    shutil.copytree(runs[1], old)
    (old / "train_log.jsonl").unlink()

    module = plot_curves()
    dense = module.load_run(runs[0])
    its, err = module.training_curve(dense)
    assert its == [r["iter"] for r in read_train_log(runs[0])] == [2, 4, 6, 8, 10, 12]
    assert err == [100 * r["train_err"] for r in read_train_log(runs[0])]
    assert [r["iter"] for r in dense["rows"]] == [6, 12]
    its, err = module.training_curve(module.load_run(old))
    assert its == [6, 12] and err == [100 * r["train_err"] for r in read_metrics(old)]

    out = tmp_path / "fig6.png"
    assert module.main([*map(str, [*runs, old]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
