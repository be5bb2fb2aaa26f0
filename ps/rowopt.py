"""Per-row optimizers of the sparse tables (ps/table.py): validated hyperparameters, the
state each row carries, and the update math, written out in sgd_update, adagrad_update
and lazy_adam_update. A table gathers the rows of a push and their state, calls
`update` on them, and scatters them back; every rule is element-wise within a row.

    sgd      w <- w - lr g
    adagrad  acc <- acc + g^2;  w <- w - lr g / (sqrt(acc) + eps)
    adam     lazy: only the rows pushed move, each with its own step count t
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from downpour.common.errors import ConfigError

# -- hyperparameters -------------------------------------------------------------------------

def real(name, value, what="a finite number >= 0", ok=lambda x: x >= 0) -> float:
    """`value` as a float; ConfigError naming the setting unless it is a finite number
    that passes `ok` (`what` says which)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return float(value)


def whole(name, value, lo, hi) -> int:
    """`value` as an int; ConfigError naming the setting unless it is an integer in [lo, hi]."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def betas_pair(value) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), got {value!r}")
    return tuple(real(f"betas[{i}]", b, "a number in [0, 1)", lambda x: 0 <= x < 1)
                 for i, b in enumerate(value))


# -- per-row optimizers: validated hyperparameters, state per row, the update ---------------

class RowState(NamedTuple):
    """One array of optimizer state beside the arena: (rows, dim) if per_column, else
    (rows,); a row's entries are set to `initial` when the row is admitted."""

    per_column: bool
    dtype: type
    initial: float


def sgd_update(w, g, lr) -> None:
    """w <- w - lr g. w (n, dim) updated in place."""
    w -= lr * g


def adagrad_update(w, acc, g, lr, eps) -> None:
    """acc <- acc + g^2;  w <- w - lr g / (sqrt(acc) + eps). w, acc (n, dim) in place."""
    acc += g * g
    step = np.sqrt(acc)
    step += eps
    np.divide(g, step, out=step)
    step *= lr
    w -= step


def lazy_adam_update(w, m, v, t, g, lr, b1, b2, eps) -> None:
    """Adam on the rows of one push, each with its own step count t. In place:

        t <- t + 1
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    w, m, v, g: (n, dim); t: (n,) int32. Dense Adam decays m and v of every element at
    every step, those with a zero gradient too, and shares one t. Here, as in
    torch.optim.SparseAdam and TF's LazyAdam, a row's m and v move only when the row is
    pushed; unlike them (one t per tensor) each row also keeps its own t, so its bias
    correction counts the updates its m and v have had.
    """
    t += 1
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    t64 = t.astype(np.float64)[:, None]
    bc1 = (1 - b1**t64).astype(np.float32)           # (n, 1)
    bc2 = (1 - b2**t64).astype(np.float32)
    denom = np.sqrt(v / bc2)
    denom += eps
    w -= lr * (m / bc1) / denom


class Sgd:
    """Plain SGD; no state."""

    name, hyper, state = "sgd", (), {}

    def __init__(self, lr: float):
        self.lr = lr

    def update(self, w, state, g):
        sgd_update(w, g, self.lr)


class Adagrad:
    """Adagrad (torch's, without lr_decay); state `sum` of squared gradients."""

    name, hyper = "adagrad", ("eps", "initial_accumulator")

    def __init__(self, lr: float, eps: float = 1e-10, initial_accumulator: float = 0.0):
        self.lr, self.eps = lr, real("eps", eps, "a finite number > 0", lambda x: x > 0)
        self.initial_accumulator = real("initial_accumulator", initial_accumulator)
        self.state = {"sum": RowState(True, np.float32, self.initial_accumulator)}

    def update(self, w, state, g):
        adagrad_update(w, state["sum"], g, self.lr, self.eps)


class LazyAdam:
    """Lazy Adam with a step count per row; state `exp_avg` (m), `exp_avg_sq` (v), `step` (t)."""

    name, hyper = "adam", ("eps", "betas")
    state = {"exp_avg": RowState(True, np.float32, 0.0), "exp_avg_sq": RowState(True, np.float32, 0.0),
             "step": RowState(False, np.int32, 0)}

    def __init__(self, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
        self.lr, self.betas = lr, betas_pair(betas)   # (beta1, beta2)
        self.eps = real("eps", eps, "a finite number > 0", lambda x: x > 0)

    def update(self, w, state, g):
        lazy_adam_update(w, state["exp_avg"], state["exp_avg_sq"], state["step"], g,
                         self.lr, *self.betas, self.eps)


OPTIMIZERS = {o.name: o for o in (Sgd, Adagrad, LazyAdam)}
DEFAULTS = {"eps": None, "betas": (0.9, 0.999), "initial_accumulator": 0.0}   # Table's, for these
