"""Layers over mini-batches, samples first: x is (B, D), or (B, H, W, C) images
(conv.py), or (B, T, F) sequences (recurrent.py). Activations, dropout and batch
norm take any of them (batch norm per last axis: per channel, per feature).

A layer declares the tensors it owns (`param_specs`, trainable; `buffer_specs`,
not trainable), is then bound to views into the model's flat vectors, and
offers two verbs:

    forward(x, train) -> y      y is (B, ...), the layer's out_shape per sample
    backward(dy)      -> dx     writes the layer's parameter gradients, returns dL/dx

`backward` uses what the last `forward` saw, so call them in pairs. Outputs are
the layer's own preallocated buffers, reused by the next call with the same batch
shape: copy a result you want to keep. Nothing here allocates per step once the
batch shape is fixed, and nothing loops over samples.
"""

from __future__ import annotations

import numpy as np

from downpour.common.errors import ConfigError

Spec = tuple[str, tuple[int, ...], str]   # (name, shape, initialiser)


def show_shape(shape: tuple[int, ...]) -> str:
    """A per-sample shape (as held inside the model) the way the user writes it."""
    if len(shape) == 3:
        h, w, c = shape                        # images are held channels-last
        return f"images {c},{h},{w} (C,H,W)"
    if len(shape) == 2:
        return f"sequences {shape[0]},{shape[1]} (T,F)"
    return f"vectors of {shape[0]}"


class Layer:
    """The base of every layer. Tensors are views of the model's flat vectors, handed
    over by `bind`; what `forward` keeps for `backward` is declared in `__init__`."""

    kind = "layer"
    keeps_output = False      # backward rereads forward's output: a ReLU after it must not overwrite it
    scratch_per_sample = 0    # numbers of scratch a sample needs beyond the output (im2col, states)

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}        # scratch arrays by name, see _buf
        self.need_dx = True       # the model's first layer is told nobody needs dL/dx

    def param_specs(self) -> list[Spec]:
        return []

    def buffer_specs(self) -> list[Spec]:
        return []

    def bind(self, params: dict, grads: dict, buffers: dict) -> None:
        """Receive views of this layer's tensors, keyed by the names of its specs."""

    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight, its gradient) of every weight matrix: what L1 and L2 penalise (not biases)."""
        return []

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def _buf(self, key: str, shape: tuple[int, ...], dtype, zero: bool = False) -> np.ndarray:
        """A scratch array reused across calls while shape and dtype stay the same;
        `zero`: zeroed when it is made (for parts the caller never writes)."""
        a = self._bufs.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._bufs[key] = (np.zeros if zero else np.empty)(shape, dtype)
        return a


class Dense(Layer):
    """y = x W + b, with W (n_in, n_out) and b (n_out,).

    dW = x^T dy, db = sum over rows of dy, dx = dy W^T. The first layer of a
    model sets `need_dx = False`: nobody needs the gradient of the input.
    """

    kind = "dense"

    def __init__(self, n_in: int, n_out: int, init: str):
        super().__init__()
        self.n_in, self.n_out, self.init = n_in, n_out, init
        self.W = self.b = self.dW = self.db = None     # views, set by bind
        self._x = None                                 # (B, n_in): forward's input

    def param_specs(self) -> list[Spec]:
        return [("W", (self.n_in, self.n_out), self.init), ("b", (self.n_out,), "zeros")]

    def bind(self, params, grads, buffers):
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]

    def weights(self):
        return [(self.W, self.dW)]

    def forward(self, x, train=False):
        self._x = x
        y = self._buf("y", (x.shape[0], self.n_out), x.dtype)    # (B, n_out)
        np.matmul(x, self.W, out=y)
        y += self.b
        return y

    def backward(self, dy):
        np.matmul(self._x.T, dy, out=self.dW)                     # (n_in, n_out)
        np.add.reduce(dy, axis=0, out=self.db)
        if not self.need_dx:
            return None
        dx = self._buf("dx", self._x.shape, dy.dtype)             # (B, n_in)
        return np.matmul(dy, self.W.T, out=dx)


class ReLU(Layer):
    """y = max(x, 0); dx = dy where y > 0, else 0.

    With `inplace` (set by the model builder when nothing else reads them) the
    output overwrites x and dx overwrites dy, saving two passes over memory.
    """

    kind = "relu"

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self._y = None                                 # forward's output

    def forward(self, x, train=False):
        out = x if self.inplace else self._buf("y", x.shape, x.dtype)
        self._y = np.maximum(x, 0, out=out)
        return self._y

    def backward(self, dy):
        mask = np.greater(self._y, 0, out=self._buf("mask", dy.shape, np.bool_))
        return np.multiply(dy, mask, out=dy if self.inplace else self._buf("dx", dy.shape, dy.dtype))


class LeakyReLU(Layer):
    """y = x for x > 0, a x otherwise (0 <= a < 1); dx = dy times 1 or a."""

    kind = "leaky_relu"

    def __init__(self, slope: float = 0.01):
        if not 0.0 <= slope < 1.0:
            raise ConfigError(f"leaky ReLU slope must be in [0, 1), got {slope}")
        super().__init__()
        self.slope = slope
        self._x = None                                 # forward's input

    def forward(self, x, train=False):
        self._x = x
        y = np.multiply(x, self.slope, out=self._buf("y", x.shape, x.dtype))
        return np.maximum(x, y, out=y)            # max(x, a x) is x for x > 0, a x below

    def backward(self, dy):
        scale = self._buf("scale", dy.shape, dy.dtype)
        np.greater(self._x, 0, out=scale)         # 1.0 where x > 0, else 0.0
        scale *= 1.0 - self.slope
        scale += self.slope                       # 1 where x > 0, a elsewhere
        return np.multiply(dy, scale, out=scale)


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x), computed as (1 + tanh(x/2)) / 2, which never overflows; dx = dy y (1 - y)."""

    kind = "sigmoid"
    keeps_output = True

    def __init__(self):
        super().__init__()
        self._y = None                                 # forward's output

    def forward(self, x, train=False):
        y = np.multiply(x, 0.5, out=self._buf("y", x.shape, x.dtype))
        np.tanh(y, out=y)
        y += 1.0
        y *= 0.5
        self._y = y
        return y

    def backward(self, dy):
        dx = np.subtract(1.0, self._y, out=self._buf("dx", dy.shape, dy.dtype))
        dx *= self._y
        dx *= dy
        return dx


