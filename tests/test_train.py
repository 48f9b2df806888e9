"""Tests of tinyres.train: learning, exact resume, Ctrl-C, SIGKILL during checkpoints, divergence."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import real_cifar10

import tinyres
import tinyres.train
from tinyres import cuda_available
from tinyres.atomic import AtomicWriteError
from tinyres.checkpoint import CheckpointError, load_checkpoint
from tinyres.data import CIFAR10, CLASSES
from tinyres.run import Run, StopRequest
from tinyres.train import (
    DivergenceError,
    Progress,
    TrainConfig,
    build_model,
    default_eval_every,
    evaluate,
    load_run_config,
    read_metrics,
    read_train_log,
    train,
)

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# ten well-separated colours, one per class
COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                   [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]], np.float32)


def synthetic_cifar(n_train: int = 256, n_test: int = 64, size: int = 8, seed: int = 0) -> CIFAR10:
    """A learnable stand-in for CIFAR-10: a disc of the class colour at a random place on noise."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = rng.normal(128, 40, (n, size, size, 3))
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, (2, n, 1, 1))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 3.5) ** 2
        x = np.where(disc[..., None], 0.8 * COLORS[y][:, None, None, :] + 0.2 * x, x)
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return CIFAR10(*make(n_train), *make(n_test), source="synthetic")


def real_subset(path: Path, train_per_class: int, test_per_class: int, size: int = 16) -> CIFAR10:
    """The first images of each class of the real archive, shrunk to size x size (2x2 means) for speed."""
    from PIL import Image

    want = {"train": train_per_class, "test": test_per_class}
    got: dict[tuple[str, str], list[np.ndarray]] = {(s, c): [] for s in want for c in CLASSES}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            key = tuple(member.name.split("/")[-3:-1])
            if member.isfile() and key in got and len(got[key]) < want[key[0]]:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    got[key].append(np.asarray(im.convert("RGB")))
    arrays = []
    k = 32 // size
    for split, per_class in want.items():
        x = np.stack([im for c in CLASSES for im in got[(split, c)]])
        x = x.reshape(len(x), size, k, size, k, 3).mean(axis=(2, 4)).round().astype(np.uint8)
        arrays += [x, np.repeat(np.arange(10, dtype=np.int64), per_class)]
    return CIFAR10(*arrays, source=str(path))


def tiny_config(out: Path, **kw) -> TrainConfig:
    """A ResNet-8 run on 8x8 images, batch 8: fast enough to train many times per test."""
    kw = {"depth": 8, "iters": 12, "milestones": (9,), "batch_size": 8, "eval_every": 4, "checkpoint_every": 5,
          "eval_batch_size": 64, "out": str(out), "progress": False, **kw}
    return TrainConfig(**kw)


def final_state(run_dir: Path, config: TrainConfig) -> dict[str, np.ndarray]:
    model = build_model(config.depth, config.plain, config.shortcut)
    load_checkpoint(Path(run_dir) / "checkpoint.npz", model)
    return model.state_dict()


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, b[k], err_msg=k)


# A child process that trains (or resumes) a config on data saved to an .npz. Each fsync takes
# $SLOW_FSYNC seconds longer, so that a kill often lands while a checkpoint is being written.
CHILD = """
import json, os, sys, time
_fsync = os.fsync
os.fsync = lambda fd: (time.sleep(float(os.environ.get("SLOW_FSYNC", "0"))), _fsync(fd))[1]
sys.path.insert(0, {repo!r})
import numpy as np
from tinyres.data import CIFAR10
from tinyres.train import TrainConfig, train
arrays = np.load(sys.argv[1])
try:
    train(TrainConfig(**json.loads(sys.argv[2])), data=CIFAR10(**{{k: arrays[k] for k in arrays.files}}, source="npz"))
except KeyboardInterrupt as e:
    print(e, file=sys.stderr)
    sys.exit(130)
"""


def child_command(tmp_path: Path, data: CIFAR10, config: TrainConfig) -> list[str]:
    """The command line of a CHILD process that trains (resuming) `config` on `data`."""
    script, arrays = tmp_path / "child.py", tmp_path / "data.npz"
    if not script.exists():
        script.write_text(CHILD.format(repo=str(REPO)))
        np.savez(arrays, train_images=data.train_images, train_labels=data.train_labels,
                 test_images=data.test_images, test_labels=data.test_labels)
    return [sys.executable, str(script), str(arrays), json.dumps(config.to_dict())]


