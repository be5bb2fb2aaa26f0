"""Image layers, channels-last: a batch of images is (B, H, W, C), C contiguous.

    Conv2D      y = im2col(x) W + b, one GEMM: (B*OH*OW, K*K*C) @ (K*K*C, C_out)
    MaxPool2D   the largest of each K x K window (stride K)
    AvgPool2D   the mean of each K x K window (stride K)
    Flatten     (B, H, W, C) -> (B, H*W*C), a view

Why channels-last: with C innermost, the im2col matrix of a convolution is built by
K*K strided block copies (one per kernel offset, never per pixel or sample), its
product with W is the output already in (B, OH, OW, C_out) order, and the gradient
GEMMs read and write the same layouts; channels-first would add a transpose of every
activation in each direction. A convolution's weight is stored as the matrix
(K*K*C_in, C_out), rows ordered (kh, kw, c_in): PyTorch's (C_out, C_in, K, K) tensor
is `W.reshape(K, K, C_in, C_out).transpose(3, 2, 0, 1)` of it. Flatten keeps the
(h, w, c) order, so a dense layer after it sees PyTorch's features permuted.

Each layer is built for one input shape (per sample, without the batch), checks
it, and states its output shape (`out_shape`); a window that does not fit is a
ConfigError naming both. Pooling floors odd sizes: rows and columns past the last
whole window are dropped (their gradient is 0), as in PyTorch.
"""

from __future__ import annotations

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.nn.layers import Layer, show_shape


