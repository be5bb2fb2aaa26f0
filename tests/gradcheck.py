"""Central finite differences, the reference every analytic gradient is checked against."""

import numpy as np


def numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d a by central differences, perturbing `a` in place one element at a time."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||), 0 when both are 0."""
    den = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return 0.0 if den == 0 else float(np.linalg.norm(analytic - numeric) / den)