def run_child(command: list[str], env: dict[str, str]) -> None:
    """Run a CHILD to the end; fail with its stderr if it fails."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def tiny_data() -> CIFAR10:
    return synthetic_cifar()


# ---- learning ----------------------------------------------------------------------------

def test_smoke_training_learns(tmp_path):
    """ResNet-8 on 2,000 real CIFAR-10 images (or a synthetic set): loss and error fall clearly."""
    path = real_cifar10()
    if path is not None:
        data, iters = real_subset(path, 200, 50), 240
    else:
        data, iters = synthetic_cifar(2000, 500, size=16), 120
    config = TrainConfig(depth=8, iters=iters, milestones=(iters * 5 // 6,), batch_size=32, eval_every=iters // 4,
                         checkpoint_every=iters, eval_batch_size=500, out=str(tmp_path / "run"), progress=False)
    t0 = time.perf_counter()
    # In a child with one BLAS thread: on a busy 2-core machine, OpenBLAS's threads waiting on each
    # other made this run 4x slower. The test checks learning, not speed.
    run_child(child_command(tmp_path, data, config), ONE_THREAD)
    rows = read_metrics(config.out)
    first, last = rows[0], rows[-1]
    print(f"{data.source}: {len(rows)} evaluations in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{r['iter']}: loss {r['train_loss']:.3f} err {r['train_err']:.3f}/{r['test_err']:.3f}"
                      for r in rows))
    assert [r["iter"] for r in rows] == [iters // 4, iters // 2, 3 * iters // 4, iters]
    assert last["train_loss"] < first["train_loss"] - 0.15
    assert last["train_err"] < first["train_err"] - 0.05
    assert last["test_err"] < (0.75 if path is not None else 0.3)  # chance is 0.9
    assert last["split"] == "test"
    assert set(first) == {"iter", "lr", "train_loss", "train_err", "test_loss", "test_err", "split", "elapsed",
                          "threads"}


def test_evaluate_uses_eval_mode_and_restores_training(tiny_data):
    model = build_model(8)
    model.train()
    mean = np.zeros((3, 8, 8), np.float32)
    loss, err = evaluate(model, tiny_data.test_images, tiny_data.test_labels, mean, batch_size=20)
    assert model.training
    assert np.isfinite(loss) and 0 <= err <= 1
    # in eval mode batch size does not matter: one batch gives the same numbers
    loss1, err1 = evaluate(model, tiny_data.test_images, tiny_data.test_labels, mean, batch_size=1000)
    assert err1 == err and loss1 == pytest.approx(loss, rel=1e-5)


def test_run_directory_contents(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "run", val_split=True, val_size=32, log_every=5)
    result = train(config, data=tiny_data)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["depth"] == 8 and saved["milestones"] == [9] and saved["val_split"] is True
    mean = np.load(run / "mean.npy")
    assert mean.shape == (3, 8, 8) and mean.dtype == np.float32 and 0.2 < mean.mean() < 0.8
    rows = read_metrics(run)
    assert [r["iter"] for r in rows] == [4, 8, 12]
    assert all(r["split"] == "val" for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.01])  # /10 from iteration 9 (0-based)
    assert result["test_err"] == rows[-1]["test_err"] and result["params"] > 0
    dense = read_train_log(run)
    assert [r["iter"] for r in dense] == [5, 10, 12]  # every log_every, and the end
    assert set(dense[0]) == {"iter", "lr", "train_loss", "train_err", "elapsed"}
    assert 0 <= dense[0]["train_err"] <= 1 and dense[-1]["lr"] == pytest.approx(0.01)
    # resuming a finished run does nothing and returns its results
    again = train(tiny_config(run, val_split=True, val_size=32, log_every=5, resume=True), data=tiny_data)
    assert again["history"] == rows


# ---- resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"warmup": True, "warmup_iters": 10, "warmup_error": 0.5}, {"prefetch": 2},
                                     {"lr_schedule": "onecycle", "milestones": (), "momentum": 0.95, "nesterov": True},
                                     {"lr_schedule": "cosine", "milestones": (), "pct_start": 0.25}],
                         ids=["multistep", "warmup", "prefetch", "onecycle", "cosine"])
def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, tiny_data, options):
    """Ctrl-C at iteration 7 saves; resuming ends with bitwise the parameters of an unbroken run."""
    options = {"log_every": 3, **options}
    whole = tiny_config(tmp_path / "whole", **options)
    train(whole, data=tiny_data)

    def press_ctrl_c(it: int, loss: float) -> None:
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)

    broken = tiny_config(tmp_path / "broken", **options)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job a shell put in the background
    with pytest.raises(KeyboardInterrupt, match=r"iteration 7; checkpoint saved to .*broken/checkpoint.npz"):
        train(broken, data=tiny_data, on_iteration=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    model = build_model(8)
    assert load_checkpoint(tmp_path / "broken" / "checkpoint.npz", model)["iteration"] == 7

    result = train(tiny_config(tmp_path / "broken", resume=True, **options), data=tiny_data)
    assert result["iterations"] == 12
    assert_same_state(final_state(tmp_path / "broken", broken), final_state(tmp_path / "whole", whole))
    # the logged metrics match too (the training averages span the interruption)
    assert_same_logs(tmp_path / "broken", tmp_path / "whole")


def test_sigterm_saves_before_a_due_evaluation_and_the_resumed_run_makes_it(tmp_path, tiny_data):
    options = {"iters": 8, "eval_every": 4, "log_every": 2, "checkpoint_every": 100}
    whole = tiny_config(tmp_path / "whole", **options)
    train(whole, data=tiny_data)

    def send_sigterm(it: int, loss: float) -> None:
        if it == 4:  # an evaluation is due after this iteration
            os.kill(os.getpid(), signal.SIGTERM)

    broken = tiny_config(tmp_path / "broken", **options)
    with pytest.raises(tinyres.run.Interrupted, match="SIGTERM: interrupted at iteration 4") as info:
        train(broken, data=tiny_data, on_iteration=send_sigterm)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert read_metrics(tmp_path / "broken") == []  # saved without evaluating first
    assert tinyres.load(tmp_path / "broken" / "checkpoint.npz")["extra"]["eval_pending"]

    train(tiny_config(tmp_path / "broken", resume=True, **options), data=tiny_data)
    assert_same_state(final_state(tmp_path / "broken", broken), final_state(tmp_path / "whole", whole))
    assert_same_logs(tmp_path / "broken", tmp_path / "whole")


def test_a_run_stopped_at_its_end_makes_its_last_evaluation_on_resume(tmp_path, tiny_data):
    def send_sigterm(it: int, loss: float) -> None:
        if it == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config(tmp_path / "run", iters=4, eval_every=2, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(config, data=tiny_data, on_iteration=send_sigterm)
    assert [r["iter"] for r in read_metrics(tmp_path / "run")] == [2]
    result = train(dataclasses.replace(config, resume=True), data=tiny_data)
    assert [r["iter"] for r in result["history"]] == [2, 4]
    train(dataclasses.replace(config, resume=True), data=tiny_data)  # nothing left to do: no second row
    assert [r["iter"] for r in read_metrics(tmp_path / "run")] == [2, 4]


def assert_same_logs(run: Path, reference: Path) -> None:
    """The evaluations and the dense training curve of two runs agree row for row (but for wall time)."""
    for read in (read_metrics, read_train_log):
        strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in read(run)]
        assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in read(reference)]
        assert strip


def test_deep_nets_warm_up(tmp_path, tiny_data):
    """ResNet-110 starts at lr 0.01 (the paper's warm-up); ResNet-8 at 0.1 unless asked."""
    rows = train(tiny_config(tmp_path / "r110", depth=110, iters=1, eval_every=1), data=tiny_data)["history"]
    assert rows[0]["lr"] == pytest.approx(0.01)
    rows = train(tiny_config(tmp_path / "r8", iters=1, eval_every=1), data=tiny_data)["history"]
    assert rows[0]["lr"] == pytest.approx(0.1)
    rows = train(tiny_config(tmp_path / "r8w", iters=4, eval_every=1, warmup=True, warmup_iters=2,
                             warmup_error=0.0), data=tiny_data)["history"]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.1, 0.1])


