"""benchmarks/validate_gpu.py rehearsed on the CPU: each step's JSON, the summary, and time limits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_train import synthetic_cifar

from tinyres.data import CLASSES

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "gpu_tests", "train", "benchmark", "suite"]


def validate(out: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the validation script on the CPU, selecting one quick test for its pytest steps."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "validate_gpu.py"), "--device", "cpu",
                           "--out", str(out), "--select", "gpu_status_without_cupy", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def summary_rows(out: Path) -> dict[str, list[str]]:
    """step -> its cells in summary.md."""
    lines = (out / "summary.md").read_text().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells[1:]}


def test_a_step_past_its_limit_is_recorded_and_the_next_steps_run(tmp_path):
    out = tmp_path / "out"
    done = validate(out, "--steps", "env", "gpu_tests", "train", "suite", "--limit", "gpu_tests=0.3",
                    "--data", str(tmp_path / "missing.tar.gz"))
    assert done.returncode == 1, done.stderr
    results = {step: json.loads((out / f"{step}.json").read_text()) for step in ("env", "gpu_tests", "train", "suite")}
    assert {s: r["status"] for s, r in results.items()} == \
        {"env": "passed", "gpu_tests": "timed_out", "train": "failed", "suite": "passed"}
    assert results["gpu_tests"]["error"].startswith("0.3 s limit reached during ")
    assert results["gpu_tests"]["seconds"] < 5  # killed, not waited for
    assert results["train"]["error"].startswith(f"no CIFAR-10 archive at {tmp_path / 'missing.tar.gz'}")
    assert results["suite"]["figures"]["pytest"].startswith("1 passed")
    assert results["env"]["figures"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}." \
        f"{sys.version_info.micro}"
    rows = summary_rows(out)
    assert list(rows) == ["env", "gpu_tests", "train", "suite"]
    assert [r[0] for r in rows.values()] == ["passed", "timed_out", "failed", "passed"]


def tiny_archive(path: Path) -> Path:
    """An image-folder CIFAR-10 archive: cifar10/{train,test}/<class>/*.png, 4 and 2 images per class."""
    from PIL import Image

    data = synthetic_cifar(200, 100, size=32, seed=1)
    with tarfile.open(path, "w:gz") as tar:
        for split, images, labels, per_class in (("train", data.train_images, data.train_labels, 4),
                                                 ("test", data.test_images, data.test_labels, 2)):
            for k, name in enumerate(CLASSES):
                for i, image in enumerate(images[labels == k][:per_class]):
                    png = io.BytesIO()
                    Image.fromarray(image).save(png, format="PNG")
                    member = tarfile.TarInfo(f"cifar10/{split}/{name}/{i}.png")
                    member.size = png.tell()
                    tar.addfile(member, io.BytesIO(png.getvalue()))
    return path


@pytest.mark.slow
def test_cpu_rehearsal_of_every_step(tmp_path):
    pytest.importorskip("PIL")
    out = tmp_path / "out"
    done = validate(out, "--data", str(tiny_archive(tmp_path / "cifar.tar.gz")))
    assert done.returncode == 0, (out / "summary.md").read_text()
    results = {step: json.loads((out / f"{step}.json").read_text()) for step in STEPS}
    assert all(r["status"] == "passed" and r["commands"] and (out / f"{s}.log").exists() for s, r in results.items())
    train = results["train"]["figures"]
    assert [r["iter"] for r in train["metrics"]] == [2, 4, 6]  # 4 iterations, then resumed to 6
    assert train["prediction"].split(": ")[1].split()[0] in CLASSES
    bench = results["benchmark"]["figures"]
    assert bench["train_step"][0]["depth"] == 8 and bench["first_step"]["first_step_s"] > 0
    assert json.loads((out / "train_step.json").read_text()) == bench["train_step"]
    rows = summary_rows(out)
    assert list(rows) == STEPS and all(r[0] == "passed" for r in rows.values())
    assert rows["train"][2].startswith("6 iterations: train err")
