"""Sparse models: embedding bags over rows pulled from tables, and the CTR models on them.

A batch of B samples has F fields; each field of a sample holds a bag of up to K keys
(the Criteo layout: one key per field, K = 1). The worker deduplicates the batch's keys
and pulls each row once (ps/sparse.py serves them):

    keys (B, F, K) int64 --np.unique--> uniq (U,), inv (B, F, K) --pulled--> R (U, d)
    bag forward    E[b, f] = sum_k R[inv[b, f, k]]  (mode sum)  or that / the keys present
                   (mode mean); absent keys (mask False) count nothing            (B, F, d)
    bag backward   dR[u] = sum over (b, f, k) with inv[b, f, k] = u of dE[b, f] (/ count)
                                                                                  (U, d)

so each unique key gets one summed gradient row, which is what the worker pushes.

Models (logit z, p = sigmoid(z), loss = mean binary cross-entropy over the batch; the
bias is the model's dense part, on the dense slices of the servers):

    lr   rows d = 1       z = bias + sum_f w_f
    fm   rows d = 1 + D   z = bias + sum_f w_f + 1/2 sum_j ((sum_f v_fj)^2 - sum_f v_fj^2)
                          (Rendle 2010: sum_{f<g} <v_f, v_g> in O(F D)); row = [w, v]

Gradients: dL/dz = (p - y) / B; dz/dw_f = 1; dz/dv_fj = S_j - v_fj with S = sum_f v_f.
No zmq and no files here: the core of the model only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.nn.model import Model

MODELS = ("lr", "fm")
BAG_MODES = ("sum", "mean")
EPS = 1e-7               # probabilities are clipped to [EPS, 1 - EPS] inside the loss


class Bags(NamedTuple):
    """A batch's keys, deduplicated: `uniq` (U,) sorted unique keys, `inv` (B, F, K) the
    index of each key in uniq, `mask` (B, F, K) which keys are present (None: all)."""

    uniq: np.ndarray
    inv: np.ndarray
    mask: np.ndarray | None


def dedup(keys: np.ndarray, mask: np.ndarray | None = None) -> Bags:
    """Bags of `keys` ((B, F) one key per field, or (B, F, K)); masked-out keys pull nothing."""
    if keys.ndim == 2:
        keys = keys[:, :, None]
    if keys.ndim != 3 or (mask is not None and mask.shape != keys.shape):
        raise ValueError(f"keys must be (B, F) or (B, F, K) with a mask of the same shape, got "
                         f"{keys.shape} and {None if mask is None else mask.shape}")
    present = keys if mask is None else keys[mask]
    uniq = np.unique(present)
    inv = np.searchsorted(uniq, keys) if mask is not None else \
        np.unique(keys, return_inverse=True)[1].reshape(keys.shape)
    if mask is not None:
        inv = np.where(mask, np.minimum(inv, max(len(uniq) - 1, 0)), 0)
    return Bags(uniq, inv, mask)


class EmbeddingBag:
    """Forward and backward of bags of rows (module docstring); `mode` sum or mean."""

    def __init__(self, mode: str = "sum"):
        if mode not in BAG_MODES:
            raise ConfigError(f"bag mode must be one of {', '.join(BAG_MODES)}, got {mode!r}")
        self.mode = mode

    def _weights(self, bags: Bags) -> np.ndarray | None:
        """(B, F, K) float32 weight of each key in its bag, or None when every weight is 1."""
        if bags.mask is None and (self.mode == "sum" or bags.inv.shape[2] == 1):
            return None
        w = np.ones(bags.inv.shape, np.float32) if bags.mask is None else bags.mask.astype(np.float32)
        if self.mode == "mean":
            w /= np.maximum(w.sum(axis=2, keepdims=True), 1.0)
        return w

    def forward(self, rows: np.ndarray, bags: Bags) -> np.ndarray:
        """E (B, F, d) from rows (U, d)."""
        gathered = rows[bags.inv]                                  # (B, F, K, d)
        w = self._weights(bags)
        if w is not None:
            gathered = gathered * w[..., None]
        return gathered.sum(axis=2, dtype=np.float32)

    def backward(self, d_e: np.ndarray, bags: Bags) -> np.ndarray:
        """dR (U, d) from dE (B, F, d): each unique key's gradients summed."""
        B, F, K = bags.inv.shape
        per_key = np.broadcast_to(d_e[:, :, None, :], (B, F, K, d_e.shape[-1]))
        w = self._weights(bags)
        if w is not None:
            per_key = per_key * w[..., None]
        return scatter_rows(bags.inv.reshape(-1), per_key.reshape(-1, d_e.shape[-1]), len(bags.uniq))