def test_settings_changed_on_resume_apply_and_are_recorded(tmp_path, tiny_data):
    run = tmp_path / "run"
    train(tiny_config(run, iters=4, eval_every=2, checkpoint_every=4, lr=0.1), data=tiny_data)
    result = train(tiny_config(run, iters=8, eval_every=2, checkpoint_every=4, lr=0.05, milestones=(6,),
                               momentum=0.8, weight_decay=5e-4, resume=True), data=tiny_data)
    assert [r["lr"] for r in result["history"]] == pytest.approx([0.1, 0.1, 0.05, 0.005])
    saved = json.loads((run / "config.json").read_text())
    assert (saved["iters"], saved["lr"], saved["milestones"], saved["momentum"]) == (8, 0.05, [6], 0.8)
    group = tinyres.load(run / "checkpoint.npz")["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 5e-4)


def test_a_onecycle_schedule_changed_on_resume_is_built_anew_at_the_iteration(tmp_path, tiny_data):
    run = tmp_path / "run"
    options = {"lr_schedule": "onecycle", "milestones": (), "log_every": 1, "eval_every": 100, "checkpoint_every": 4}
    train(tiny_config(run, iters=4, lr=0.4, **options), data=tiny_data)
    train(tiny_config(run, iters=10, lr=0.2, resume=True, **options), data=tiny_data)
    opt = tinyres.optim.SGD(build_model(8).parameters(), lr=0.2, momentum=0.9)
    reference = tinyres.optim.OneCycleLR(opt, max_lr=0.2, total_steps=10, pct_start=0.3, max_momentum=0.9)
    expected = []
    for _ in range(10):
        expected.append(opt.lr)
        reference.step()
    assert [r["lr"] for r in read_train_log(run)][4:] == pytest.approx(expected[4:], rel=1e-12)
    assert json.loads((run / "config.json").read_text())["iters"] == 10


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_non_finite_loss_stops_before_the_update_and_resume_works(tmp_path, tiny_data):
    run = tmp_path / "run"
    reached = []
    config = tiny_config(run, iters=9, lr=300, checkpoint_every=4, log_every=100, eval_every=100)
    with pytest.raises(DivergenceError, match=r"the loss is nan; this step's update was not made at iteration 7; "
                                              r"the last good checkpoint is .*checkpoint.npz \(iteration 4\)"):
        train(config, data=tiny_data, on_iteration=lambda it, loss: reached.append(it))
    assert reached == [1, 2, 3, 4, 5, 6]  # it stopped at the first NaN, not at the end of a log window
    result = train(dataclasses.replace(config, lr=1e-9, resume=True), data=tiny_data)  # from iteration 4
    assert result["iterations"] == 9 and np.isfinite(result["train_loss"])


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_loss_grown_far_beyond_its_start_is_named(tmp_path, tiny_data, capsys):
    train(tiny_config(tmp_path / "run", iters=6, lr=50, log_every=2, eval_every=100), data=tiny_data)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1  # said once
    assert re.search(r"\[ResNet-8\] warning: the training loss is \S+ at iteration \d, \S+ times its start "
                     r"\(2\.\d+\): training is diverging; a lower learning rate \(--lr\) may help", warnings[0])


def test_one_cycle_run_follows_onecycle_lr_and_cycles_the_momentum(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "run", lr_schedule="onecycle", milestones=(), lr=0.4, pct_start=0.25,
                         momentum=0.95, base_momentum=0.85, nesterov=True, weight_decay=5e-4, log_every=1)
    train(config, data=tiny_data)
    opt = tinyres.optim.SGD(build_model(8).parameters(), lr=0.4, momentum=0.95, nesterov=True)
    reference = tinyres.optim.OneCycleLR(opt, max_lr=0.4, total_steps=12, pct_start=0.25)
    expected_lr, expected_momentum = [], []
    for _ in range(12):  # the lr and momentum each iteration trained with
        expected_lr.append(opt.lr)
        expected_momentum.append(opt.param_groups[0]["momentum"])
        reference.step()
    assert [r["lr"] for r in read_train_log(tmp_path / "run")] == pytest.approx(expected_lr, rel=1e-12)
    assert max(expected_lr) == pytest.approx(0.4) and expected_lr[0] == pytest.approx(0.4 / 25)
    after_last_step = opt.param_groups[0]["momentum"]  # near the top again (0.947)
    saved = tinyres.load_checkpoint(tmp_path / "run" / "checkpoint.npz", build_model(8), opt)
    assert saved["config"]["lr_schedule"] == "onecycle" and opt.param_groups[0]["nesterov"] is True
    assert opt.param_groups[0]["momentum"] == after_last_step > 0.94
    assert min(expected_momentum) == pytest.approx(0.85, abs=0.01)


def test_the_first_evaluation_below_each_target_error_is_marked_once(tmp_path, tiny_data, monkeypatch):
    """Time to accuracy: a row says which target errors it is the first to beat, across a resume too."""
    monkeypatch.setitem(tinyres.run.PAPER_TEST_ERROR, 8, 0.999)  # a target that ResNet-8 beats at once
    assert tinyres.run.error_targets(tiny_config(tmp_path)) == [0.10, 0.999]
    assert tinyres.run.error_targets(tiny_config(tmp_path, plain=True)) == [0.10]

    def press_ctrl_c(it: int, loss: float) -> None:
        if it == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "run", eval_every=2), data=tiny_data, on_iteration=press_ctrl_c)
    rows = train(tiny_config(tmp_path / "run", eval_every=2, resume=True), data=tiny_data)["history"]
    marked = [(r["iter"], r["first_below"]) for r in rows if "first_below" in r]
    assert marked[0] == (2, [0.999]) and len(rows) == 6
    below_10 = [r["iter"] for r in rows if r["test_err"] < 0.10]
    assert marked[1:] == ([(below_10[0], [0.10])] if below_10 else [])
    assert tinyres.train.first_below(rows, 0.999) is rows[0] and tinyres.train.first_below(rows, -1.0) is None


