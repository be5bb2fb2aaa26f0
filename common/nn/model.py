"""A model whose parameters and gradients are two flat vectors.

`ModelSpec` is the whole description of a model (it travels in the cluster spec);
`Model` builds the layers from it, packs every parameter into `params` and every
gradient into `grads` (both 1-D, laid out by `layout`), and offers

    forward(x, train)   -> output (B, K)
    backward(d_out)     -> fills grads
    loss_and_grad(x, y) -> loss, with grads holding its gradient (regularisers included)
    evaluate(x, y)      -> (loss, accuracy)

The layers are a layer spec (`layers`, tokens as layerspec.py describes: conv,
pooling, recurrent, dense, ...) over samples shaped `input_shape` (C,H,W images,
T,F sequences, or flat); without one, the multi-layer perceptron `hidden` describes:
for each width h, dense:h [-> batchnorm] -> activation [-> dropout]. Then a Dense
output layer whose logits go to the loss. `forward` takes rows of n_inputs
features and reshapes them to `input_shape` (images held channels-last).

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
from downpour.common.nn.initializers import DEFAULT_FOR_ACTIVATION, INITIALIZERS, initial_vector
from downpour.common.nn.layers import ACTIVATIONS, BatchNorm, Layer
from downpour.common.nn.layerspec import layers_from_tokens, parse
from downpour.common.nn.layout import Layout
from downpour.common.nn.losses import LOSSES, make_loss


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
    layers: tuple[str, ...] = ()      # layer-spec tokens; () = the MLP of hidden, activation, ...
    input_shape: tuple[int, ...] = () # per sample: (C, H, W) or (T, F); () = (n_inputs,)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "layers", parse(self.layers) if self.layers else ())
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
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
        if self.input_shape and (len(self.input_shape) > 3 or min(self.input_shape) < 1
                                 or int(np.prod(self.input_shape)) != self.n_inputs):
            raise ConfigError(f"input_shape {','.join(map(str, self.input_shape))} does not fit "
                              f"samples of {self.n_inputs} features: expected C,H,W (images) or "
                              f"T,F (sequences) whose product is {self.n_inputs}, e.g. 1,28,28 "
                              "or 28,28 for MNIST")
        layers_from_spec(self)                # ConfigError for tokens that do not fit their input

    @property
    def tokens(self) -> tuple[str, ...]:
        """The hidden layers as layer-spec tokens: `layers`, or those `hidden` stands for."""
        if self.layers:
            return self.layers
        out = ["flatten"] if len(self.input_shape) > 1 else []
        for h in self.hidden:
            out += [f"dense:{h}"] + (["batchnorm"] if self.batchnorm else []) + [self.activation]
            out += [f"dropout:{self.dropout}"] if self.dropout > 0 else []
        return tuple(out)

    def describe(self) -> str:
        """The model in one line, e.g. `784-256-128-10` or `1,28,28 conv:32:3,...,flatten -> 10`."""
        if not self.layers and len(self.input_shape) <= 1:
            return "-".join(map(str, (self.n_inputs, *self.hidden, self.n_outputs)))
        shape = ",".join(map(str, self.input_shape or (self.n_inputs,)))
        return f"{shape} {','.join(self.tokens)} -> {self.n_outputs}"

    @property
    def hidden_init(self) -> str:
        return self.init or DEFAULT_FOR_ACTIVATION[self.activation]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("hidden", "layers", "input_shape"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def layers_from_spec(spec: ModelSpec, seed: int = 0, stream: int = 0) -> list[Layer]:
    """The layers of `spec`: `layers_from_tokens` of its tokens, input shape and settings.
    Dropout masks come from generators seeded by (seed, stream, layer)."""
    return layers_from_tokens(spec.tokens, spec.input_shape or (spec.n_inputs,), spec.n_outputs,
                              init=spec.init, output_init=spec.output_init,
                              leaky_slope=spec.leaky_slope, seed=seed, stream=stream)


def _specs(layers: list[Layer], kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Every (full name, shape, initialiser) of the layers, in layout order."""
    out = []
    for i, layer in enumerate(layers):
        specs = layer.param_specs() if kind == "params" else layer.buffer_specs()
        out += [(f"{i}.{layer.kind}.{name}", shape, init) for name, shape, init in specs]
    return out


def model_layout(spec: ModelSpec) -> Layout:
    """The layout of `spec`'s trainable parameters (the vector servers shard)."""
    return Layout((name, shape) for name, shape, _ in _specs(layers_from_spec(spec), "params"))


def initial_params(spec: ModelSpec, seed: int, dtype=np.float32) -> np.ndarray:
    """The initial flat parameter vector of `spec` for `seed`; a shard takes its slice of it."""
    return initial_vector([(shape, init) for _, shape, init in _specs(layers_from_spec(spec), "params")],
                          seed, dtype)


EVAL_FLOATS = 1 << 24          # 64 MB of float32 activations at most per evaluation batch


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
        self.layers = layers_from_spec(spec, seed, stream)
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
        self._weights = [w for layer in self.layers for w in layer.weights()]
        self._scratch = np.empty(max(W.size for W, _ in self._weights), self.dtype)
        self._input = None                     # (B, H, W, C) images made channels-last

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(layer, BatchNorm) for layer in self.layers)

    def _shaped(self, x: np.ndarray) -> np.ndarray:
        """Rows of n_inputs features as the first layer takes them: (B, D), (B, T, F), or
        (B, H, W, C) from (C, H, W) samples (a view when C is 1)."""
        shape, B = self.spec.input_shape, x.shape[0]
        if len(shape) == 3:
            c, h, w = shape
            x = x.reshape(B, c, h, w).transpose(0, 2, 3, 1)
            if c > 1:                          # a transposing copy, into a buffer kept for the shape
                if self._input is None or self._input.shape != x.shape:
                    self._input = np.empty(x.shape, self.dtype)
                np.copyto(self._input, x)
                x = self._input
            return x
        return x.reshape(B, *shape) if len(shape) == 2 else x

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """The output (B, n_outputs), logits for the classification losses; x is (B, n_inputs)."""
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        x = self._shaped(x)
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
        for W, dW in self._weights:
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

    @property
    def eval_batch(self) -> int:
        """Rows per evaluation batch: 1000, or fewer where a sample's activations are
        large (a CNN's), so the layers' buffers stay within EVAL_FLOATS numbers."""
        per_sample = sum(int(np.prod(getattr(layer, "out_shape", (1,)))) + layer.scratch_per_sample
                         for layer in self.layers)
        return int(max(1, min(1000, EVAL_FLOATS // per_sample)))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 0) -> tuple[float, float]:
        """Mean loss (without regularisers) and accuracy on (x, y), in evaluation mode,
        `batch_size` rows at a time (0: `eval_batch`)."""
        batch_size = batch_size or self.eval_batch
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
