"""The benchmark scripts run end to end (on tiny sizes) and print what their READMEs promise."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyres

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_train_step_times_a_step_in_float32(tmp_path):
    path = tmp_path / "result.json"
    out = run("train_step.py", "--depth", "8", "--batch-size", "8", "--steps", "2", "--warmup", "1",
              "--rounds", "2", "--threads", "2", "1", "--no-torch", "--json", str(path))
    two, one = json.loads(path.read_text())
    for row, threads in ((two, 2), (one, 1)):
        assert row["framework"] == "tinyres" and row["depth"] == 8 and row["threads"] == threads
        assert row["dtypes"] == ["float32"]  # every parameter gradient and the loss
        assert 0 < row["fwd_s"] < row["step_s"] and row["peak_mb"] > 0
        assert row["img_per_s"] == pytest.approx(8 / row["step_s"])
        assert len(row["process_step_s"]) == 2  # one median per fresh process
        assert row["slowest_over_median"] == pytest.approx(max(row["process_step_s"]) / np.median(row["process_step_s"]))
    cells = table_rows(out, "ResNet-8")
    assert [(c[1], c[2]) for c in cells] == [("tinyres", "2"), ("tinyres", "1")]
    assert float(cells[0][5]) == pytest.approx(two["step_s"], abs=1e-3)
    assert cells[0][6] == f"{min(two['process_step_s']):.3f}–{max(two['process_step_s']):.3f}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_train_step_compares_with_pytorch_in_the_same_run(tmp_path):
    path = tmp_path / "result.json"
    out = run("train_step.py", "--depth", "8", "--batch-size", "8", "--steps", "2", "--warmup", "1",
              "--rounds", "2", "--threads", "1", "--json", str(path))
    rows = table_rows(out, "ResNet-8")
    assert [r[1].split()[0] for r in rows] == ["tinyres", "torch"]
    # the printed step times are rounded to the millisecond, too coarse at this size: take the
    # unrounded ones from the JSON; the ratios themselves are printed to two decimals
    tinyres_row, torch_row = json.loads(path.read_text())
    assert (tinyres_row["framework"], torch_row["framework"].split()[0]) == ("tinyres", "torch")
    ratio = float(rows[0][11].rstrip("x"))
    assert ratio == pytest.approx(tinyres_row["step_s"] / torch_row["step_s"], abs=0.006)
    # each round's tinyres process against that round's PyTorch process
    assert tinyres_row["rounds"] == torch_row["rounds"] == [0, 1]
    paired = [a / b for a, b in zip(tinyres_row["process_step_s"], torch_row["process_step_s"])]
    median, spread = rows[0][12].split(" ", 1)
    assert float(median.rstrip("x")) == pytest.approx(sum(paired) / 2, abs=0.006)
    assert spread == f"({min(paired):.2f}–{max(paired):.2f})"
    assert rows[1][12] == ""


def test_round_ratios_pair_the_processes_of_each_round():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    tinyres_row = {"rounds": [0, 1, 3], "process_step_s": [0.30, 0.45, 0.40]}
    torch_row = {"rounds": [0, 2, 3], "process_step_s": [0.20, 0.25, 0.32]}  # round 1's process failed
    assert train_step.round_ratios(tinyres_row, torch_row) == pytest.approx([1.5, 1.25])


def test_ops_prints_every_op_and_the_gemm_floor():
    out = run("ops.py", "--batch-size", "2")
    ops = [r[0] for r in table_rows(out, "")]
    for name in ("conv2d 16->16 3x3/1 on 32x32", "batch_norm 16x32x32", "relu 64x8x8", "cross_entropy",
                 "**sum over one ResNet-20 step**", "**GEMMs of one ResNet-20 step**"):
        assert name in ops
    conv_rows = [r for r in table_rows(out, "conv2d") if r[3]]
    assert len(conv_rows) == 12  # each of the 6 conv shapes: the whole op, then its GEMMs alone
    for r in conv_rows:  # times in ms, GFLOP/s to three significant digits: all positive
        assert float(r[1]) > 0 and float(r[2]) > 0
        assert all(float(v) > 0 for v in r[3].split(" / "))


def test_train_step_times_another_checkout_beside_this_one(tmp_path):
    """--baseline PATH: a second tinyres tree (here a copy of this one) timed in the same rounds."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "tinyres", other / "tinyres")
    path = tmp_path / "result.json"
    run("train_step.py", "--depth", "8", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--rounds", "1",
        "--threads", "1", "--no-torch", "--baseline", str(other), "--json", str(path))
    ours, theirs = json.loads(path.read_text())
    assert ours["framework"] == "tinyres" and theirs["framework"] == f"tinyres@{other.resolve()}"
    assert theirs["tinyres"] == str(other.resolve() / "tinyres") and ours["tinyres"] == str(ROOT / "tinyres")
    assert theirs["threads"] == tinyres.get_num_threads()  # the copy runs at its own default


def test_time_to_accuracy_finds_the_first_evaluation_below_each_target(tmp_path):
    def write(folder: Path, config: dict, errors: list[float], threads: list[int] | None = None) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        rows = [{"iter": 500 * (k + 1), "lr": 0.1, "train_err": e, "test_err": e, "split": "test",
                 "elapsed": 100.0 * (k + 1)} for k, e in enumerate(errors)]
        for r, n in zip(rows, threads or []):  # rows written before they recorded threads have none
            r["threads"] = n
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    fast = {"depth": 20, "plain": False, "shortcut": "A", "iters": 2000, "lr": 0.4, "lr_schedule": "onecycle"}
    write(tmp_path / "fast", fast, [0.3, 0.095, 0.12, 0.085], threads=[2, 2, 2, 2])
    write(tmp_path / "torch", {**fast, "framework": "PyTorch 2.13.0+cpu"}, [0.3, 0.2, 0.11, 0.099], [2, 1, 1, 2])
    write(tmp_path / "plain", {**fast, "plain": True, "iters": 4000}, [0.5, 0.09])
    out = run("time_to_accuracy.py", *(str(tmp_path / n) for n in ("fast", "torch", "plain")))
    fast_row, torch_row, plain_row = table_rows(out, str(tmp_path))
    assert fast_row[1:] == ["ResNet-20", "tinyres", "2", "onecycle to lr 0.4, weight decay 0.0001, 2,000 it",
                            "8.50 % test", "06:40", "1,000 it, 03:20", "2,000 it, 06:40 (8.75 %)"]
    assert torch_row[2:4] == ["PyTorch 2.13.0+cpu", "1, 2"]
    assert torch_row[-2:] == ["2,000 it, 06:40", "never (8.75 %)"]
    assert plain_row[1] == "plain-20" and plain_row[3] == "–" and plain_row[5] == "9.00 % test (at 1,000 of 4,000)"
    assert plain_row[-2:] == ["1,000 it, 03:20", "–"]  # the paper gives no figure for plain nets
