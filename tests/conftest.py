"""Shared fixtures: hypothesis profiles and the NumPy/CuPy backend parameterization."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import tinyres

settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# CI (CI=true) gets the fixed-seed profile; HYPOTHESIS_PROFILE=thorough for a long local run
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


GPU = tinyres.cuda_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each test taking `device` runs on the CPU, and on the GPU when CuPy and a GPU are present."""
    if request.param == "cuda" and not GPU:
        pytest.skip("CuPy with a GPU is not available")
    return request.param


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
