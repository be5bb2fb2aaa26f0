"""A multi-layer perceptron whose parameters and gradients are two flat vectors.

`ModelSpec` is the whole description of a model (it travels in the cluster spec);
`Model` builds the layers from it, packs every parameter into `params` and every
gradient into `grads` (both 1-D, laid out by `layout`), and offers

    forward(x, train)   -> output (B, K)
    backward(d_out)     -> fills grads
    loss_and_grad(x, y) -> loss, with grads holding its gradient (regularisers included)
    evaluate(x, y)      -> (loss, accuracy)

Layer order for each hidden width h:  Dense(h) [-> BatchNorm] -> activation [-> Dropout];
then a Dense output layer whose logits go to the loss.

Batch-norm running statistics are non-trainable state: they live in a separate
flat vector `buffers` (laid out by `buffer_layout`) that no optimizer touches.
Each replica updates its own copy while it trains; in a cluster they are never
sent: the evaluator recomputes them from training batches with the weights it
evaluates (`calibrate_batchnorm`), so statistics and weights always match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.initializers import DEFAULT_FOR_ACTIVATION, INITIALIZERS, initial_vector
from downpour.common.layers import ACTIVATIONS, BatchNorm, Dense, Dropout, Layer, LeakyReLU, ReLU
from downpour.common.layout import Layout
from downpour.common.losses import LOSSES, make_loss


@dataclass(frozen=True)
class ModelSpec:
    """What a model is. Every field is validated on construction."""

    n_inputs: int
    n_outputs: int
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"          # relu | leaky_relu | sigmoid | tanh
    init: str = ""                    # hidden layers; "" = the usual one for the activation
    output_init: str = "xavier_uniform"
    dropout: float = 0.0              # after each hidden activation; 0 = none
    batchnorm: bool = False           # after each hidden Dense, before the activation
    loss: str = "softmax_ce"          # softmax_ce | mse | sigmoid_bce
    l1: float = 0.0                   # adds l1 * sum|W| over weight matrices
    l2: float = 0.0                   # adds l2/2 * sum W^2 over weight matrices
    leaky_slope: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.n_inputs < 1 or self.n_outputs < 1 or any(h < 1 for h in self.hidden):
            raise ConfigError(f"layer widths must be >= 1, got inputs={self.n_inputs}, "
                              f"hidden={self.hidden}, outputs={self.n_outputs}")
        if self.activation not in ACTIVATIONS or self.activation == "softmax":
            raise ConfigError(f"unknown hidden activation {self.activation!r}; "
                              "choose relu, leaky_relu, sigmoid or tanh")
        for key in ("init", "output_init"):
            value = getattr(self, key)
            if value and value not in INITIALIZERS:
                raise ConfigError(f"unknown initialiser {key}={value!r}; "
                                  f"choose one of {', '.join(INITIALIZERS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("l1", "l2"):
            if not getattr(self, key) >= 0.0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")

    @property
    def hidden_init(self) -> str:
        return self.init or DEFAULT_FOR_ACTIVATION[self.activation]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def build_layers(spec: ModelSpec, seed: int = 0, stream: int = 0) -> list[Layer]:
    """The layers of `spec`. Dropout masks come from generators seeded by (seed, stream, layer)."""
    layers: list[Layer] = []
    width = spec.n_inputs
    for h in spec.hidden:
        layers.append(Dense(width, h, spec.hidden_init))
        if spec.batchnorm:
            layers.append(BatchNorm(h))
        act = ACTIVATIONS[spec.activation]
        if act is LeakyReLU:
            layers.append(act(spec.leaky_slope))
        elif act is ReLU:                     # its input and its dy are scratch nobody rereads
            layers.append(act(inplace=True))
        else:
            layers.append(act())
        if spec.dropout > 0:
            rng = np.random.default_rng([seed, stream, len(layers)])
            layers.append(Dropout(spec.dropout, rng))
        width = h
    layers.append(Dense(width, spec.n_outputs, spec.output_init))
    layers[0].need_dx = False                 # nobody needs the gradient of the data
    return layers


def _specs(layers: list[Layer], kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Every (full name, shape, initialiser) of the layers, in layout order."""
    out = []
    for i, layer in enumerate(layers):
        specs = layer.param_specs() if kind == "params" else layer.buffer_specs()
        out += [(f"{i}.{layer.kind}.{name}", shape, init) for name, shape, init in specs]
    return out


def model_layout(spec: ModelSpec) -> Layout:
    """The layout of `spec`'s trainable parameters (the vector servers shard)."""
    return Layout((name, shape) for name, shape, _ in _specs(build_layers(spec), "params"))