def test_each_evaluation_records_the_thread_count_it_ran_with(tmp_path, tiny_data, threads):
    """Float32 results depend on the thread count, so a row says which one produced it, resumed or not."""
    threads(1)
    train(tiny_config(tmp_path / "run", iters=4, eval_every=2), data=tiny_data)
    threads(2)
    rows = train(tiny_config(tmp_path / "run", iters=6, eval_every=2, resume=True), data=tiny_data)["history"]
    assert [(r["iter"], r["threads"]) for r in rows] == [(2, 1), (4, 1), (6, 2)]


def test_a_run_saved_before_the_schedule_settings_existed_resumes_unchanged(tmp_path, tiny_data, capsys):
    """A checkpoint whose config lacks lr_schedule, nesterov, ... resumes as the paper's schedule, with no change."""
    whole = tiny_config(tmp_path / "whole")
    train(whole, data=tiny_data)

    def press_ctrl_c(it: int, loss: float) -> None:
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "old"), data=tiny_data, on_iteration=press_ctrl_c)
    newer = ("lr_schedule", "pct_start", "anneal_strategy", "div_factor", "final_div_factor", "cycle_momentum",
             "base_momentum", "nesterov")
    path = tmp_path / "old" / "checkpoint.npz"
    ckpt = tinyres.load(path)
    ckpt["extra"]["config"] = {k: v for k, v in ckpt["extra"]["config"].items() if k not in newer}
    tinyres.save(ckpt, path)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in newer}))
    capsys.readouterr()
    train(tiny_config(tmp_path / "old", resume=True, progress=True), data=tiny_data)
    assert "changed on resume" not in capsys.readouterr().err
    assert_same_state(final_state(tmp_path / "old", whole), final_state(tmp_path / "whole", whole))


