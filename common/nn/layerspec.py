"""The layer spec: a model's hidden layers as comma-separated tokens, and the layers they build.

    conv:C:K[:S[:P]]    Conv2D, C channels, K x K kernel, stride S (1), padding P (0):
                        a number of zeros on each side, or `same`
    maxpool:K           MaxPool2D, K x K windows, stride K
    avgpool:K           AvgPool2D, likewise
    flatten             images or sequences -> vectors
    dense:N             Dense, N units
    dropout:P           Dropout with probability P in [0, 1)
    batchnorm           BatchNorm over the last axis (per channel after a convolution)
    rnn:H[:seq]         SimpleRNN (tanh), LSTM, GRU with H units; `:seq` returns
    lstm:H[:seq]        every step (B, T, H), to stack another recurrent layer;
    gru:H[:seq]         without it the last step (B, H)
    relu, leaky_relu[:A], sigmoid, tanh, softmax    activations

e.g. `conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu` or
`lstm:128`. The output layer (Dense to the data's classes) is added after the
tokens, so they must end in vectors. Each sample enters shaped by the model's
`input_shape`: (C, H, W) images (held channels-last, conv.py), (T, F) sequences, or
flat vectors.

Errors are ConfigErrors that name the token (and its position) and say what was
expected: `parse` checks the syntax, `layers_from_tokens` the shapes (a convolution on
vectors, a kernel larger than its image, a dense layer on images without flatten).

Initialisation, per layer: a dense or convolutional weight takes the model's `init`
if set, else the usual one for the activation that follows it (He before ReLU,
Xavier before tanh; LeCun with none); recurrent layers as recurrent.py says.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.nn.conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from downpour.common.nn.initializers import DEFAULT_FOR_ACTIVATION
from downpour.common.nn.layers import (
    ACTIVATIONS,
    BatchNorm,
    Dense,
    Dropout,
    Layer,
    LeakyReLU,
    ReLU,
    show_shape,
)
from downpour.common.nn.recurrent import GRU, LSTM, SimpleRNN

RECURRENT = {"rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}
SYNTAX = {  # kind -> how its token is written
    "conv": "conv:C:K[:S[:P]] (channels, kernel, stride, padding: a number or same)",
    "maxpool": "maxpool:K", "avgpool": "avgpool:K", "flatten": "flatten", "dense": "dense:N",
    "dropout": "dropout:P with 0 <= P < 1", "batchnorm": "batchnorm",
    **{k: f"{k}:H[:seq]" for k in RECURRENT},
    **{k: k for k in ACTIVATIONS}, "leaky_relu": "leaky_relu[:A] with 0 <= A < 1",
}


class Token(NamedTuple):
    """One parsed token: its kind, its arguments, and the text it came from."""

    kind: str
    args: tuple
    text: str


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError
    return value


def parse_token(text: str, position: int = 0) -> Token:
    """The Token written as `text` (the `position`-th, counted from 1, for messages)."""
    kind, *args = text.strip().lower().split(":")
    where = f"layer {position} {text.strip()!r}" if position else f"layer {text.strip()!r}"
    if kind not in SYNTAX:
        raise ConfigError(f"{where}: unknown layer {kind!r}; expected one of "
                          f"{', '.join(SYNTAX)} (e.g. conv:32:3,relu,maxpool:2,flatten,dense:128)")
    try:
        if kind == "conv" and 2 <= len(args) <= 4:
            padding = args[3] if len(args) == 4 else "0"
            padding = "same" if padding == "same" else int(padding)
            if padding != "same" and padding < 0:
                raise ValueError
            values = (_positive(args[0]), _positive(args[1]),
                      _positive(args[2]) if len(args) > 2 else 1, padding)
        elif kind in ("maxpool", "avgpool", "dense") and len(args) == 1:
            values = (_positive(args[0]),)
        elif kind in RECURRENT and len(args) in (1, 2) and args[1:] in ([], ["seq"]):
            values = (_positive(args[0]), len(args) == 2)
        elif kind == "dropout" and len(args) == 1:
            values = (_fraction(args[0]),)
        elif kind == "leaky_relu" and len(args) <= 1:
            values = tuple(_fraction(a) for a in args)
        elif kind in ("flatten", "batchnorm", *ACTIVATIONS) and not args:
            values = ()
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: expected {SYNTAX[kind]}") from None
    if kind == "conv" and values[3] == "same" and values[2] != 1:
        raise ConfigError(f"{where}: 'same' padding needs stride 1 (as in PyTorch); give the "
                          "padding as a number")
    return Token(kind, values, text.strip())


def parse(spec: str | Iterable[str]) -> tuple[str, ...]:
    """The tokens of a layer spec (a comma-separated string or a list of tokens),
    each checked; ConfigError naming the first bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tokens = tuple(str(t).strip() for t in items)
    if any(not t for t in tokens):
        raise ConfigError(f"layers {spec!r}: an empty token; write tokens separated by single "
                          "commas, e.g. conv:32:3,relu,maxpool:2,flatten,dense:128,relu")
    for i, t in enumerate(tokens, start=1):
        parse_token(t, i)
    return tokens


