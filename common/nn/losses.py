"""Losses: the mean over a mini-batch, and its gradient with respect to the model output.

    forward(out, target) -> float     out is (B, K); target is (B,) class labels or (B, K)
    backward()           -> dL/dout   (B, K), the loss's own buffer

Class labels are one-hot encoded where a loss needs a target per output.

    softmax_ce  L = mean_i [ logsumexp(z_i) - sum_k t_ik z_ik ]          dz = (softmax(z) - t) / B
    mse         L = mean_ik (y_ik - t_ik)^2   (over all B K entries)      dy = 2 (y - t) / (B K)
    sigmoid_bce L = mean_ik [ max(z,0) - z t + log(1 + e^-|z|) ]         dz = (sigmoid(z) - t) / (B K)

softmax_ce and sigmoid_bce take logits and are computed in forms that neither
overflow nor lose precision for large |z|.
"""

from __future__ import annotations

import numpy as np

from downpour.common.errors import ConfigError


def one_hot(labels: np.ndarray, k: int, dtype) -> np.ndarray:
    t = np.zeros((labels.shape[0], k), dtype)
    t[np.arange(labels.shape[0]), labels] = 1
    return t


class Loss:
    name = "loss"

    def _target(self, out: np.ndarray, target: np.ndarray) -> np.ndarray:
        if target.ndim == 1 and np.issubdtype(target.dtype, np.integer):
            if out.shape[1] == 1:                                 # binary labels, one output
                return target.reshape(-1, 1).astype(out.dtype)
            return one_hot(target, out.shape[1], out.dtype)
        if target.shape != out.shape:
            raise ValueError(f"target has shape {target.shape}; expected class labels "
                             f"({out.shape[0]},) or an array shaped like the output {out.shape}")
        return target

    def forward(self, out: np.ndarray, target: np.ndarray) -> float:
        raise NotImplementedError

    def backward(self) -> np.ndarray:
        raise NotImplementedError


class SoftmaxCrossEntropy(Loss):
    """Softmax and cross-entropy fused on logits; targets are labels or distributions."""

    name = "softmax_ce"

    def __init__(self):
        self._p = None                      # (B, K) softmax of the last forward
        self._labels = self._t = None       # its targets: (B,) labels, or (B, K) distributions

    def forward(self, out, target):
        B = out.shape[0]
        m = out.max(axis=1, keepdims=True)                        # (B, 1)
        p = np.subtract(out, m)
        np.exp(p, out=p)
        s = p.sum(axis=1, keepdims=True)                          # (B, 1)
        p /= s
        lse = (np.log(s) + m)[:, 0]                               # logsumexp per row, (B,)
        if target.ndim == 1 and np.issubdtype(target.dtype, np.integer):
            picked = out[np.arange(B), target]
            loss = float(np.mean(lse - picked))
            self._labels, self._t = target, None
        else:
            t = self._target(out, target)
            loss = float(np.mean(lse * t.sum(axis=1) - np.einsum("ij,ij->i", t, out)))
            self._labels, self._t = None, t
        self._p = p
        return loss

    def backward(self):
        d, B = self._p, self._p.shape[0]
        if self._labels is not None:
            d[np.arange(B), self._labels] -= 1
        else:
            d *= self._t.sum(axis=1, keepdims=True)
            d -= self._t
        d /= B
        return d


class MeanSquaredError(Loss):
    name = "mse"

    def __init__(self):
        self._diff = None                   # (B, K) out - target of the last forward

    def forward(self, out, target):
        t = self._target(out, target)
        self._diff = np.subtract(out, t)
        return float(np.mean(np.square(self._diff)))

    def backward(self):
        return np.multiply(self._diff, 2.0 / self._diff.size, out=self._diff)


class SigmoidBinaryCrossEntropy(Loss):
    name = "sigmoid_bce"

    def __init__(self):
        self._out = self._t = None          # (B, K) logits and targets of the last forward

    def forward(self, out, target):
        t = self._target(out, target)
        loss = np.maximum(out, 0) - out * t + np.log1p(np.exp(-np.abs(out)))
        self._out, self._t = out, t
        return float(np.mean(loss))

    def backward(self):
        d = np.multiply(self._out, 0.5)
        np.tanh(d, out=d)
        d += 1.0
        d *= 0.5                                  # sigmoid(z), overflow-free
        d -= self._t
        d /= d.size
        return d


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MeanSquaredError, SigmoidBinaryCrossEntropy)}


def make_loss(name: str) -> Loss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