def test_resume_refuses_another_network(tmp_path, tiny_data):
    train(tiny_config(tmp_path / "run", iters=2), data=tiny_data)
    with pytest.raises(ValueError, match=r"different network.*depth: saved 8, requested 14"):
        train(tiny_config(tmp_path / "run", depth=14, iters=4, resume=True), data=tiny_data)
    with pytest.raises(ValueError, match=r"plain: saved False, requested True"):
        train(tiny_config(tmp_path / "run", plain=True, iters=4, resume=True), data=tiny_data)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(tmp_path / "run", iters=4), data=tiny_data)


def test_sigkill_at_random_moments_never_corrupts_the_checkpoint(tmp_path, tiny_data):
    iters, ckpt = 40, tmp_path / "killed" / "checkpoint.npz"
    killed = child_command(tmp_path, tiny_data, tiny_config(tmp_path / "killed", iters=iters, checkpoint_every=1,
                                                            eval_every=5, resume=True))
    env = {**ONE_THREAD, "SLOW_FSYNC": "0.02"}
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(4):
        child = subprocess.Popen(killed, env=env, stderr=subprocess.PIPE)
        # wait until this process has saved a checkpoint of its own, then kill it at a random moment
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        if child.poll() is not None:
            break
        child.send_signal(signal.SIGKILL)
        kills += 1
        assert child.wait() == -signal.SIGKILL, child.stderr.read().decode()
        child.stderr.close()
        # whatever the kill interrupted, the checkpoint on disk is whole and loads
        assert 1 <= load_checkpoint(ckpt, build_model(8))["iteration"] <= iters
    assert kills >= 3
    run_child(killed, env)  # finish the run
    whole = tiny_config(tmp_path / "whole", iters=iters, checkpoint_every=1, eval_every=5)
    run_child(child_command(tmp_path, tiny_data, whole), env)
    assert_same_state(final_state(ckpt.parent, whole), final_state(tmp_path / "whole", whole))
    assert [r["iter"] for r in read_metrics(ckpt.parent)] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_sigterm_saves_and_resuming_is_exact(tmp_path, tiny_data):
    """A real process sent SIGTERM saves a checkpoint and says where; resuming it equals an unbroken run."""
    run = tmp_path / "termed"
    command = child_command(tmp_path, tiny_data, tiny_config(run, iters=100_000, log_every=2, eval_every=4))
    child = subprocess.Popen(command, env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while child.poll() is None and not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "SIGTERM: interrupted at iteration" in err and f"checkpoint saved to {run / 'checkpoint.npz'}" in err
    it = load_checkpoint(run / "checkpoint.npz", build_model(8))["iteration"]
    assert it >= 4

    # both in child processes with one BLAS thread, so that the arithmetic is the same
    run_child(child_command(tmp_path, tiny_data, tiny_config(run, iters=it + 3, log_every=2, eval_every=4,
                                                             resume=True)), ONE_THREAD)
    whole = tiny_config(tmp_path / "whole", iters=it + 3, log_every=2, eval_every=4)
    run_child(child_command(tmp_path, tiny_data, whole), ONE_THREAD)
    assert load_checkpoint(run / "checkpoint.npz", build_model(8))["iteration"] == it + 3
    assert_same_state(final_state(run, whole), final_state(tmp_path / "whole", whole))
    assert_same_logs(run, tmp_path / "whole")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_data, capsys):
    def press_ctrl_c(it: int, loss: float) -> None:
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run), data=tiny_data, on_iteration=press_ctrl_c)  # saves at 5, then at 7
    newest, previous = run / "checkpoint.npz", run / "checkpoint-prev.npz"
    assert load_checkpoint(previous, build_model(8))["iteration"] == 5
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a full disk

    capsys.readouterr()
    train(tiny_config(run, resume=True, progress=True), data=tiny_data)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "resuming" in line]
    assert len(said) == 1 and str(newest) in said[0] and "truncated or corrupt" in said[0]
    assert f"resuming {previous} at iteration 5" in said[0]
    whole = tiny_config(tmp_path / "whole")
    train(whole, data=tiny_data)
    assert_same_state(final_state(run, whole), final_state(tmp_path / "whole", whole))
    assert_same_logs(run, tmp_path / "whole")


