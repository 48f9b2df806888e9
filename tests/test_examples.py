"""Tests of the example scripts: the training CLI (and its Ctrl-C), the figures, reproduce.py, predict.py,
evaluate.py and torch_reference.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import synthetic_cifar

import tinyres
import tinyres.run
from tinyres.checkpoint import load_checkpoint, save_checkpoint
from tinyres.data import CLASSES
from tinyres.train import TrainConfig, build_model, read_metrics, read_train_log, train

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, str(EXAMPLES))  # as when a script runs: the scripts share examples/cli.py
UsageError = importlib.import_module("cli").UsageError


def example(name: str):
    """Import examples/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test reads the user's TINYRES_DATA or writes decoded data to ~/.cache."""
    monkeypatch.delenv("TINYRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """Two briefly trained 32x32 run directories: plain-8 and ResNet-8."""
    root = tmp_path_factory.mktemp("runs")
    data = synthetic_cifar(64, 20, size=32)
    runs = {}
    for name, plain in (("plain8", True), ("resnet8", False)):
        config = TrainConfig(depth=8, plain=plain, iters=3, milestones=(), batch_size=8, eval_every=3,
                             checkpoint_every=3, out=str(root / name), progress=False)
        train(config, data=data)
        runs[name] = root / name
    return runs


def write_run(run_dir: Path, depth: int, plain: bool, iters: int = 2000, every: int = 100) -> None:
    """A recorded run: config.json and a metrics.jsonl whose errors fall like a training curve."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**TrainConfig(depth=depth, plain=plain).to_dict()}))
    level = 0.12 + (0.004 * depth if plain else 0.0)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for it in range(every, iters + 1, every):
            train_err = level * 0.7 + 0.8 * np.exp(-it / 400)
            f.write(json.dumps({"iter": it, "lr": 0.1, "train_loss": 2 * train_err, "train_err": train_err,
                                "test_loss": 2 * train_err + 0.2, "test_err": train_err + 0.05,
                                "split": "test", "elapsed": it / 10}) + "\n")


# ---- figures -----------------------------------------------------------------------------

def test_plot_curves_writes_figure_6(tmp_path, capsys):
    plot_curves = example("plot_curves")
    dirs = []
    for depth, plain in ((20, True), (56, True), (20, False), (56, False), (110, False)):
        dirs.append(tmp_path / f"{'plain' if plain else 'resnet'}{depth}")
        write_run(dirs[-1], depth, plain)
    with open(dirs[0] / "metrics.jsonl", "a") as f:
        f.write('{"iter": 2100, "lr"')  # a line cut short by a kill is ignored
    out = tmp_path / "figs" / "fig6.png"
    assert plot_curves.main([*map(str, dirs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out
    labels = [plot_curves.load_run(d)["label"] for d in dirs]
    assert labels == ["plain-20", "plain-56", "ResNet-20", "ResNet-56", "ResNet-110"]
    assert len(plot_curves.load_run(dirs[0])["rows"]) == 20


def test_plot_curves_tells_two_runs_of_one_net_apart_and_draws_no_empty_panel(tmp_path):
    plot_curves = example("plot_curves")
    first, second, other = tmp_path / "r20-seed0", tmp_path / "r20-seed1", tmp_path / "r56"
    write_run(first, 20, False)
    write_run(second, 20, False)
    write_run(other, 56, False)
    fig = plot_curves.figure_6([first, second, other])
    assert len(fig.axes) == 1  # ResNets only: no "no runs" panel for the plain nets
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ResNet-20 (r20-seed0)", "ResNet-20 (r20-seed1)", "ResNet-56"]
    colors = [line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(set(colors)) == 3
    plain = tmp_path / "plain20"
    write_run(plain, 20, True)
    assert [a.get_title() for a in plot_curves.figure_6([plain, first]).axes] == \
        ["plain networks", "residual networks (ResNets)"]


def test_layer_responses_are_the_bn_outputs_of_3x3_convs():
    import tinyres
    from tinyres.data import to_float

    layer_responses = example("layer_responses")
    images = synthetic_cifar(24, 1, size=32).train_images
    mean = np.zeros((3, 32, 32), np.float32)
    for depth, plain, shortcut, n in ((20, False, "A", 19), (20, True, "A", 19), (8, False, "B", 7)):
        model = build_model(depth, plain, shortcut)
        stds = layer_responses.layer_responses(model, images, mean, batch_size=10)
        assert stds.shape == (n,) and np.all(stds > 0) and model.training
    # the first response is the stem's BN output: compare with running the layers by hand
    model = build_model(8).eval()
    with tinyres.no_grad():
        first = model.bn1(model.conv1(tinyres.tensor(to_float(images, mean)))).numpy()
    stds = layer_responses.layer_responses(model, images, mean, batch_size=7)
    assert stds[0] == pytest.approx(first.astype(np.float64).std(), rel=1e-5)


def test_layer_responses_cli_writes_figure_7(tmp_path, image_folder, trained_runs, capsys):
    layer_responses = example("layer_responses")
    out = tmp_path / "fig7.png"
    runs = [str(trained_runs["plain8"]), str(trained_runs["resnet8"] / "checkpoint.npz")]
    assert layer_responses.main([*runs, "--data", str(image_folder), "--limit", "12", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "plain-8: 7 layers" in text and "ResNet-8: 7 layers" in text


# ---- predict -----------------------------------------------------------------------------

def test_predict_prints_top_3_classes(tmp_path, trained_runs, capsys):
    predict = example("predict")
    big = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8)).save(big)
    rgba = tmp_path / "icon.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(rgba)
    assert predict.main([str(trained_runs["resnet8"]), str(big), str(rgba)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ResNet-8 from")
    for line, name in zip(lines[1:], (big, rgba)):
        assert line.startswith(f"{name}: ")
        found = [c for c in CLASSES if f" {c} " in line]
        percents = [float(p.rstrip("%")) for p in line.split() if p.endswith("%")]
        assert len(found) == 3 and len(percents) == 3
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.1
    assert len(lines) == 3


def test_predict_needs_nothing_but_a_runs_checkpoint(tmp_path, trained_runs, capsys):
    predict = example("predict")
    ckpt = tmp_path / "alone.npz"  # no config.json or mean.npy beside it
    ckpt.write_bytes((trained_runs["resnet8"] / "checkpoint.npz").read_bytes())
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert predict.main([str(ckpt), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"ResNet-8 from {ckpt}")
    assert predict.main([str(ckpt), str(image), "--depth", "8"]) == 0  # repeating what it holds is fine


def test_predict_refuses_flags_that_contradict_the_checkpoint(tmp_path, trained_runs):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    ckpt = trained_runs["resnet8"] / "checkpoint.npz"
    line = assert_usage_error(run_script("predict", ckpt, image, "--plain"), "--plain", str(ckpt), "ResNet-8")
    assert "leave out the network flags" in line
    assert_usage_error(run_script("predict", ckpt, image, "--depth", "20", "--shortcut", "B"),
                       "--depth 20 --shortcut B", "ResNet-8")


def test_predict_reads_a_saved_state_dict_with_the_network_given(tmp_path, trained_runs, capsys):
    import tinyres

    predict = example("predict")
    weights = tmp_path / "weights.npz"
    tinyres.save(tinyres.load(trained_runs["plain8"] / "checkpoint.npz")["model"], weights)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(UsageError, match="does not say which network it holds.*--depth"):
        predict.main([str(weights), str(image)])
    with pytest.raises(UsageError, match="holds no per-pixel mean.*--mean"):
        predict.main([str(weights), str(image), "--depth", "8", "--plain"])
    mean = str(trained_runs["plain8"] / "mean.npy")
    assert predict.main([str(weights), str(image), "--depth", "8", "--plain", "--mean", mean]) == 0
    assert capsys.readouterr().out.startswith("plain-8 from")
    with pytest.raises(UsageError, match=r"do not fit ResNet-20: missing: layer1\.1\.conv1\.weight .* \.\.\.$"):
        predict.main([str(weights), str(image), "--depth", "20", "--mean", mean])


def test_predict_answers_the_good_images_when_one_is_bad(tmp_path, trained_runs):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (32, 32)).save(good)
    bad.write_text("not an image")
    done = run_script("predict", trained_runs["resnet8"], bad, good)
    assert done.returncode == 2
    assert f"{bad}: not an image" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout.splitlines()[1].startswith(f"{good}: ")


# ---- evaluate ----------------------------------------------------------------------------

def test_evaluate_reproduces_the_runs_test_error_and_exports_the_weights_alone(tmp_path, image_folder, capsys):
    evaluate = example("evaluate")
    run = tmp_path / "r8"
    train(TrainConfig(depth=8, iters=6, milestones=(), batch_size=8, eval_every=6, data_path=str(image_folder),
                      out=str(run), progress=False))
    test_err = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["test_err"]
    exported = tmp_path / "shared" / "r8.npz"
    assert evaluate.main([str(run), "--data", str(image_folder), "--export", str(exported)]) == 0
    out = capsys.readouterr().out
    assert f"ResNet-8 from {run / 'checkpoint.npz'}: test error {100 * test_err:.2f}% " in out
    assert f"wrote ResNet-8's weights, config and mean to {exported}" in out

    doc = tinyres.load(exported)
    full = tinyres.load(run / "checkpoint.npz")
    assert set(doc) == {"format", "version", "model", "extra"} and set(doc["extra"]) == {"config", "mean"}
    assert doc["extra"]["config"]["depth"] == 8 and doc["extra"]["config"]["plain"] is False
    for name, value in full["model"].items():
        np.testing.assert_array_equal(doc["model"][name], value)
    np.testing.assert_array_equal(doc["extra"]["mean"], full["extra"]["mean"])
    assert exported.stat().st_size < (run / "checkpoint.npz").stat().st_size

    alone = tmp_path / "elsewhere" / "r8.npz"  # nothing beside it: the file is all it takes
    alone.parent.mkdir()
    alone.write_bytes(exported.read_bytes())
    assert evaluate.main([str(alone), "--data", str(image_folder)]) == 0
    assert f"test error {100 * test_err:.2f}% " in capsys.readouterr().out
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    assert example("predict").main([str(alone), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"ResNet-8 from {alone}")
    with pytest.raises(tinyres.checkpoint.CheckpointError, match="optimizer"):  # it cannot resume a run
        model = build_model(8, False, "A")
        load_checkpoint(alone, model, tinyres.optim.SGD(model.parameters(), lr=0.1))


def test_evaluate_exports_a_state_dict_with_the_network_given(tmp_path, trained_runs, capsys):
    evaluate = example("evaluate")
    weights = tmp_path / "weights.npz"
    tinyres.save(tinyres.load(trained_runs["plain8"] / "checkpoint.npz")["model"], weights)
    out = tmp_path / "plain8.npz"
    mean = str(trained_runs["plain8"] / "mean.npy")
    assert evaluate.main([str(weights), "--depth", "8", "--plain", "--mean", mean, "--no-eval",
                          "--export", str(out)]) == 0
    config = tinyres.load(out)["extra"]["config"]
    assert (config["depth"], config["plain"], config["shortcut"]) == (8, True, "A")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    capsys.readouterr()
    assert example("predict").main([str(out), str(image)]) == 0
    assert capsys.readouterr().out.startswith("plain-8 from")


def test_evaluate_refuses_what_it_cannot_do(tmp_path, trained_runs):
    run = trained_runs["resnet8"]
    assert_usage_error(run_script("evaluate", run, "--no-eval"), "--no-eval", "--export")
    assert_usage_error(run_script("evaluate", run, "--batch-size", "0"), "--batch-size")
    assert_usage_error(run_script("evaluate", run, "--data", tmp_path / "nothing-here"), "--data")
    assert_usage_error(run_script("evaluate", tmp_path / "none.npz", "--no-eval", "--export", tmp_path / "o.npz"),
                       "none.npz")
    assert not (tmp_path / "o.npz").exists()


# ---- reproduce ---------------------------------------------------------------------------

def test_reproduce_trains_tabulates_and_plots(tmp_path, image_folder, capsys):
    reproduce = example("reproduce")
    out = tmp_path / "repro"
    args = ["--nets", "plain-8", "resnet-20", "--iters", "2", "--batch-size", "8", "--data", str(image_folder),
            "--out", str(out), "--quiet"]
    assert reproduce.main(args) == 0
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| plain-8 | 0.08M | 2 |" in rows["plain-8"] and rows["plain-8"].rstrip().split("|")[-4].strip() == "—"
    assert "| 8.75 |" in rows["ResNet-20"] and "| 0.27M | 2 |" in rows["ResNet-20"]
    assert "Command: `python examples/reproduce.py --nets plain-8" in table and "Machine:" in table
    assert (out / "fig6.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "resnet-20" / "checkpoint.npz").exists() and (out / "plain-8" / "metrics.jsonl").exists()
    # a second run finds both nets finished and only rewrites the table
    stamp = (out / "resnet-20" / "checkpoint.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce.main(args) == 0
    assert (out / "resnet-20" / "checkpoint.npz").stat().st_mtime_ns == stamp
    assert (out / "results.md").read_text().split("Command")[0] == table.split("Command")[0]
    # --report tabulates the finished runs from their logs alone: no data, no checkpoint needed
    for net in ("plain-8", "resnet-20"):
        (out / net / "checkpoint.npz").unlink()
    (out / "fig6.png").unlink()
    report = ["--nets", "plain-8", "resnet-20", "--iters", "2", "--out", str(out), "--report"]
    assert reproduce.main(report) == 0
    assert (out / "results.md").read_text().split("Training error")[0] == table.split("Training error")[0]
    assert "Tabulated from the finished runs' logs" in (out / "results.md").read_text()
    assert (out / "fig6.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "resnet-20" / "checkpoint.npz").exists()
    with pytest.raises(UsageError, match="not a finished 4-iteration run of ResNet-20.*ends at iteration 2"):
        reproduce.main(["--nets", "resnet-20", "--iters", "4", "--out", str(out), "--report"])
    with pytest.raises(UsageError, match="not a finished 2-iteration run of ResNet-56.*no metrics.jsonl"):
        reproduce.main(["--nets", "resnet-56", "--iters", "2", "--out", str(out), "--report"])


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_torch_reference_trains_on_the_same_batches(image_folder, capsys):
    args = ["--depth", "8", "--iters", "3", "--window", "2", "--batch-size", "8", "--data", str(image_folder)]
    assert example("torch_reference").main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert [line.split("(")[1].split(")")[0] for line in lines] == ["iterations 1-2", "iterations 3-3"]
    for line in lines:  # "iter 2  train error 87.50 % (iterations 1-2)  test error 90.00 %  1 s"
        train_err, test_err = (float(v) for v in re.findall(r"error +([\d.]+) %", line))
        assert 0 <= train_err <= 100 and 0 <= test_err <= 100 and (test_err * 20 / 100).is_integer()  # 20 test images


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_torch_reference_writes_a_run_folder_as_the_trainer_does(tmp_path, image_folder, capsys):
    out = tmp_path / "torch-r8"
    args = ["--depth", "8", "--iters", "60", "--window", "30", "--batch-size", "8", "--lr", "0.05",
            "--data", str(image_folder), "--out", str(out)]
    assert example("torch_reference").main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    ours = tmp_path / "tinyres-r8"
    train(TrainConfig(depth=8, iters=60, milestones=(), batch_size=8, eval_every=30, data_path=str(image_folder),
                      out=str(ours), progress=False))
    rows, their_rows = (tinyres.run.read_jsonl(d / "metrics.jsonl") for d in (out, ours))
    assert [r["iter"] for r in rows] == [30, 60] and len(printed) == 2
    for row, their, line in zip(rows, their_rows, printed):
        assert set(row) - {"first_below"} == set(their) - {"first_below"}
        assert f"test error {100 * row['test_err']:6.2f} %" in line and row["split"] == "test"
        assert row["lr"] == 0.05 and 0 <= row["train_err"] <= 1 and row["test_loss"] > 0
    log, their_log = (tinyres.run.read_jsonl(d / "train_log.jsonl") for d in (out, ours))
    assert [r["iter"] for r in log] == [50, 60] and set(log[0]) == set(their_log[0])
    config = json.loads((out / "config.json").read_text())
    assert config["framework"].startswith("PyTorch") and config["depth"] == 8 and config["iters"] == 60
    np.testing.assert_array_equal(np.load(out / "mean.npy"), np.load(ours / "mean.npy"))  # the same data and split
    with pytest.raises(UsageError, match="holds a run already"):
        example("torch_reference").main(args)


@pytest.mark.parametrize("schedule", [["--schedule", "fast", "--iters", "40"], ["--schedule", "short"],
                                      ["--schedule", "fast", "--iters", "50", "--lr", "0.3"]])
def test_pytorchs_schedulers_made_from_a_recipe_step_as_tinyres_s(schedule):
    torch = pytest.importorskip("torch")
    ref = example("torch_reference")
    cfg = ref.recipe(ref.build_parser().parse_args(schedule))
    opt_t = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=cfg.momentum,
                            nesterov=cfg.nesterov)
    sched_t = tinyres.run.make_scheduler(opt_t, cfg, torch.optim.lr_scheduler)
    opt = tinyres.optim.SGD([tinyres.nn.Parameter(tinyres.zeros(1))], lr=cfg.lr, momentum=cfg.momentum,
                            nesterov=cfg.nesterov)
    sched = tinyres.run.make_scheduler(opt, cfg)
    for _ in range(cfg.iters):
        group = opt_t.param_groups[0]
        assert (opt.lr, opt.param_groups[0]["momentum"]) == pytest.approx((group["lr"], group["momentum"]), rel=1e-12)
        opt_t.step()
        sched_t.step()
        sched.step()


def test_reproduce_net_names():
    reproduce = example("reproduce")
    assert reproduce.parse_net("plain-20") == (20, True, "A")
    assert reproduce.parse_net("ResNet-110") == (110, False, "A")
    assert reproduce.parse_net("resnet-56-b") == (56, False, "B")
    with pytest.raises(Exception, match="bad net"):
        reproduce.parse_net("vgg-16")


# ---- the training command line -----------------------------------------------------------

def test_train_cifar_schedules_and_flags():
    train_cifar = example("train_cifar")
    parse = train_cifar.build_parser().parse_args
    c = train_cifar.config_from_args(parse(["--schedule", "short", "--depth", "56", "--plain"]))
    assert (c.iters, c.milestones, c.depth, c.plain, c.lr, c.batch_size) == (2000, (1500, 1900), 56, True, 0.1, 128)
    c = train_cifar.config_from_args(parse(["--schedule", "short", "--iters", "300", "--milestones", "100",
                                            "--shortcut", "b", "--val-split", "--device", "cuda"]))
    assert (c.iters, c.milestones, c.shortcut, c.val_split, c.device) == (300, (100,), "B", True, "cuda")
    c = train_cifar.config_from_args(parse([]))
    assert (c.iters, c.milestones, c.depth, c.shortcut, c.plain) == (64000, (32000, 48000), 20, "A", False)
    assert (c.momentum, c.weight_decay, c.warmup, c.eval_every) == (0.9, 1e-4, None, 1000)
    assert train_cifar.config_from_args(parse(["--schedule", "short"])).eval_every == 500
    assert train_cifar.config_from_args(parse(["--schedule", "short", "--eval-every", "7"])).eval_every == 7


def test_train_cifar_fast_schedule_and_the_flags_that_override_it():
    train_cifar = example("train_cifar")
    parse = train_cifar.build_parser().parse_args
    c = train_cifar.config_from_args(parse(["--schedule", "fast"]))
    assert (c.iters, c.lr_schedule, c.milestones, c.lr, c.weight_decay, c.nesterov) == \
        (15000, "onecycle", (), 0.2, 5e-4, True)
    assert (c.momentum, c.base_momentum, c.pct_start, c.batch_size, c.augment) == (0.95, 0.85, 0.25, 128, True)
    c = train_cifar.config_from_args(parse(["--schedule", "fast", "--iters", "5000", "--lr", "0.1", "--no-nesterov",
                                            "--anneal-strategy", "linear", "--weight-decay", "1e-4"]))
    assert (c.iters, c.lr, c.nesterov, c.anneal_strategy, c.weight_decay) == (5000, 0.1, False, "linear", 1e-4)
    c = train_cifar.config_from_args(parse(["--lr-schedule", "cosine", "--pct-start", "0.1"]))
    assert (c.iters, c.lr_schedule, c.pct_start, c.lr, c.nesterov) == (64000, "cosine", 0.1, 0.1, False)



def test_train_cifar_resume_takes_the_saved_config(tmp_path):
    train_cifar = example("train_cifar")
    out = tmp_path / "run"
    out.mkdir()
    saved = TrainConfig(depth=56, plain=True, iters=2000, milestones=(1500, 1900), batch_size=64, eval_every=50,
                        data_path="somewhere/cifar.tar.gz", out=str(out))
    (out / "config.json").write_text(json.dumps(saved.to_dict()))

    def resumed(*flags: str) -> TrainConfig:
        parser = train_cifar.build_parser()
        argv = ["--out", str(out), "--resume", *flags]
        return train_cifar.resume_config(parser, argv, parser.parse_args(argv))

    c = resumed()
    assert (c.depth, c.plain, c.iters, c.milestones, c.batch_size, c.eval_every, c.resume) == \
        (56, True, 2000, (1500, 1900), 64, 50, True)
    assert c.data_path == "somewhere/cifar.tar.gz"
    c = resumed("--iters", "3000", "--data", "here.tar.gz", "--quiet")
    assert (c.depth, c.iters, c.milestones, c.data_path, c.progress) == (56, 3000, (1500, 1900), "here.tar.gz", False)
    c = resumed("--schedule", "paper")
    assert (c.iters, c.milestones, c.eval_every) == (64000, (32000, 48000), 50)


def test_train_cifar_refuses_resume_flags_that_would_change_the_run(tmp_path):
    train_cifar = example("train_cifar")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(TrainConfig(depth=20, out=str(out)).to_dict()))

    def resumed(*flags: str) -> TrainConfig:
        parser = train_cifar.build_parser()
        argv = ["--out", str(out), "--resume", *flags]
        return train_cifar.resume_config(parser, argv, parser.parse_args(argv))

    for flags, named in ((["--depth", "32"], "--depth (20 in the run, 32 given)"),
                         (["--plain", "--batch-size", "64"], "--plain (False in the run, True given), --batch-size"),
                         (["--warmup", "on"], "--warmup (None in the run, True given)")):
        with pytest.raises(UsageError, match=re.escape(named) + ".*ResNet-20.*another --out"):
            resumed(*flags)
    assert resumed("--depth", "20", "--lr", "0.05").lr == 0.05  # repeating the saved depth is fine
    done = run_script("train_cifar", "--out", out, "--resume", "--depth", "32")
    assert_usage_error(done, "--depth (20 in the run, 32 given)")


def test_train_cifar_ctrl_c_saves_and_resume_finishes(tmp_path, image_folder):
    out = tmp_path / "run"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / "train_cifar.py"), "--depth", "8", "--data", str(image_folder),
           "--batch-size", "8", "--eval-every", "3", "--checkpoint-every", "1000000", "--out", str(out)]
    # no lr milestones: a milestone beyond the shorter --iters of the resumed run would be refused
    child = subprocess.Popen([*cmd, "--iters", "100000", "--milestones"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while child.poll() is None and not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert f"checkpoint saved to {out / 'checkpoint.npz'}" in err
    it = load_checkpoint(out / "checkpoint.npz", build_model(8))["iteration"]
    assert it >= 3

    resume = [sys.executable, str(EXAMPLES / "train_cifar.py"), "--out", str(out), "--resume", "--iters", str(it + 2)]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out / 'checkpoint.npz'} at iteration {it}" in done.stderr
    assert f"ResNet-8: {it + 2} iterations" in done.stdout


def test_train_cifar_sigterm_saves_and_exits_143(tmp_path, image_folder):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "train_cifar.py"), "--depth", "8", "--data", str(image_folder),
           "--batch-size", "8", "--eval-every", "3", "--iters", "100000", "--milestones", "--out", str(out)]
    child = subprocess.Popen(cmd, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while child.poll() is None and not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err  # 128 + SIGTERM, as a shell reports a process ended by it
    assert "SIGTERM: interrupted at iteration" in err and f"checkpoint saved to {out / 'checkpoint.npz'}" in err


# ---- ordinary mistakes: one line on stderr, exit status 2, nothing left behind ------------

def run_script(name: str, *args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run examples/<name>.py in a fresh Python with `args`."""
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, **(env or {})}, **kwargs)


def assert_usage_error(done: subprocess.CompletedProcess, *names: str) -> str:
    """The script failed with exit status 2 and one line on stderr that holds each of `names`; returns the line."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0]
    return lines[0]


@pytest.mark.parametrize("flags, named", [
    (["--depth", "21"], "--depth"),
    (["--iters", "0"], "--iters"),
    (["--iters", "-5"], "--iters"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--iters", "100", "--milestones", "50", "150"], "--milestones"),
    (["--data", "no-such-archive.tar.gz"], "no-such-archive.tar.gz"),
    (["--schedule", "fast", "--base-momentum", "0.99"], "--base-momentum"),
    (["--schedule", "fast", "--pct-start", "1.5"], "--pct-start"),
    (["--lr-schedule", "onecycle", "--div-factor", "0.5"], "--div-factor"),
])
def test_train_cifar_refuses_bad_flags_and_writes_nothing(tmp_path, flags, named):
    done = run_script("train_cifar", *flags, "--out", tmp_path / "runs" / "r", cwd=tmp_path)
    assert_usage_error(done, named)
    assert not (tmp_path / "runs").exists()


def test_train_cifar_refuses_a_corrupt_archive(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    done = run_script("train_cifar", "--data", archive, "--iters", "2", "--out", tmp_path / "run")
    assert_usage_error(done, "--data", str(archive))
    assert not (tmp_path / "run").exists()


def test_train_cifar_refuses_an_unwritable_out(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    done = run_script("train_cifar", "--iters", "2", "--out", tmp_path / "a-file" / "run")
    assert_usage_error(done, "--out", "a-file")


def test_train_cifar_refuses_an_existing_run_without_resume(tmp_path, trained_runs):
    done = run_script("train_cifar", "--depth", "8", "--iters", "2", "--out", trained_runs["resnet8"])
    assert_usage_error(done, "--out", "--resume")


def test_train_cifar_batch_larger_than_the_data(tmp_path, image_folder):
    done = run_script("train_cifar", "--depth", "8", "--iters", "2", "--batch-size", "1000", "--data", image_folder,
                      "--out", tmp_path / "run")
    assert_usage_error(done, "--batch-size", "40 training images")
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_empty_folder(tmp_path):
    cli = importlib.import_module("cli")
    run = tmp_path / "runs" / "r"
    with pytest.raises(OSError), cli.removed_if_left_empty(run):
        run.mkdir(parents=True)
        raise OSError("failed before writing anything")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(OSError), cli.removed_if_left_empty(run):
        run.mkdir(parents=True)
        (run / "config.json").write_text("{}")
        raise OSError("failed after writing the config")
    assert (run / "config.json").exists()  # kept: the failure left something worth looking at
    with cli.removed_if_left_empty(tmp_path / "new"):
        (tmp_path / "new").mkdir()
    assert (tmp_path / "new").is_dir()


def _limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # config and mean fit; a checkpoint does not


def test_train_cifar_reports_a_failed_write_in_one_line(tmp_path, image_folder):
    out = tmp_path / "run"
    args = ["--depth", "8", "--iters", "2", "--batch-size", "8", "--data", image_folder, "--out", out, "--quiet"]
    done = run_script("train_cifar", *args, preexec_fn=_limit_file_size)
    line = assert_usage_error(done, f"--out {out}", "File too large")
    assert "free" in line  # says what to do
    debug = run_script("train_cifar", *args, "--resume", "--debug", preexec_fn=_limit_file_size)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_train_cifar_scales_the_milestones_with_iters():
    train_cifar = example("train_cifar")
    parse = train_cifar.build_parser().parse_args
    assert train_cifar.config_from_args(parse(["--iters", "1000"])).milestones == (500, 750)
    assert train_cifar.config_from_args(parse(["--schedule", "short", "--iters", "200"])).milestones == (150, 190)
    assert train_cifar.config_from_args(parse(["--iters", "1000", "--milestones", "900"])).milestones == (900,)
    assert "50%" in train_cifar.build_parser().format_help()


@pytest.mark.parametrize("flags, named", [
    (["--iters", "0"], "--iters"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--nets", "resnet-21"], "--nets"),
    (["--data", "no-such-archive.tar.gz"], "no-such-archive.tar.gz"),
])
def test_reproduce_refuses_bad_flags_and_writes_nothing(tmp_path, flags, named):
    done = run_script("reproduce", *flags, "--out", tmp_path / "repro", cwd=tmp_path)
    assert_usage_error(done, named)
    assert not (tmp_path / "repro").exists()


def without(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which `import module` fails as if it were not installed."""
    blocker = tmp_path / "blocked"
    blocker.mkdir(exist_ok=True)
    (blocker / f"{module}.py").write_text(f"raise ImportError('No module named {module}')\n")
    return {"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


@pytest.mark.parametrize("script", ["reproduce", "layer_responses"])
def test_help_and_a_clear_error_without_matplotlib(tmp_path, script):
    env = without(tmp_path, "matplotlib")
    done = run_script(script, "--help", env=env)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    args = ["--iters", "2", "--out", tmp_path / "o"] if script == "reproduce" else [tmp_path, "--out", tmp_path / "o.png"]
    assert_usage_error(run_script(script, *args, env=env), "matplotlib", "[plot]")
    assert not (tmp_path / "o").exists()


def test_predict_help_without_pillow(tmp_path):
    env = without(tmp_path, "PIL")
    done = run_script("predict", "--help", env=env)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    assert_usage_error(run_script("predict", tmp_path, "x.png", env=env), "Pillow", "[data]")


@pytest.mark.parametrize("top", ["0", "-2", "11"])
def test_predict_refuses_a_bad_top(tmp_path, top):
    assert_usage_error(run_script("predict", tmp_path / "run", tmp_path / "x.png", "--top", top), "--top", top)


def test_predict_refuses_non_finite_weights(tmp_path, trained_runs):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "mean.npy"):
        (run / name).write_bytes((trained_runs["resnet8"] / name).read_bytes())
    model = build_model(8)
    load_checkpoint(trained_runs["resnet8"] / "checkpoint.npz", model)
    model.fc.weight.data[0, 0] = np.nan
    save_checkpoint(run / "checkpoint.npz", model)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert_usage_error(run_script("predict", run, image), str(run / "checkpoint.npz"), "not finite")


def test_predict_refuses_a_file_that_is_not_an_image(tmp_path, trained_runs):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    assert_usage_error(run_script("predict", trained_runs["resnet8"], text), str(text))
    assert_usage_error(run_script("predict", trained_runs["resnet8"], missing), str(missing))


def test_predict_refuses_a_corrupt_checkpoint(tmp_path, trained_runs):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "mean.npy"):
        (run / name).write_bytes((trained_runs["resnet8"] / name).read_bytes())
    (run / "checkpoint.npz").write_bytes((trained_runs["resnet8"] / "checkpoint.npz").read_bytes()[:1000])
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert_usage_error(run_script("predict", run, image), str(run / "checkpoint.npz"))


def test_readme_quickstart_installs_what_the_examples_import():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    quickstart = (REPO / "README.md").read_text().split("## Quickstart")[1].split("\n## ")[0]
    named = re.search(r'pip install -e "\.\[([\w,]+)\]"', quickstart).group(1).split(",")
    installed = " ".join(req for extra in named for req in extras[extra])
    assert "pillow" in installed and "matplotlib" in installed
    assert {"data", "plot", "dev", "cuda"} <= set(extras)


# ---- the shipped weights --------------------------------------------------------------------

SHIPPED = REPO / "examples" / "results" / "weights" / "resnet-20.npz"
SHIPPED_RUN = REPO / "examples" / "results" / "fast" / "resnet-20"  # the run they were exported from


def test_the_shipped_weights_classify_an_image_with_nothing_beside_them(tmp_path, capsys):
    assert SHIPPED.stat().st_size < 1.5e6  # the weights alone, without the optimizer's state
    alone = tmp_path / "resnet-20.npz"
    alone.write_bytes(SHIPPED.read_bytes())
    image = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (40, 90, 200)).save(image)
    assert example("predict").main([str(alone), str(image), "--top", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"ResNet-20 from {alone}") and lines[1].startswith(f"{image}: ")
    assert sorted(c for c in CLASSES if f" {c} " in lines[1]) == sorted(CLASSES)
    assert sum(float(p.rstrip("%")) for p in lines[1].split() if p.endswith("%")) == pytest.approx(100, abs=0.1)
    extra = tinyres.load(SHIPPED)["extra"]  # the run's config and per-pixel mean, as committed beside its logs
    config = json.loads((SHIPPED_RUN / "config.json").read_text())
    keys = ("depth", "plain", "shortcut", "iters", "lr_schedule", "lr", "weight_decay", "seed", "data_path")
    assert {k: extra["config"][k] for k in keys} == {k: config[k] for k in keys}
    np.testing.assert_array_equal(extra["mean"], np.load(SHIPPED_RUN / "mean.npy"))


@pytest.mark.real_data
def test_the_shipped_weights_reproduce_their_runs_test_error(tmp_path, capsys, real_archive):
    final = json.loads((SHIPPED_RUN / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["split"] == "test" and final["iter"] == 15000
    assert example("evaluate").main([str(SHIPPED), "--data", str(real_archive)]) == 0
    out = capsys.readouterr().out
    found = re.search(r"test error ([\d.]+)% \(([\d,]+) of 10,000 test images wrong\)", out)
    assert found, f"evaluate.py printed no test error line:\n{out}"
    # batches of 1,000 as the trainer's; at a thread count other than the run's, float32 sums may move an image
    assert abs(int(found[2].replace(",", "")) - round(10000 * final["test_err"])) <= 3
    images = []
    with tarfile.open(real_archive, "r|gz") as tar:  # the first test image of each class
        for member in tar:
            if member.name.startswith("test/") and member.name.endswith("/0000.jpg"):
                images.append(tmp_path / member.name.replace("/", "-"))
                images[-1].write_bytes(tar.extractfile(member).read())
    assert len(images) == 10
    assert example("predict").main([str(SHIPPED), *map(str, images), "--top", "1"]) == 0
    answers = capsys.readouterr().out.strip().splitlines()[1:]
    right = [line.split(": ")[0].split("-")[-2] in line.split(": ")[1] for line in answers]
    assert sum(right) >= 8, answers


class _Enough(Exception):
    """Raised by the callback that ends a run early."""


@pytest.mark.real_data
def test_the_fast_runs_config_retraces_its_logged_first_iterations(tmp_path, real_archive, threads):
    """The committed fast-preset run, retrained from its own config.json on the same data and thread
    count, logs the same first rows: the README's figure is one command away on a fresh clone."""
    logged = read_train_log(SHIPPED_RUN)[:2]
    config = dataclasses.replace(tinyres.train.load_run_config(SHIPPED_RUN), data_path=str(real_archive),
                                 out=str(tmp_path / "run"), progress=False)

    def stop_after_second_row(it: int, loss: float) -> None:
        if it > logged[-1]["iter"]:  # called before iteration `it` is logged: the rows before it are written
            raise _Enough

    threads(read_metrics(SHIPPED_RUN)[0]["threads"])
    with pytest.raises(_Enough):
        train(config, on_iteration=stop_after_second_row)
    rows = read_train_log(config.out)
    assert [r["iter"] for r in rows] == [r["iter"] for r in logged] == [50, 100]
    for row, want in zip(rows, logged):
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-12)
        # bit-identical on the run's kind of CPU; another CPU's BLAS kernels order float32 sums differently
        assert row["train_loss"] == pytest.approx(want["train_loss"], rel=2e-3)
        assert abs(row["train_err"] - want["train_err"]) <= 8 / (128 * 50)