def _image(shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(f"{what} needs images (C,H,W), but its input is "
                          f"{show_shape(shape)}; "
                          "give --input-shape C,H,W (e.g. 1,28,28) and put image layers before "
                          "flatten")
    return shape


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in PyTorch) of C_in -> C_out channels.

    `padding` is a number of zero rows/columns on each side, or "same" (stride 1
    only; output size = input size, the odd extra row at the bottom/right, as
    PyTorch pads). Output (B, OH, OW, C_out) with OH = (H + pads - K) // stride + 1.

    Backward: dW = cols^T dy, db = sum dy, dcols = dy W^T scattered back by K*K
    strided adds (col2im).
    """

    kind = "conv"

    def __init__(self, in_shape: tuple[int, ...], channels: int, kernel: int, stride: int = 1,
                 padding: int | str = 0, init: str = "he_normal"):
        super().__init__()
        H, W, C = _image(in_shape, f"conv:{channels}:{kernel}")
        if padding == "same":
            if stride != 1:
                raise ConfigError(f"conv:{channels}:{kernel}:{stride}:same: 'same' padding needs "
                                  "stride 1 (as in PyTorch); give the padding as a number")
            lo, hi = (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2
        else:
            lo = hi = int(padding)
        self.pad = (lo, hi)                                  # rows/columns of zeros before, after
        self.kernel, self.stride, self.init = kernel, stride, init
        self.in_shape = (H, W, C)
        self.c_out = channels
        OH, OW = (H + lo + hi - kernel) // stride + 1, (W + lo + hi - kernel) // stride + 1
        if H + lo + hi < kernel or W + lo + hi < kernel:
            raise ConfigError(f"conv:{channels}:{kernel}: a {kernel}x{kernel} kernel does not fit "
                              f"{show_shape(self.in_shape)} with padding {padding}")
        self.out_shape = (OH, OW, channels)
        self.scratch_per_sample = OH * OW * kernel * kernel * C
        self.W = self.b = self.dW = self.db = None          # views, set by bind
        self._cols = None                                   # (B, OH, OW, K, K, C): forward's im2col

    def param_specs(self):
        k, (_, _, c) = self.kernel, self.in_shape
        return [("W", (k * k * c, self.c_out), self.init), ("b", (self.c_out,), "zeros")]

    def bind(self, params, grads, buffers):
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]

    def weights(self):
        return [(self.W, self.dW)]

    def _windows(self, a: np.ndarray):
        """(kh, kw, the (B, OH, OW, C) view of padded `a` that kernel offset (kh, kw) reads)."""
        k, s = self.kernel, self.stride
        OH, OW, _ = self.out_shape
        for kh in range(k):
            for kw in range(k):
                yield kh, kw, a[:, kh:kh + s * (OH - 1) + 1:s, kw:kw + s * (OW - 1) + 1:s, :]

    def forward(self, x, train=False):
        B, (H, W, C), (lo, hi) = x.shape[0], self.in_shape, self.pad
        OH, OW, CO = self.out_shape
        k = self.kernel
        if lo or hi:                              # the border stays zero: only the inside is written
            xp = self._buf("xpad", (B, H + lo + hi, W + lo + hi, C), x.dtype, zero=True)
            xp[:, lo:lo + H, lo:lo + W, :] = x
        else:
            xp = x
        cols = self._buf("cols", (B, OH, OW, k, k, C), x.dtype)
        for kh, kw, window in self._windows(xp):
            cols[:, :, :, kh, kw, :] = window
        self._cols = cols
        y = self._buf("y", (B, OH, OW, CO), x.dtype)
        np.matmul(cols.reshape(B * OH * OW, k * k * C), self.W, out=y.reshape(-1, CO))
        y += self.b
        return y

    def backward(self, dy):
        cols, CO = self._cols, self.c_out
        B, (H, W, C), (lo, hi) = cols.shape[0], self.in_shape, self.pad
        cols2 = cols.reshape(-1, self.W.shape[0])                   # (B*OH*OW, K*K*C)
        dy2 = np.ascontiguousarray(dy).reshape(-1, CO)              # (B*OH*OW, C_out)
        np.matmul(cols2.T, dy2, out=self.dW)
        np.add.reduce(dy2, axis=0, out=self.db)
        if not self.need_dx:
            return None
        dcols = self._buf("dcols", cols.shape, dy.dtype)
        np.matmul(dy2, self.W.T, out=dcols.reshape(cols2.shape))
        dxp = self._buf("dxpad", (B, H + lo + hi, W + lo + hi, C), dy.dtype)
        dxp.fill(0)
        for kh, kw, window in self._windows(dxp):
            window += dcols[:, :, :, kh, kw, :]
        return dxp[:, lo:lo + H, lo:lo + W, :]


class _Pool(Layer):
    """The shared part of the pooling layers: K x K windows with stride K, floored."""

    def __init__(self, in_shape: tuple[int, ...], kernel: int):
        super().__init__()
        H, W, C = _image(in_shape, f"{self.kind}:{kernel}")
        if kernel > H or kernel > W:
            raise ConfigError(f"{self.kind}:{kernel}: a {kernel}x{kernel} window does not fit "
                              f"{show_shape(in_shape)}")
        self.kernel, self.in_shape = kernel, (H, W, C)
        self.out_shape = (H // kernel, W // kernel, C)

    def _windows(self, a: np.ndarray):
        """(offset number, the (B, OH, OW, C) view of `a` at that offset of every window)."""
        k, (OH, OW, _) = self.kernel, self.out_shape
        for i in range(k):
            for j in range(k):
                yield i * k + j, a[:, i:i + k * OH:k, j:j + k * OW:k, :]

    def _dx(self, dy: np.ndarray) -> np.ndarray:
        """The (B, H, W, C) gradient buffer, zero in the rows and columns no window covers."""
        k, (OH, OW, _) = self.kernel, self.out_shape
        dx = self._buf("dx", (dy.shape[0], *self.in_shape), dy.dtype)
        dx[:, OH * k:] = 0
        dx[:, :, OW * k:] = 0
        return dx


class MaxPool2D(_Pool):
    """y = the maximum of each window; dx = dy at the window's first maximum, 0 elsewhere."""

    kind = "maxpool"

    def __init__(self, in_shape, kernel):
        super().__init__(in_shape, kernel)
        self._arg = None                          # (B, OH, OW, C): offset of each window's maximum
        self._idx_dtype = np.uint8 if kernel * kernel <= 256 else np.int32

    def forward(self, x, train=False):
        shape = (x.shape[0], *self.out_shape)
        y, arg = self._buf("y", shape, x.dtype), self._buf("arg", shape, self._idx_dtype)
        more = self._buf("more", shape, np.bool_)
        for p, window in self._windows(x):
            if p == 0:
                np.copyto(y, window)
                arg.fill(0)
                continue
            np.greater(window, y, out=more)            # strictly: ties keep the first
            np.copyto(arg, p, where=more)
            np.maximum(y, window, out=y)
        self._arg = arg
        return y

    def backward(self, dy):
        dx, hit = self._dx(dy), self._bufs["more"]
        for p, window in self._windows(dx):
            np.equal(self._arg, p, out=hit)
            np.multiply(dy, hit, out=window)
        return dx


class AvgPool2D(_Pool):
    """y = the mean of each window; dx = dy / K^2 at every position of the window."""

    kind = "avgpool"

    def forward(self, x, train=False):
        y = self._buf("y", (x.shape[0], *self.out_shape), x.dtype)
        for p, window in self._windows(x):
            if p == 0:
                np.copyto(y, window)
            else:
                y += window
        y *= 1.0 / self.kernel ** 2
        return y

    def backward(self, dy):
        dx, scale = self._dx(dy), 1.0 / self.kernel ** 2
        for _, window in self._windows(dx):
            np.multiply(dy, scale, out=window)
        return dx


class Flatten(Layer):
    """(B, ...) -> (B, prod(...)), in the input's own (channels-last) order; a view where it can be."""

    kind = "flatten"

    def __init__(self, in_shape: tuple[int, ...]):
        super().__init__()
        self.in_shape = in_shape
        self.out_shape = (int(np.prod(in_shape)),)

    def forward(self, x, train=False):
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(dy.shape[0], *self.in_shape)