def test_checkpoints_follow_the_clock_unless_checkpoint_every_is_set(tmp_path, tiny_data):
    assert TrainConfig().checkpoint_every is None and TrainConfig().checkpoint_minutes == 10

    def saved_iteration(run: Path) -> int | None:
        path = run / "checkpoint.npz"
        return load_checkpoint(path, build_model(8))["iteration"] if path.exists() else None

    for minutes, expected in ((0.0, [None, 1, 2, 3]), (60.0, [None, None, None, None])):
        run = tmp_path / f"every-{minutes}"
        seen = []
        train(tiny_config(run, iters=5, checkpoint_every=None, checkpoint_minutes=minutes), data=tiny_data,
              on_iteration=lambda it, loss, run=run, seen=seen: seen.append(saved_iteration(run)))
        assert seen[:4] == expected and saved_iteration(run) == 5  # and always at the end
        assert load_run_config(run).checkpoint_every is None
    train(tiny_config(tmp_path / "explicit", iters=5, checkpoint_every=2), data=tiny_data)
    assert load_run_config(tmp_path / "explicit").checkpoint_every == 2  # kept for --resume


def test_a_folder_named_like_a_temporary_file_does_not_break_saving(tmp_path, tiny_data):
    run = tmp_path / "run"
    (run / "checkpoint.npz.tmp").mkdir(parents=True)
    (run / "metrics.jsonl.tmp").mkdir()
    assert train(tiny_config(run), data=tiny_data)["iterations"] == 12
    assert load_checkpoint(run / "checkpoint.npz", build_model(8))["iteration"] == 12


