"""Shared fixtures: hypothesis profiles and the NumPy/CuPy backend parameterization."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import tinyres
from tinyres.backend import gpu_status

settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# CI (CI=true) gets the fixed-seed profile; HYPOTHESIS_PROFILE=thorough for a long local run
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


GPU_STATUS = gpu_status()
# On a machine meant to test the GPU, a missing GPU must fail the run, not skip a third of it
REQUIRE_GPU = os.environ.get("TINYRES_REQUIRE_GPU") == "1"


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_GPU and not GPU_STATUS.usable:
        raise pytest.UsageError(f"TINYRES_REQUIRE_GPU=1 but no usable GPU: {GPU_STATUS.reason}")


def pytest_report_header(config: pytest.Config) -> str:
    state = "usable" if GPU_STATUS.usable else "BROKEN" if GPU_STATUS.broken else "none"
    return f"tinyres GPU: {state}: {GPU_STATUS.reason}"


def need_gpu() -> None:
    """Skip the calling test when there is no GPU; fail it when CuPy is installed but broken."""
    if GPU_STATUS.broken:
        pytest.fail(f"the GPU cannot be used: {GPU_STATUS.reason}", pytrace=False)
    if not GPU_STATUS.usable:
        pytest.skip(GPU_STATUS.reason)


@pytest.fixture
def threads():
    """Set the thread count for one test, and restore it after."""
    before = tinyres.get_num_threads()
    yield tinyres.set_num_threads
    tinyres.set_num_threads(before)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each test taking `device` runs on the CPU, and on the GPU when CuPy and a GPU are present."""
    if request.param == "cuda":
        need_gpu()
    return request.param


@pytest.fixture
def gpu() -> str:
    """'cuda' for a test that only makes sense on the GPU; skipped without one."""
    need_gpu()
    return "cuda"


@pytest.fixture
def xp(device):
    """The array module of `device`."""
    if device == "cuda":
        import cupy
        return cupy
    return np


def real_cifar10() -> Path | None:
    """The real CIFAR-10 archive: $TINYRES_CIFAR10, else ../shared/data/cifar10-jpeg.tar.gz beside the checkout."""
    env = os.environ.get("TINYRES_CIFAR10")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    return path if path.exists() else None


@pytest.fixture
def real_archive() -> Path:
    """The real CIFAR-10 archive (see `real_cifar10`); the test is skipped where it is absent."""
    path = real_cifar10()
    if path is None:
        pytest.skip("real CIFAR-10 archive not found ($TINYRES_CIFAR10 or ../shared/data/cifar10-jpeg.tar.gz)")
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 in the image-folder layout: train/<class>/*.png (4 each), test/<class>/*.png (2 each)."""
    image = pytest.importorskip("PIL.Image")
    from test_train import synthetic_cifar

    from tinyres.data import CLASSES
    root = tmp_path_factory.mktemp("cifar-images")
    data = synthetic_cifar(400, 200, size=32, seed=1)
    for split, images, labels, per_class in (("train", data.train_images, data.train_labels, 4),
                                             ("test", data.test_images, data.test_labels, 2)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i, x in enumerate(images[labels == k][:per_class]):
                image.fromarray(x).save(root / split / name / f"{i:04d}.png")
    return root
