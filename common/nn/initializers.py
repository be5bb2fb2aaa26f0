"""Weight initialisations, drawn so that they never depend on how the vector is sliced.

Tensor number i of a layout is drawn from its own generator,
`np.random.default_rng([seed, i])`, in float64 and then cast. Every process that
knows the model and the seed therefore computes the same initial vector, and a
shard simply takes its slice of it: S servers start from the weights a single
process starts from, whatever S is.

For a weight matrix of shape (fan_in, fan_out):

    name            distribution                 standard deviation
    lecun_normal    N(0, s^2)                    s = sqrt(1 / fan_in)
    lecun_uniform   U(-sqrt(3) s, sqrt(3) s)     s = sqrt(1 / fan_in)
    xavier_normal   N(0, s^2)                    s = sqrt(2 / (fan_in + fan_out))
    xavier_uniform  U(-sqrt(3) s, sqrt(3) s)     s = sqrt(2 / (fan_in + fan_out))
    he_normal       N(0, s^2)                    s = sqrt(2 / fan_in)
    he_uniform      U(-sqrt(3) s, sqrt(3) s)     s = sqrt(2 / fan_in)
    normal          N(0, 0.01^2)
    uniform         U(-0.05, 0.05)
    zeros, ones     constants (biases, batch-norm shift and scale)
    orthogonal      (r, c): orthonormal rows (r <= c) or columns, from the QR of a
                    normal matrix (Saxe et al. 2014); a recurrent layer's U
    forget_one      an LSTM bias (4H,): zeros, ones in its second quarter (the forget gate)

A convolution's weight is the matrix (K*K*C_in, C_out), so fan_in is K*K*C_in.
"""

from __future__ import annotations

import math

import numpy as np

from downpour.common.errors import ConfigError

INITIALIZERS = ("lecun_normal", "lecun_uniform", "xavier_normal", "xavier_uniform",
                "he_normal", "he_uniform", "normal", "uniform", "zeros", "ones", "orthogonal",
                "forget_one")

# The usual choice for each activation: He for the rectifiers, Xavier for the
# saturating ones, LeCun for a linear (or softmax) output.
DEFAULT_FOR_ACTIVATION = {
    "relu": "he_normal",
    "leaky_relu": "he_normal",
    "tanh": "xavier_uniform",
    "sigmoid": "xavier_uniform",
    "linear": "lecun_normal",
    "softmax": "xavier_uniform",
}


def _std(name: str, shape: tuple[int, ...]) -> float:
    fan_in = shape[0]
    fan_out = shape[1] if len(shape) > 1 else shape[0]
    family = name.rsplit("_", 1)[0]
    if family == "lecun":
        return math.sqrt(1.0 / fan_in)
    if family == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if family == "he":
        return math.sqrt(2.0 / fan_in)
    raise AssertionError(name)


def draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values of one tensor in float64, for the initialiser `name`."""
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    if name == "normal":
        return rng.normal(0.0, 0.01, size=shape)
    if name == "uniform":
        return rng.uniform(-0.05, 0.05, size=shape)
    if name == "orthogonal":
        r, c = shape[0], int(np.prod(shape[1:]))
        q, upper = np.linalg.qr(rng.normal(size=(max(r, c), min(r, c))))
        q *= np.sign(np.diag(upper))                 # a uniform draw over orthogonal matrices
        return (q.T if r < c else q).reshape(shape)
    if name == "forget_one":
        b = np.zeros(shape)
        b[shape[0] // 4:shape[0] // 2] = 1.0
        return b
    if name not in INITIALIZERS:
        raise ConfigError(f"unknown initialiser {name!r}; choose one of {', '.join(INITIALIZERS)}")
    std = _std(name, shape)
    if name.endswith("_normal"):
        return rng.normal(0.0, std, size=shape)
    limit = math.sqrt(3.0) * std
    return rng.uniform(-limit, limit, size=shape)


def initial_vector(tensors: list[tuple[tuple[int, ...], str]], seed: int,
                   dtype=np.float32) -> np.ndarray:
    """The flat initial vector for tensors given as `(shape, initialiser)` in layout order."""
    parts = [draw(init, shape, np.random.default_rng([seed, i])).ravel()
             for i, (shape, init) in enumerate(tensors)]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