def test_an_unwritable_run_folder_is_one_clear_error(tmp_path, tiny_data):
    run = tmp_path / "run"

    def take_the_folder_away(it: int, loss: float) -> None:
        if it == 3:
            shutil.rmtree(run)
            run.write_text("not a folder")

    config = tiny_config(run, checkpoint_every=4, eval_every=100, log_every=100)
    with pytest.raises(AtomicWriteError, match=f"cannot write {re.escape(str(run / 'checkpoint.npz'))}") as info:
        train(config, data=tiny_data, on_iteration=take_the_folder_away)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained tracebacks


def test_a_checkpoint_without_a_key_is_a_clear_error(tmp_path, tiny_data):
    run = tmp_path / "run"
    train(tiny_config(run, iters=4, checkpoint_every=100), data=tiny_data)
    path = run / "checkpoint.npz"
    ckpt = tinyres.load(path)
    del ckpt["extra"]["smooth_err"]
    tinyres.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: .*'smooth_err'"):
        train(tiny_config(run, iters=8, resume=True), data=tiny_data)


def test_losses_are_read_from_the_device_once_per_log_window(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "run", log_every=4, eval_every=100, checkpoint_every=100)
    run = Run(config, build_model(8), "ResNet-8")
    run.prepare(tiny_data)
    batches = run.loader.stream()
    for it in range(1, 5):
        x, y = next(batches)
        run.step(tinyres.tensor(x), tinyres.tensor(y))
        assert len(run.pending) == it and run.log_window.n == 0  # not read yet
        run.log_save_or_stop(StopRequest())
    assert run.pending == [] and read_train_log(config.out)[0]["iter"] == 4
    batches.close()


def test_a_run_writing_to_a_pipe_shows_progress_early(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "run", iters=30, eval_every=30, log_every=50, progress=True)
    done = subprocess.run(child_command(tmp_path, tiny_data, config), env=ONE_THREAD, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("iter 10/30 ") and "ETA" in line for line in lines), done.stderr
    assert "\r" not in done.stderr  # no bar redrawn in place in a log


def test_evaluation_defaults_keep_short_runs_short():
    assert default_eval_every(64_000) == 1000  # the paper's run: 64 evaluations
    assert default_eval_every(2_000) == 500
    assert default_eval_every(40) == 40  # --iters 40: one evaluation, at the end
    assert TrainConfig().eval_every is None


# ---- failures ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_divergence_names_iteration_and_last_checkpoint(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "run", lr=1e8, iters=200, checkpoint_every=2, eval_every=1000)
    with pytest.raises(DivergenceError, match=r"at iteration (\d+); the last good checkpoint is .*checkpoint.npz "
                                              r"\(iteration (\d+)\)") as info:
        train(config, data=tiny_data)
    it = int(str(info.value).split("at iteration ")[1].split(";")[0])
    model = build_model(8)
    extra = load_checkpoint(tmp_path / "run" / "checkpoint.npz", model)
    assert extra["iteration"] == (it - 1) // 2 * 2  # the last multiple of checkpoint_every before it
    # the weights saved may be huge but are numbers; the checkpoint predates the NaN
    assert all(np.isfinite(a).all() for a in model.state_dict().values())

    config = tiny_config(tmp_path / "none", lr=1e8, iters=200, checkpoint_every=1000, eval_every=1000)
    with pytest.raises(DivergenceError, match=r"at iteration \d+; no checkpoint was saved"):
        train(config, data=tiny_data)