def scatter_rows(index: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """out (n_rows, d) float32 with out[u] = the sum of values[i] over i with index[i] = u.
    One np.bincount per column: a C loop, ~10x faster than np.add.at here."""
    out = np.empty((n_rows, values.shape[1]), np.float32)
    for j in range(values.shape[1]):
        out[:, j] = np.bincount(index, weights=values[:, j], minlength=n_rows)
    return out


class CtrModel:
    """lr or fm on bags of table rows plus a dense bias (module docstring)."""

    def __init__(self, kind: str, embed_dim: int = 0, bag: str = "sum"):
        if kind not in MODELS:
            raise ConfigError(f"sparse model must be one of {', '.join(MODELS)}, got {kind!r}")
        if kind == "fm" and embed_dim < 1:
            raise ConfigError(f"fm needs --embed-dim >= 1, got {embed_dim}")
        self.kind, self.embed_dim = kind, embed_dim if kind == "fm" else 0
        self.bag = EmbeddingBag(bag)

    @property
    def dim(self) -> int:
        """The width of a table row: w, then the fm factors."""
        return 1 + self.embed_dim

    def logits(self, rows: np.ndarray, bags: Bags, bias: float) -> tuple[np.ndarray, np.ndarray]:
        """(z (B,) float64, E (B, F, d) the bagged rows)."""
        e = self.bag.forward(rows, bags)                           # (B, F, d)
        z = bias + e[:, :, 0].sum(axis=1, dtype=np.float64)
        if self.embed_dim:
            v = e[:, :, 1:]                                        # (B, F, D)
            s = v.sum(axis=1)                                      # (B, D)
            z += 0.5 * ((s * s).sum(axis=1, dtype=np.float64) - (v * v).sum(axis=(1, 2), dtype=np.float64))
        return z, e

    def predict(self, rows: np.ndarray, bags: Bags, bias: float) -> np.ndarray:
        """p (B,) float64: the probability of a click."""
        return sigmoid(self.logits(rows, bags, bias)[0])

    def loss_and_grads(self, rows: np.ndarray, bags: Bags, bias: float, y: np.ndarray
                       ) -> tuple[float, np.ndarray, float]:
        """(mean loss, dL/drows (U, d) float32, dL/dbias) for labels y (B,) in {0, 1}."""
        z, e = self.logits(rows, bags, bias)
        p = sigmoid(z)
        dz = ((p - y) / len(y)).astype(np.float32)                 # (B,)
        d_e = np.empty_like(e)                                     # (B, F, d)
        d_e[:, :, 0] = dz[:, None]
        if self.embed_dim:
            v = e[:, :, 1:]
            d_e[:, :, 1:] = dz[:, None, None] * (v.sum(axis=1)[:, None, :] - v)
        return logloss(y, p), self.bag.backward(d_e, bags), float(dz.sum())


def bias_index(model: Model) -> int:
    """Where a sparse model's bias lives in its dense vector (the output layer's b:
    common/training.py model_spec)."""
    [bias] = [t for t in model.layout.tensors if t.name.endswith(".b")]
    return bias.offset


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z), without overflow for large |z|."""
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities p for labels y, p clipped to [EPS, 1 - EPS]."""
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
