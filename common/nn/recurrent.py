"""Recurrent layers over sequences (B, T, F), trained by backpropagation through time.

    SimpleRNN   h_t = tanh(x_t W + h_{t-1} U + b)
    LSTM        [i f o g] = [sigma sigma sigma tanh](x_t W + h_{t-1} U + b)
                c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)
    GRU         [r z] = sigma(x_t W_rz + b_rz + h_{t-1} U_rz)
                n = tanh(x_t W_n + b_n + r * (h_{t-1} U_n + bn))
                h_t = (1 - z) * n + z * h_{t-1}                      (PyTorch's GRU)

h_0 = c_0 = 0. Each returns the last step h_T (B, H), or with `sequence` every step
(B, T, H), to stack another recurrent layer on.

How it is vectorised: the input projection of all T steps is ONE GEMM, (T*B, F) @
(F, G*H), before the loop; each step is then one GEMM h_{t-1} U for all G gates
at once and a few element-wise passes. Backward runs the steps in reverse, one GEMM
per step (dh_{t-1} = dA_t U^T), keeping every step's pre-activation gradient dA_t;
after the loop dW, dU and dx are three GEMMs over all steps. Inside, time is the
leading axis (T, B, ...), so each step's arrays are contiguous.

Weights: W (F, G*H), U (H, G*H), b (G*H,), gates side by side in the order above
(LSTM i, f, o, g: the three sigmoid gates are contiguous; PyTorch's order is i, f,
g, o, and its two biases b_ih + b_hh are our b; for the GRU, bn is PyTorch's b_hn
and b its b_ih + b_hh with b_hh's n part left out). W starts Xavier-uniform (or
the model's `init`), U orthogonal, b zero but for an LSTM's forget gate, which
starts at 1 (Jozefowicz et al. 2015), so that early gradients flow through time.
"""

from __future__ import annotations

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.nn.layers import Layer, show_shape


def _sigmoid(a: np.ndarray) -> np.ndarray:
    """a <- sigma(a) in place, as (1 + tanh(a/2)) / 2, which never overflows."""
    a *= 0.5
    np.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