class Tanh(Layer):
    """y = tanh(x); dx = dy (1 - y^2)."""

    kind = "tanh"
    keeps_output = True

    def __init__(self):
        super().__init__()
        self._y = None                                 # forward's output

    def forward(self, x, train=False):
        self._y = np.tanh(x, out=self._buf("y", x.shape, x.dtype))
        return self._y

    def backward(self, dy):
        dx = np.multiply(self._y, self._y, out=self._buf("dx", dy.shape, dy.dtype))
        np.subtract(1.0, dx, out=dx)
        dx *= dy
        return dx


class Softmax(Layer):
    """y_ij = e^{x_ij} / sum_k e^{x_ik} over each row; dx = y * (dy - sum_k dy_k y_k).

    For classification prefer the fused softmax cross-entropy loss on logits,
    which is cheaper and more accurate; this layer is for other uses (e.g. MSE
    on probabilities).
    """

    kind = "softmax"
    keeps_output = True

    def __init__(self):
        super().__init__()
        self._y = None                                 # forward's output

    def forward(self, x, train=False):
        y = self._buf("y", x.shape, x.dtype)
        np.subtract(x, x.max(axis=-1, keepdims=True), out=y)
        np.exp(y, out=y)
        y /= y.sum(axis=-1, keepdims=True)
        self._y = y
        return y

    def backward(self, dy):
        dx = np.multiply(dy, self._y, out=self._buf("dx", dy.shape, dy.dtype))
        s = dx.sum(axis=-1, keepdims=True)            # (B, 1)
        np.subtract(dy, s, out=dx)
        dx *= self._y
        return dx