def internal_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A sample's shape inside the model: (C, H, W) images are held as (H, W, C)."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return (h, w, c)
    return tuple(input_shape)


def _init_before(tokens: list[Token], i: int, init: str) -> str:
    """The initialiser of the weight layer at `i`: `init`, or the usual one for the
    activation that follows it (batch norm and dropout between them skipped)."""
    if init:
        return init
    for t in tokens[i + 1:]:
        if t.kind in DEFAULT_FOR_ACTIVATION:
            return DEFAULT_FOR_ACTIVATION[t.kind]
        if t.kind not in ("batchnorm", "dropout"):
            break
    return DEFAULT_FOR_ACTIVATION["linear"]


def _reads_output(layers: list[Layer]) -> bool:
    """Whether something rereads the tensor the next layer receives: the data (no layer
    yet), or a layer that keeps its output (Flatten and Dropout pass theirs through)."""
    for layer in reversed(layers):
        if not isinstance(layer, (Flatten, Dropout)):
            return layer.keeps_output
    return True


def layers_from_tokens(tokens: Iterable[str], input_shape: tuple[int, ...], n_outputs: int, *,
                 init: str = "", output_init: str = "xavier_uniform", leaky_slope: float = 0.01,
                 seed: int = 0, stream: int = 0) -> list[Layer]:
    """The layers of `tokens` for samples of `input_shape` (as the user writes it), then
    the output Dense. Dropout masks come from generators seeded by (seed, stream, layer)."""
    parsed = [parse_token(t, i) for i, t in enumerate(tokens, start=1)]
    shape = internal_shape(input_shape)
    layers: list[Layer] = []
    for i, tok in enumerate(parsed):
        where = f"layer {i + 1} {tok.text!r}"
        kind, args = tok.kind, tok.args
        if kind == "conv":
            channels, kernel, stride, padding = args
            layer = Conv2D(shape, channels, kernel, stride, padding, _init_before(parsed, i, init))
        elif kind == "maxpool":
            layer = MaxPool2D(shape, *args)
        elif kind == "avgpool":
            layer = AvgPool2D(shape, *args)
        elif kind == "flatten":
            layer = Flatten(shape)
        elif kind == "dense":
            if len(shape) != 1:
                raise ConfigError(f"{where} needs vectors, but its input is {show_shape(shape)}: "
                                  "put flatten before it")
            layer = Dense(shape[0], args[0], _init_before(parsed, i, init))
            layer.out_shape = (args[0],)
        elif kind in RECURRENT:
            units, sequence = args
            layer = RECURRENT[kind](shape, units, sequence, init or "xavier_uniform")
        elif kind == "dropout":
            layer = Dropout(args[0], np.random.default_rng([seed, stream, len(layers)]))
        elif kind == "batchnorm":
            layer = BatchNorm(shape[-1])
        elif kind == "leaky_relu":
            layer = LeakyReLU(*(args or (leaky_slope,)))
        elif kind == "relu":                 # in place when nobody rereads its input or its dy
            layer = ReLU(inplace=not _reads_output(layers))
        else:
            layer = ACTIVATIONS[kind]()
        shape = getattr(layer, "out_shape", shape)
        layers.append(layer)
    if len(shape) != 1:
        raise ConfigError(f"the layers end in {show_shape(shape)}, but the "
                          "output layer needs vectors: end with flatten, dense:N, or a recurrent "
                          "layer without :seq")
    layers.append(Dense(shape[0], n_outputs, output_init))
    layers[0].need_dx = False                 # nobody needs the gradient of the data
    return layers