def test_weights_that_are_not_finite_are_never_the_last_good_checkpoint(tmp_path, tiny_data):
    def spoil_a_weight(it: int, loss: float) -> None:
        if it == 4:  # the loss of this iteration was finite; the weights it leaves are not
            next(model.parameters()).data[0, 0, 0, 0] = np.inf

    config = tiny_config(tmp_path / "run", checkpoint_every=2, eval_every=1000)
    model = build_model(8)
    real_build = tinyres.train.build_model
    tinyres.train.build_model = lambda *args: model
    try:
        with pytest.raises(DivergenceError, match=r"weights are NaN or infinite at iteration 4; the last good "
                                                  r"checkpoint is .*checkpoint.npz \(iteration 2\)"):
            train(config, data=tiny_data, on_iteration=spoil_a_weight)
    finally:
        tinyres.train.build_model = real_build
    saved = build_model(8)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz", saved)["iteration"] == 2
    assert all(np.isfinite(a).all() for a in saved.state_dict().values())


def test_evaluate_on_no_images_is_a_clear_error(tiny_data):
    empty = tiny_data.test_images[:0]
    with pytest.raises(ValueError, match="at least one image.*got 0 images"):
        evaluate(build_model(8), empty, tiny_data.test_labels[:0], np.zeros((3, 8, 8), np.float32))


@pytest.mark.skipif(cuda_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, tiny_data):
    with pytest.raises(RuntimeError, match="CuPy"):
        train(tiny_config(tmp_path / "run", device="cuda"), data=tiny_data)


@pytest.mark.gpu
def test_train_on_gpu(tmp_path, tiny_data, gpu):
    result = train(tiny_config(tmp_path / "run", device=gpu), data=tiny_data)
    assert result["iterations"] == 12 and np.isfinite(result["train_loss"])


# ---- progress ----------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_in_a_log_and_a_bar_on_a_terminal():
    log = io.StringIO()
    p = Progress(100, stream=log, batch_size=128)
    for it in range(1, 10):
        p.update(it)
    assert log.getvalue() == ""
    p.set_stats(0.1, 2.0, 0.8)
    p.update(10)  # the first line comes early, so that a log shows a run is alive
    p.log("evaluation 1")
    p.close()
    first, second = log.getvalue().splitlines()
    assert first.startswith("iter 10/100  lr 0.1  loss 2.0000  train err 80.00%") and "img/s  ETA " in first
    assert second == "evaluation 1"

    tty = FakeTTY()
    p = Progress(100, stream=tty)
    p.set_stats(0.1, 2.0, 0.8)
    p.update(10)
    p.log("evaluation 1")
    p.close()
    text = tty.getvalue()
    if p.tty and importlib.util.find_spec("tqdm"):  # a tqdm bar, redrawn in place
        assert "10/100" in text and "\r" in text and "train err 80.00%" in text
    assert "evaluation 1\n" in text


def test_the_last_progress_line_shows_the_last_windows_statistics(tmp_path, tiny_data, capsys):
    log = io.StringIO()
    p = Progress(20, stream=log)
    p.set_stats(0.1, 2.0, 0.8)
    for it in range(1, 21):
        p.update(it)
    p.set_stats(0.01, 1.5, 0.5)  # the trainer logs the last window after the last update
    p.close()
    assert log.getvalue().splitlines()[-1].startswith("iter 20/20  lr 0.01  loss 1.5000  train err 50.00%")

    train(tiny_config(tmp_path / "run", iters=12, log_every=6, progress=True), data=tiny_data)
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("iter 12/12")]
    row = read_train_log(tmp_path / "run")[-1]
    assert len(last) == 1 and f"lr {row['lr']:.4g}  loss {row['train_loss']:.4f}" in last[0]


def test_eta_leaves_out_the_time_spent_evaluating():
    p = Progress(100, stream=io.StringIO())
    p.update(1)
    time.sleep(0.3)  # an evaluation
    p.pause()
    p.update(2)
    assert p.train_seconds < 0.2
