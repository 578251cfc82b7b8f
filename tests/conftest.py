from __future__ import annotations

import numpy as np
import pytest
import torch


def prescribed(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """U·diag(s)·Vᵀ in float64 with Haar-random orthonormal U (m×r) and V (n×r), r = len(s)."""
    rng = np.random.default_rng(seed)
    r = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * s) @ v.T


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def np_quantile(x: np.ndarray, qs) -> np.ndarray:
    return np.quantile(np.asarray(x, dtype=np.float64), list(qs), method="linear")