def initial_params(spec: ModelSpec, seed: int, dtype=np.float32) -> np.ndarray:
    """The initial flat parameter vector of `spec` for `seed`; a shard takes its slice of it."""
    return initial_vector([(shape, init) for _, shape, init in _specs(build_layers(spec), "params")],
                          seed, dtype)


def _own(views: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The views whose names start with `prefix`, keyed by the rest of the name."""
    return {k[len(prefix):]: v for k, v in views.items() if k.startswith(prefix)}


class Model:
    """A replica: layers bound to views of the flat `params`, `grads` and `buffers` vectors."""

    def __init__(self, spec: ModelSpec, seed: int = 0, dtype=np.float32, stream: int = 0,
                 params: np.ndarray | None = None):
        """`params`, if given, is the storage to use for the parameters (e.g. shared
        memory): its values are left as they are; otherwise the initial vector for `seed`."""
        self.spec, self.dtype = spec, np.dtype(dtype)
        self.layers = build_layers(spec, seed, stream)
        pspecs, bspecs = _specs(self.layers, "params"), _specs(self.layers, "buffers")
        self.layout = Layout((n, s) for n, s, _ in pspecs)
        self.buffer_layout = Layout((n, s) for n, s, _ in bspecs)
        if params is None:
            params = initial_vector([(s, i) for _, s, i in pspecs], seed, self.dtype)
        elif params.shape != (self.layout.size,) or params.dtype != self.dtype:
            raise ValueError(f"params storage is {params.dtype} {params.shape}, the model needs "
                             f"{self.dtype} ({self.layout.size},)")
        self.params = params
        self.grads = np.zeros_like(self.params)
        self.buffers = initial_vector([(s, i) for _, s, i in bspecs], seed, self.dtype)
        pv, gv = self.layout.views(self.params), self.layout.views(self.grads)
        bv = self.buffer_layout.views(self.buffers)
        for i, layer in enumerate(self.layers):
            prefix = f"{i}.{layer.kind}."
            layer.bind(_own(pv, prefix), _own(gv, prefix), _own(bv, prefix))
        self.loss = make_loss(spec.loss)
        self._dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        self._scratch = np.empty(max(d.W.size for d in self._dense), self.dtype)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """The output (B, n_outputs), logits for the classification losses."""
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, d_out: np.ndarray) -> None:
        """Back-propagate dL/d(output) through the layers of the last forward, into `grads`."""
        d = d_out
        for layer in reversed(self.layers):
            d = layer.backward(d)

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> float:
        """Training-mode forward and backward on one batch; returns the loss, regularisers included."""
        loss = self.loss.forward(self.forward(x, train=True), y)
        self.backward(self.loss.backward())
        return loss + self._regularise()

    def _regularise(self) -> float:
        """Add the L1/L2 penalty gradients to the weight gradients; return the penalty."""
        l1, l2 = self.spec.l1, self.spec.l2
        penalty = 0.0
        if not (l1 or l2):
            return penalty
        for layer in self._dense:
            W, dW = layer.W, layer.dW
            tmp = self._scratch[:W.size].reshape(W.shape)
            if l1:
                penalty += l1 * float(np.abs(W, out=tmp).sum())
                np.sign(W, out=tmp)
                tmp *= l1
                dW += tmp
            if l2:
                w = W.ravel()
                penalty += 0.5 * l2 * float(np.dot(w, w))
                np.multiply(W, l2, out=tmp)
                dW += tmp
        return penalty

    def calibrate_batchnorm(self, x: np.ndarray, batch_size: int, batches: int = 50) -> None:
        """Set batch-norm running statistics to the average over `batches` training batches.

        For weights that arrived from elsewhere (a cluster's servers), whose
        running statistics were never accumulated here. The k-th batch enters with
        momentum 1/k, so the result is the plain mean of the batch statistics.
        """
        norms = [layer for layer in self.layers if isinstance(layer, BatchNorm)]
        if not norms:
            return
        saved = [norm.momentum for norm in norms]
        try:
            for k, lo in enumerate(range(0, min(len(x), batches * batch_size) - batch_size + 1,
                                         batch_size), start=1):
                for norm in norms:
                    norm.momentum = 1.0 / k
                self.forward(x[lo:lo + batch_size], train=True)
        finally:
            for norm, m in zip(norms, saved):
                norm.momentum = m

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """Mean loss (without regularisers) and accuracy on (x, y), in evaluation mode."""
        total_loss, correct = 0.0, 0
        for lo in range(0, len(x), batch_size):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            out = self.forward(xb, train=False)
            total_loss += self.loss.forward(out, yb) * len(xb)
            if out.shape[1] == 1:
                correct += int(np.sum((out[:, 0] > 0) == (yb > 0)))
            else:
                correct += int(np.sum(out.argmax(axis=1) == yb))
        return total_loss / len(x), correct / len(x)