class _Recurrent(Layer):
    """What the three share: shapes, weights, the input projection and the three
    GEMMs after the backward loop. Subclasses give `gates` (G) and the two loops."""

    gates = 1
    keeps_output = True                   # h_T is one of the states backward rereads

    def __init__(self, in_shape: tuple[int, ...], units: int, sequence: bool = False,
                 init: str = "xavier_uniform"):
        super().__init__()
        token = f"{self.kind}:{units}"
        if len(in_shape) != 2:
            raise ConfigError(f"{token} needs sequences (T,F), but its input is {show_shape(in_shape)}; "
                              "give --input-shape T,F (e.g. 28,28) and put recurrent layers "
                              "before flatten or dense")
        self.T, self.F = in_shape
        self.H, self.sequence, self.init = units, sequence, init
        self.out_shape = (self.T, units) if sequence else (units,)
        self.scratch_per_sample = self.T * (self.F + (self.gates + 3) * units)
        self.W = self.U = self.b = self.dW = self.dU = self.db = None      # views, set by bind

    def param_specs(self):
        GH = self.gates * self.H
        return [("W", (self.F, GH), self.init), ("U", (self.H, GH), "orthogonal"),
                ("b", (GH,), self._bias_init)]

    _bias_init = "zeros"

    def bind(self, params, grads, buffers):
        self.W, self.U, self.b = params["W"], params["U"], params["b"]
        self.dW, self.dU, self.db = grads["W"], grads["U"], grads["b"]

    def weights(self):
        return [(self.W, self.dW), (self.U, self.dU)]

    def forward(self, x, train=False):
        B, T, H, dt = x.shape[0], self.T, self.H, x.dtype
        xt = self._buf("xt", (T, B, self.F), dt)
        np.copyto(xt, x.transpose(1, 0, 2))                           # time-major
        A = self._buf("A", (T, B, self.gates * H), dt)                # x_t W + b, then activated
        np.matmul(xt.reshape(T * B, self.F), self.W, out=A.reshape(T * B, -1))
        A += self.b
        hs = self._buf("hs", (T + 1, B, H), dt)                       # hs[t + 1] = h_t
        hs[0] = 0
        self._steps(A, hs)
        if not self.sequence:
            return hs[T]                                              # (B, H)
        y = self._buf("y", (B, T, H), dt)
        np.copyto(y, hs[1:].transpose(1, 0, 2))
        return y                                                      # (B, T, H)

    def backward(self, dy):
        hs = self._bufs["hs"]
        T, B, H = hs.shape[0] - 1, hs.shape[1], self.H
        dA = self._buf("dA", (T, B, self.gates * H), dy.dtype)      # d(pre-activations) per step
        dAU = self._back_steps(dy, dA)                              # what U and bn see, (T, B, G*H)
        GH = self.gates * H
        np.matmul(hs[:T].reshape(T * B, H).T, dAU.reshape(T * B, GH), out=self.dU)
        np.matmul(self._bufs["xt"].reshape(T * B, self.F).T, dA.reshape(T * B, GH), out=self.dW)
        np.add.reduce(dA.reshape(T * B, GH), axis=0, out=self.db)
        if not self.need_dx:
            return None
        dxt = self._buf("dxt", (T, B, self.F), dy.dtype)
        np.matmul(dA.reshape(T * B, GH), self.W.T, out=dxt.reshape(T * B, self.F))
        dx = self._buf("dx", (B, T, self.F), dy.dtype)
        np.copyto(dx, dxt.transpose(1, 0, 2))
        return dx

    def _dh_out(self, dy: np.ndarray, t: int, dh: np.ndarray) -> None:
        """dh += what the output sends to h_t directly."""
        if self.sequence:
            dh += dy[:, t]
        elif t == self.T - 1:
            dh += dy

    def _steps(self, A: np.ndarray, hs: np.ndarray) -> None:
        raise NotImplementedError

    def _back_steps(self, dy: np.ndarray, dA: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SimpleRNN(_Recurrent):
    """h_t = tanh(x_t W + h_{t-1} U + b); dA_t = dh_t (1 - h_t^2)."""

    kind = "rnn"

    def _steps(self, A, hs):
        for t in range(self.T):
            a = A[t]
            a += np.matmul(hs[t], self.U, out=self._buf("hu", a.shape, a.dtype))
            np.tanh(a, out=hs[t + 1])

    def _back_steps(self, dy, dA):
        hs, B, H = self._bufs["hs"], dA.shape[1], self.H
        dh = self._buf("dh", (B, H), dA.dtype)
        dh.fill(0)
        for t in reversed(range(self.T)):
            self._dh_out(dy, t, dh)
            d = dA[t]
            np.multiply(hs[t + 1], hs[t + 1], out=d)
            np.subtract(1.0, d, out=d)
            d *= dh                                                  # dA_t = dh (1 - h^2)
            np.matmul(d, self.U.T, out=dh)                           # dh_{t-1}
        return dA


class LSTM(_Recurrent):
    """Long short-term memory (Hochreiter & Schmidhuber 1997), gates i, f, o, g."""

    kind = "lstm"
    gates = 4
    _bias_init = "forget_one"

    def _steps(self, A, hs):
        T, B, H = self.T, A.shape[1], self.H
        cs = self._buf("cs", (T + 1, B, H), A.dtype)                  # cs[t + 1] = c_t
        tc = self._buf("tc", (T, B, H), A.dtype)                      # tanh(c_t)
        cs[0] = 0
        hu = self._buf("hu", A.shape[1:], A.dtype)
        ig = self._buf("ig", (B, H), A.dtype)
        for t in range(T):
            a = A[t]                                                  # (B, 4H)
            a += np.matmul(hs[t], self.U, out=hu)
            _sigmoid(a[:, :3 * H])
            np.tanh(a[:, 3 * H:], out=a[:, 3 * H:])
            i, f, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            c = np.multiply(f, cs[t], out=cs[t + 1])
            c += np.multiply(i, g, out=ig)
            np.tanh(c, out=tc[t])
            np.multiply(o, tc[t], out=hs[t + 1])

    def _back_steps(self, dy, dA):
        A, cs, tc = self._bufs["A"], self._bufs["cs"], self._bufs["tc"]
        B, H = dA.shape[1], self.H
        dh, dc = self._buf("dh", (B, H), dA.dtype), self._buf("dc", (B, H), dA.dtype)
        tmp = self._buf("tmp", (B, 3 * H), dA.dtype)
        dh.fill(0)
        dc.fill(0)
        for t in reversed(range(self.T)):
            self._dh_out(dy, t, dh)
            a, d = A[t], dA[t]
            i, f, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            di, df, do, dg = d[:, :H], d[:, H:2 * H], d[:, 2 * H:3 * H], d[:, 3 * H:]
            np.multiply(dh, tc[t], out=do)
            th = tmp[:, :H]                                           # dc += dh o (1 - tanh(c)^2)
            np.multiply(tc[t], tc[t], out=th)
            np.subtract(1.0, th, out=th)
            th *= o
            th *= dh
            dc += th
            np.multiply(dc, g, out=di)
            np.multiply(dc, cs[t], out=df)
            np.multiply(dc, i, out=dg)
            dc *= f                                                   # dc_{t-1}
            s = tmp                                                   # sigma' = s (1 - s)
            np.subtract(1.0, a[:, :3 * H], out=s)
            s *= a[:, :3 * H]
            d[:, :3 * H] *= s
            gg = tmp[:, :H]                                           # tanh' = 1 - g^2
            np.multiply(g, g, out=gg)
            np.subtract(1.0, gg, out=gg)
            dg *= gg
            np.matmul(d, self.U.T, out=dh)                            # dh_{t-1}
        return dA


class GRU(_Recurrent):
    """Gated recurrent unit (Cho et al. 2014) as PyTorch computes it, gates r, z, n.

    The candidate's recurrent term r * (h U_n + bn) is gated after the product, so
    U's gradient sees r * dA_n where W's sees dA_n: backward keeps both (dA, dAU).
    """

    kind = "gru"
    gates = 3

    def param_specs(self):
        return super().param_specs() + [("bn", (self.H,), "zeros")]

    def bind(self, params, grads, buffers):
        super().bind(params, grads, buffers)
        self.bn, self.dbn = params["bn"], grads["bn"]

    def _steps(self, A, hs):
        T, B, H = self.T, A.shape[1], self.H
        hn = self._buf("hn", (T, B, H), A.dtype)                      # h_{t-1} U_n + bn
        hu = self._buf("hu", A.shape[1:], A.dtype)
        for t in range(T):
            a = A[t]                                                  # (B, 3H)
            np.matmul(hs[t], self.U, out=hu)
            a[:, :2 * H] += hu[:, :2 * H]
            _sigmoid(a[:, :2 * H])
            r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
            np.add(hu[:, 2 * H:], self.bn, out=hn[t])
            n += np.multiply(r, hn[t], out=hu[:, :H])
            np.tanh(n, out=n)
            h = np.subtract(hs[t], n, out=hs[t + 1])                  # h_t = n + z (h_{t-1} - n)
            h *= z
            h += n

    def _back_steps(self, dy, dA):
        A, hs, hn = self._bufs["A"], self._bufs["hs"], self._bufs["hn"]
        B, H = dA.shape[1], self.H
        dAU = self._buf("dAU", dA.shape, dA.dtype)
        dh, tmp = self._buf("dh", (B, H), dA.dtype), self._buf("tmp", (B, 2 * H), dA.dtype)
        dhu = self._buf("dhu", (B, H), dA.dtype)
        dh.fill(0)
        for t in reversed(range(self.T)):
            self._dh_out(dy, t, dh)
            a, d, du = A[t], dA[t], dAU[t]
            r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
            dr, dz, dn = d[:, :H], d[:, H:2 * H], d[:, 2 * H:]
            np.subtract(hs[t], n, out=dz)
            dz *= dh                                                  # dL/dz
            np.subtract(1.0, z, out=dn)
            dn *= dh                                                  # dL/dn
            nn = tmp[:, :H]
            np.multiply(n, n, out=nn)
            np.subtract(1.0, nn, out=nn)
            dn *= nn                                                  # dA_n
            np.multiply(dn, hn[t], out=dr)                            # dL/dr
            s = tmp                                                   # sigma' = s (1 - s)
            np.subtract(1.0, a[:, :2 * H], out=s)
            s *= a[:, :2 * H]
            d[:, :2 * H] *= s
            du[:, :2 * H] = d[:, :2 * H]
            np.multiply(dn, r, out=du[:, 2 * H:])                     # what h U_n + bn sees
            dh *= z
            dh += np.matmul(du, self.U.T, out=dhu)                    # dh_{t-1}
        np.add.reduce(dAU[:, :, 2 * H:].reshape(-1, H), axis=0, out=self.dbn)
        return dAU