class Dropout(Layer):
    """Inverted dropout: in training y = x m / (1 - p) with m ~ Bernoulli(1 - p); in evaluation y = x.

    The mask is drawn from the layer's own generator (`self.rng`), so a run is
    reproducible for a seed; dx = dy m / (1 - p).
    """

    kind = "dropout"

    def __init__(self, p: float, rng: np.random.Generator):
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
        super().__init__()
        self.p, self.rng = p, rng
        self._train = False                            # the last forward dropped units

    def forward(self, x, train=False):
        self._train = train and self.p > 0.0
        if not self._train:
            return x
        scale = self._buf("scale", x.shape, x.dtype)
        self.rng.random(out=scale, dtype=x.dtype)
        np.greater_equal(scale, self.p, out=scale)    # keep with probability 1 - p
        scale *= 1.0 / (1.0 - self.p)
        return np.multiply(x, scale, out=self._buf("y", x.shape, x.dtype))

    def backward(self, dy):
        if not self._train:
            return dy
        return np.multiply(dy, self._bufs["scale"], out=self._buf("dx", dy.shape, dy.dtype))


class BatchNorm(Layer):
    """Batch normalisation per feature (Ioffe & Szegedy 2015): per last axis, so per
    channel after a convolution (statistics over B*H*W) and per unit of a sequence
    (over B*T).

    Training:   xh = (x - mean_B) / sqrt(var_B + eps);  y = gamma xh + beta
                running_mean += momentum (mean_B - running_mean), likewise
                running_var with the unbiased batch variance (as torch does)
    Evaluation: the same with the running statistics in place of the batch's.

    gamma and beta are trainable parameters; the running statistics are buffers
    (not trainable, outside the gradient). Backward in training mode:
        dx = gamma / (B sqrt(var_B + eps)) * (B dy - sum(dy) - xh sum(dy xh))
    """

    kind = "batchnorm"

    def __init__(self, n: int, momentum: float = 0.1, eps: float = 1e-5):
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"batch-norm momentum must be in (0, 1], got {momentum}")
        super().__init__()
        self.n, self.momentum, self.eps = n, momentum, eps
        self.gamma = self.beta = self.dgamma = self.dbeta = None       # views, set by bind
        self.running_mean = self.running_var = None
        self._train = False                            # the last forward used batch statistics
        self._inv_std = None                           # (n,) 1 / sqrt(var + eps) of that forward
        self._xh = None                                # (B, n) its normalised input

    def param_specs(self):
        return [("gamma", (self.n,), "ones"), ("beta", (self.n,), "zeros")]

    def buffer_specs(self):
        return [("running_mean", (self.n,), "zeros"), ("running_var", (self.n,), "ones")]

    def bind(self, params, grads, buffers):
        self.gamma, self.beta = params["gamma"], params["beta"]
        self.dgamma, self.dbeta = grads["gamma"], grads["beta"]
        self.running_mean, self.running_var = buffers["running_mean"], buffers["running_var"]

    def forward(self, x, train=False):
        shape, x = x.shape, x.reshape(-1, self.n)                  # (N, n): N = B, or B*H*W, or B*T
        B = x.shape[0]
        if train:
            if B < 2:
                raise ValueError("batch normalisation in training needs a batch of at least 2 rows")
            mean = x.mean(axis=0)                                  # (n,)
            xc = np.subtract(x, mean, out=self._buf("xh", x.shape, x.dtype))
            var = np.einsum("ij,ij->j", xc, xc) / B                # biased batch variance
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var * (B / (B - 1)) - self.running_var)
        else:
            xc = np.subtract(x, self.running_mean, out=self._buf("xh", x.shape, x.dtype))
            var = self.running_var
        self._train = train
        self._inv_std = 1.0 / np.sqrt(var + self.eps)              # (n,)
        xh = xc
        xh *= self._inv_std
        self._xh = xh
        y = np.multiply(xh, self.gamma, out=self._buf("y", x.shape, x.dtype))
        y += self.beta
        return y.reshape(shape)

    def backward(self, dy):
        xh, shape = self._xh, dy.shape
        dy = dy.reshape(-1, self.n)
        np.add.reduce(dy, axis=0, out=self.dbeta)
        np.einsum("ij,ij->j", dy, xh, out=self.dgamma)
        dx = self._buf("dx", dy.shape, dy.dtype)
        if not self._train:                        # statistics are constants in evaluation
            return np.multiply(dy, self.gamma * self._inv_std, out=dx).reshape(shape)
        B = dy.shape[0]
        np.multiply(xh, self.dgamma, out=dx)
        np.subtract(dy * B, dx, out=dx)
        dx -= self.dbeta
        dx *= self.gamma * self._inv_std / B
        return dx.reshape(shape)


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh,
               "softmax": Softmax}
