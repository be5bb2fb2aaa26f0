"""Settings: one typed, documented dataclass; a file, the environment and flags override it.

Precedence, lowest first:

    the defaults below  <  a TOML file (--config FILE)  <  DOWNPOUR_<KEY> variables  <  flags

Every field is one setting: its name is the TOML key, `--<name-with-dashes>` the
flag and `DOWNPOUR_<NAME>` the environment variable. An unknown key, an unknown
DOWNPOUR_ variable or a bad value is a ConfigError that names it. Each command
exposes the groups of settings it uses (`add_arguments(parser, groups)`).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

from downpour.common.errors import ConfigError
from downpour.common.nn.layerspec import parse as parse_layers

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ENV_PREFIX = "DOWNPOUR_"


MODES = ("single", "async", "sync", "ssp", "hogwild", "hybrid")
CLUSTER = ("async", "sync", "ssp", "hybrid")        # the modes with servers and a scheduler
SPARSE = ("async", "hybrid")                        # the modes of sparse models (--model)
REPLICAS = CLUSTER + ("hogwild",)                   # the modes with several workers

# dead_after_s >= LIVENESS_BEATS x heartbeat_s. A node beats every heartbeat_s; the scheduler
# declares it dead after dead_after_s without a message (ps/membership.py _check_liveness), and
# the node gives the scheduler up after dead_after_s without a reply (common/wire/node.py Heartbeat).
# Three beats' worth of silence means the beats due after one and after two intervals both
# failed to come: one late beat (a process starved on a shared core, a scheduler busy
# evaluating) is never a death. Below one interval every node dies at its first beat.
LIVENESS_BEATS = 3

# Names people type from other tools and the setting each means. They are suggested in the
# error for an unknown TOML key, DOWNPOUR_* variable or flag, never accepted in its place.
ALIASES = {
    "learning_rate": "lr", "learningrate": "lr",
    "batch": "batch_size", "mini_batch": "batch_size", "minibatch": "batch_size",
    "num_workers": "workers", "n_workers": "workers",
    "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
    "num_servers": "shards", "n_servers": "shards", "servers": "shards", "num_shards": "shards",
    "n_shards": "shards", "num_ps": "shards",
    "momentum": "optimizer_args", "betas": "optimizer_args", "beta1": "optimizer_args",
    "beta2": "optimizer_args", "eps": "optimizer_args", "epsilon": "optimizer_args",
    "rho": "optimizer_args",
    "random_seed": "seed", "wd": "weight_decay", "max_grad_norm": "clip_norm",
    "data_path": "data_dir",
}


def setting(default, help: str, group: str, *, low=None, choices: Iterable[str] | None = None,
            modes: tuple[str, ...] = MODES):
    """A Config field: `low` is an inclusive lower bound, `choices` the allowed strings,
    `modes` the modes that use it (giving it explicitly to another mode is an error)."""
    return field(default=default, metadata={"help": help, "group": group, "low": low,
                                            "choices": tuple(choices) if choices else None,
                                            "modes": modes})


@dataclass(frozen=True)
class Config:
    # -- run ------------------------------------------------------------------------------
    mode: str = setting("single", "single: one process; async: Downpour SGD; sync: synchronous "
                        "data-parallel SGD; ssp: bounded staleness; hogwild: lock-free "
                        "local processes; hybrid (--model): tables async, the dense part "
                        "synchronous (PERSIA)", "run", choices=MODES)
    seed: int = setting(0, "seed of the initial weights, data order and dropout masks", "run", low=0)
    threads: int = setting(1, "BLAS threads per process", "run", low=1)
    # -- data -----------------------------------------------------------------------------
    data_dir: str = setting("", "directory of MNIST IDX files; must hold both splits "
                            "(default: data/mnist if it holds both, else the 15,000 digits shipped "
                            "with downpour: t10k and train-5k)", "data")
    train_split: str = setting("t10k", "file prefix of the training split (e.g. train)", "data")
    test_split: str = setting("train-5k", "file prefix of the held-out split (e.g. t10k)", "data")
    synthetic: int = setting(0, "train on N synthetic samples (N/5 held out) instead of MNIST; "
                             "0 = MNIST (see --data-dir)", "data", low=0)
    data: str = setting("", "criteo:DIR: click logs in the Criteo layout, DIR/train.tsv and "
                        "DIR/test.tsv (streamed; `downpour synth ctr DIR` writes such data), for "
                        "--model lr or fm (default: MNIST or --synthetic)", "data")
    # -- model ----------------------------------------------------------------------------
    model: str = setting("", "a sparse model on --data criteo:DIR: lr (logistic regression on "
                         "the features' keys) or fm (a factorization machine); rows live in "
                         "the servers' tables (default: the dense model of --hidden or --layers)",
                         "model", choices=("", "lr", "fm"), modes=SPARSE)
    embed_dim: int = setting(16, "fm: the factors' dimension D (table rows hold 1 + D floats)",
                             "model", low=1, modes=SPARSE)
    embed_init: float = setting(0.01, "sparse models: std of a new row's normal initial values, "
                                "drawn from its key and the seed (0: zeros)", "model", low=0.0,
                                modes=SPARSE)
    admit_after: int = setting(1, "sparse models: a key gets a row once training has seen it "
                               "this many times; before, it reads zeros", "model", low=1,
                               modes=SPARSE)
    table_max_rows: int = setting(0, "sparse models: each server keeps at most this many rows, "
                                  "evicting the least recently used (with their optimizer state; "
                                  "a key that comes back starts again); 0 = no cap", "model",
                                  low=0, modes=SPARSE)
    layers: str = setting("", "hidden layers as comma-separated tokens, e.g. conv:32:3,relu,"
                          "maxpool:2,flatten,dense:128,relu or lstm:128: conv:C:K[:S[:P]] "
                          "(P a number or same), maxpool:K, avgpool:K, flatten, dense:N, dropout:P, "
                          "batchnorm, rnn:H, lstm:H, gru:H (add :seq for every step), relu, "
                          "leaky_relu, sigmoid, tanh, softmax; the output layer is added (default: "
                          "the MLP of --hidden)", "model")
    input_shape: tuple = setting((), "shape of each sample for --layers: C,H,W images (MNIST "
                                 "1,28,28) or T,F sequences (28,28: rows as time steps) (default: "
                                 "flat vectors)", "model")
    hidden: tuple = setting((256, 128), "hidden layer widths, comma-separated; shorthand for "
                            "dense:N,ACTIVATION tokens", "model")
    activation: str = setting("relu", "hidden activation", "model",
                              choices=("relu", "leaky_relu", "sigmoid", "tanh"))
    init: str = setting("", "initialiser of hidden layers (default: He for ReLU, Xavier for "
                        "tanh/sigmoid)", "model")
    dropout: float = setting(0.0, "dropout probability after each hidden layer", "model", low=0.0)
    batchnorm: bool = setting(False, "batch normalisation before each hidden activation", "model")
    loss: str = setting("softmax_ce", "loss function", "model",
                        choices=("softmax_ce", "mse", "sigmoid_bce"))
    l1: float = setting(0.0, "L1 penalty on weight matrices", "model", low=0.0)
    l2: float = setting(0.0, "L2 penalty (l2/2 |W|^2) on weight matrices", "model", low=0.0)
    # -- optimizer ------------------------------------------------------------------------
    optimizer: str = setting("adam", "sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam, "
                             "adamax or nadam", "optim")
    lr: float = setting(0.001, "learning rate", "optim", low=0.0)
    optimizer_args: str = setting("", "other hyperparameters, e.g. 'momentum=0.95' or "
                                  "'betas=0.9:0.99,eps=1e-7'", "optim")
    weight_decay: float = setting(0.0, "coupled L2 weight decay applied by the optimizer", "optim",
                                  low=0.0)
    lr_schedule: str = setting("constant", "constant | inverse:k=K | exp:gamma=G[,every=N] | "
                               "step:every=N,gamma=G | plateau:factor=F,patience=P", "optim")
    clip_value: float = setting(0.0, "clip each gradient element to [-v, v]; 0 = off", "optim",
                                low=0.0)
    clip_norm: float = setting(0.0, "rescale the gradient to this global L2 norm; 0 = off",
                               "optim", low=0.0)
    # -- training loop --------------------------------------------------------------------
    batch_size: int = setting(64, "mini-batch size per replica", "train", low=1)
    micro_batches: int = setting(1, "take each batch's gradient as the mean over this many "
                                 "equal micro-batches (gradient accumulation), summed as a sync "
                                 "server sums its workers' pushes: single mode with k equals sync "
                                 "with k workers at batch_size/k, bit for bit", "train", low=1)
    epochs: int = setting(5, "passes over the training data", "train", low=1)
    eval_every: float = setting(1.0, "evaluate on the held-out split every this many epochs",
                                "train", low=0.0)
    patience: int = setting(0, "stop after this many evaluations without a lower held-out "
                            "loss; 0 = never", "train", low=0)
    # -- cluster (the scheduler hands these to every node) ---------------------------------
    workers: int = setting(2, "worker replicas", "cluster", low=1, modes=REPLICAS)
    shards: int = setting(1, "parameter-server shards", "cluster", low=1, modes=CLUSTER)
    n_fetch: int = setting(1, "async: a worker pulls the weights every n_fetch steps", "cluster",
                           low=1, modes=("async",))
    n_push: int = setting(1, "async: a worker pushes its gradients, summed, every n_push steps",
                          "cluster", low=1, modes=("async",))
    chunk_batches: int = setting(4, "async, ssp: workers draw the epoch's batches from the "
                                 "scheduler in chunks of this many, one chunk ahead, so a fast "
                                 "worker does more of the work", "cluster", low=1,
                                 modes=("async", "ssp", "hybrid"))
    piece_kib: int = setting(4096, "servers take each shard in pieces of at most this many KiB, "
                             "applying one while the next arrives; 0 = whole shards", "cluster",
                             low=0, modes=CLUSTER)
    overlap: bool = setting(False, "async: compute the next gradient while a push_pull is in "
                            "flight (adds one step of staleness, counted)", "cluster", modes=("async",))
    staleness: int = setting(0, "ssp: a worker more than this many clocks ahead of the "
                             "slowest live worker waits", "cluster", low=0, modes=("ssp",))
    backup: int = setting(0, "sync: apply each version after workers - backup gradients; "
                          "late ones are dropped and counted", "cluster", low=0, modes=("sync",))
    staleness_lr: bool = setting(False, "async/ssp: divide each push's step by its staleness "
                                 "+ 1 (Zhang et al. 2016)", "cluster", modes=("async", "ssp"))
    slow_worker: str = setting("", "straggler injection for experiments: RANK:FACTOR makes "
                               "that worker's steps FACTOR times slower", "cluster", modes=REPLICAS)
    compute_scale: float = setting(1.0, "emulate workers this many times slower than this host: "
                                   "each step is padded to F x the CPU time of its compute, so "
                                   "W workers on fewer cores stand for W machines", "cluster",
                                   low=1.0, modes=REPLICAS)
    transport: str = setting("ipc", "local runs: ipc (unix sockets in a temp dir) or tcp "
                             "(loopback; with --link, the emulated links)", "cluster",
                             choices=("ipc", "tcp"), modes=CLUSTER)
    link: str = setting("", "local runs: put every node behind its own emulated link of this "
                        "rate each way, in tc's syntax (100mbit, 1gbit, 10gbit), in a private "
                        "network namespace (no root needed); '' = no links", "cluster",
                        modes=CLUSTER)
    server_link: str = setting("", "with --link: the servers' and the scheduler's rate "
                               "(default: --link's)", "cluster", modes=CLUSTER)
    push_codec: str = setting("none", "compress pushes: none, fp16, topk:R (the largest R "
                              "fraction of each piece, with indices) or onebit (signs and one "
                              "scale per piece); lossy codecs keep error feedback at the worker",
                              "cluster", modes=CLUSTER)
    pull_codec: str = setting("none", "compress pulls: none, fp16 or topk:R (the largest R "
                              "fraction of what changed since that worker's last pull; each "
                              "server keeps a copy per worker)", "cluster", modes=CLUSTER)
    codec_warmup_epochs: float = setting(1.0, "send uncompressed for the first this many "
                                         "epochs (as each worker counts them: its samples x "
                                         "workers), then as --push-codec and --pull-codec say",
                                         "cluster", low=0.0, modes=CLUSTER)
    heartbeat_s: float = setting(0.5, "seconds between a node's heartbeats", "cluster", low=0.01,
                                 modes=CLUSTER)
    dead_after_s: float = setting(5.0, "a node silent this long is dead", "cluster", low=0.1,
                                  modes=CLUSTER)
    timeout_s: float = setting(30.0, "seconds a request waits for its reply before a retry",
                               "cluster", low=0.01, modes=CLUSTER)
    retries: int = setting(3, "retries of a request before the node gives up", "cluster", low=0,
                           modes=CLUSTER)
    start_timeout_s: float = setting(60.0, "seconds to wait for the cluster to assemble",
                                     "cluster", low=0.1, modes=CLUSTER)
    checkpoint_every_s: float = setting(0.0, "servers checkpoint every this many seconds; 0 = "
                                        "only when they stop", "cluster", low=0.0, modes=CLUSTER)
    # -- this node (role commands; not part of the cluster spec) ---------------------------
    scheduler: str = setting("", "the scheduler's address, e.g. tcp://scheduler:5555", "node")
    bind: str = setting("", "address to listen on, tcp://HOST:PORT or ipc://PATH (default: the "
                        "scheduler tcp://127.0.0.1:5555, a server a free port of 127.0.0.1; with "
                        "keys on every interface, tcp://*:5555 and tcp://*:0); without keys only "
                        "ipc and loopback are allowed (see insecure)", "node")
    advertise: str = setting("", "host name or IP others reach this server by, when it binds "
                             "a wildcard (default: the address this host's name resolves to)",
                             "node")
    insecure: bool = setting(False, "without keys, listen beyond this host anyway (bind "
                             "tcp://*, 0.0.0.0 or a host address): anyone who reaches the port "
                             "can control the run; prefer `downpour keys DIR` and --keys",
                             "node")
    checkpoint_dir: str = setting("", "servers write shard checkpoints here", "node")
    resume: bool = setting(False, "servers continue from this run's checkpoints in checkpoint_dir "
                           "where there are any, else start fresh; another run's are ignored",
                           "node")
    endpoint_file: str = setting("", "the scheduler writes its bound address to this file",
                                 "node")
    keys: str = setting("", "folder of the cluster's CURVE keys (made by `downpour keys DIR`): "
                        "every socket runs CurveZMQ and only the cluster's keys get in",
                        "node", modes=CLUSTER)
    # -- output ---------------------------------------------------------------------------
    metrics: str = setting("", "write JSON-lines metrics to this file", "output")
    save: str = setting("", "write the final parameters and layout to this .npz file", "output")
    progress: str = setting("auto", "auto (a bar on a terminal), bar, lines or none", "output",
                            choices=("auto", "bar", "lines", "none"))
    config: str = setting("", "TOML file of settings; flags and DOWNPOUR_* variables override it",
                          "output")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low, choices = f.metadata["low"], f.metadata["choices"]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if low is not None and value < low:
                raise ConfigError(f"{f.name} must be >= {low}, got {value}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.layers:
            parse_layers(self.layers)
            mlp = {"hidden": (256, 128), "activation": "relu", "batchnorm": False, "dropout": 0.0}
            for name, default in mlp.items():
                if getattr(self, name) != default:
                    raise ConfigError(f"{name} describes the layers of --hidden, but layers is set: "
                                      f"write it as tokens in layers (e.g. dense:64,tanh,batchnorm,"
                                      f"dropout:0.2) and drop {name}")
        shortest = round(LIVENESS_BEATS * self.heartbeat_s, 6)     # s; rounded: 3 x 0.1 is 0.3
        if self.dead_after_s < shortest:
            raise ConfigError(f"dead_after_s={self.dead_after_s:g} is too short for heartbeat_s="
                              f"{self.heartbeat_s:g}: a node beats every heartbeat_s and must "
                              f"survive two late beats, so dead_after_s must be at least "
                              f"{LIVENESS_BEATS} x heartbeat_s; give --dead-after-s {shortest:g} or "
                              "more, or a shorter --heartbeat-s")
        for name in ("link", "server_link"):
            if getattr(self, name):
                parse_rate(getattr(self, name), name)
        if self.server_link and not self.link:
            raise ConfigError("server_link gives the servers another rate than --link: give "
                              "--link RATE too")
        if self.data and not self.data.startswith("criteo:"):
            raise ConfigError(f"--data {self.data!r}: the one source it names is criteo:DIR "
                              "(click logs, with --model lr or fm); leave it out for MNIST "
                              "(--data-dir) or --synthetic")
        if bool(self.model) != bool(self.data):
            raise ConfigError("--model lr or fm trains on click logs: give both --model and "
                              "--data criteo:DIR (or neither, for the dense models)")
        if self.model and self.save:
            raise ConfigError(f"--model {self.model}: its rows live in the servers' tables, which "
                              "--save does not write (--checkpoint-dir does); drop --save")
        if self.model and (self.synthetic or self.layers or self.hidden != (256, 128)):
            raise ConfigError(f"--model {self.model} is a sparse model on --data; drop "
                              "--synthetic, --layers and --hidden (they describe dense models)")
        if self.batch_size % self.micro_batches:
            raise ConfigError(f"micro_batches={self.micro_batches} must divide batch_size="
                              f"{self.batch_size}")

    @property
    def slowdown(self) -> tuple[int, float]:
        """(rank, factor) of `slow_worker`; (-1, 1.0) when none is slowed."""
        if not self.slow_worker:
            return -1, 1.0
        rank, sep, factor = self.slow_worker.partition(":")
        try:
            out = int(rank), float(factor)
        except ValueError:
            out = (-1, 0.0)
        if not sep or out[0] < 0 or not out[1] >= 1.0 or not math.isfinite(out[1]):
            raise ConfigError(f"slow_worker={self.slow_worker!r}: expected RANK:FACTOR with a "
                              "worker rank >= 0 and a factor >= 1, e.g. 1:3")
        return out

    @property
    def piece_elements(self) -> int:
        """`piece_kib` in float32 elements (0 = whole shards)."""
        return self.piece_kib * 1024 // 4

    def optimizer_kwargs(self) -> dict[str, Any]:
        """`optimizer_args` parsed into keyword arguments, with weight_decay added."""
        kwargs: dict[str, Any] = {"weight_decay": self.weight_decay}
        for item in filter(None, (s.strip() for s in self.optimizer_args.split(","))):
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"optimizer_args: expected key=value pairs separated by commas, "
                                  f"e.g. 'momentum=0.95', got {item!r}")
            try:
                parts = [float(t) for t in text.split(":")]
            except ValueError:
                raise ConfigError(f"optimizer_args: {key.strip()}={text!r} is not a number "
                                  "(use a:b for a pair, e.g. betas=0.9:0.99)") from None
            kwargs[key.strip()] = parts[0] if len(parts) == 1 else tuple(parts)
        return kwargs


RATE_UNITS = {"tbit": 10**12, "gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1,
              "tbps": 8 * 10**12, "gbps": 8 * 10**9, "mbps": 8 * 10**6, "kbps": 8 * 10**3,
              "bps": 8}   # tc's units -> bits per second (bps units are bytes per second)


def parse_rate(text: str, name: str) -> int:
    """A link rate in tc's syntax (100mbit, 1gbit, 10gbit, 500kbit) in bits per second;
    ConfigError naming setting `name` otherwise."""
    value = text.strip().lower()
    unit = next((u for u in RATE_UNITS if value.endswith(u)), None)
    try:
        number = float(value[:-len(unit)]) if unit else 0.0
    except ValueError:
        number = 0.0
    if not (unit and math.isfinite(number) and number > 0):
        raise ConfigError(f"{name}={text!r}: expected a rate as tc writes it, e.g. 100mbit, "
                          "1gbit, 10gbit (bit units are bits per second, bps units bytes)")
    return int(number * RATE_UNITS[unit])


FIELDS = {f.name: f for f in fields(Config)}
TUPLE_EXAMPLES = {"hidden": ("width", "256,128"), "input_shape": ("dimension", "1,28,28")}


def _convert(name: str, value: Any) -> Any:
    """`value` (from TOML, the environment or a flag) as the type of setting `name`."""
    default = FIELDS[name].default
    where = f"{name}={value!r}"
    if isinstance(default, tuple):
        noun, example = TUPLE_EXAMPLES[name]
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{where}: expected comma-separated positive integers like {example}")
        try:
            out = tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected comma-separated positive integers "
                              f"like {example}") from None
        if any(v < 1 or isinstance(v, bool) for v in out):
            raise ConfigError(f"{where}: every {noun} must be a positive integer, like {example}")
        return out
    if name == "layers" and isinstance(value, (list, tuple)):      # TOML may list the tokens
        value = ",".join(map(str, value))
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got a boolean")
    try:
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {'an integer' if isinstance(default, int) else 'a number'}"
                          ) from None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    return value


def nearest(name: str) -> str | None:
    """The setting an unknown `name` (any case, dashes or underscores) most likely means:
    the one ALIASES names, else the closest spelling, else None."""
    name = name.lower().replace("-", "_")
    close = difflib.get_close_matches(name, FIELDS, n=1)
    return ALIASES.get(name) or (close[0] if close else None)


def _unknown(key: str, where: str, prefix: str = "") -> ConfigError:
    """The error for an unknown setting `key`, spelled as it was (`prefix` + NAME for a
    variable), with the nearest known setting suggested in the same spelling."""
    near = nearest(key[len(prefix):])
    if near is None:
        hint = "; `downpour train --help` lists every setting"
    else:
        spelled = prefix + near.upper() if prefix else near
        hint = f"; did you mean {spelled!r}?"
        if near == "optimizer_args":
            hint += " It takes the optimizer's hyperparameters, e.g. 'momentum=0.95'"
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


def load_toml(path: str) -> dict[str, Any]:
    """The settings in a TOML file (flat keys; dashes or underscores), validated by name."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path!r}: [{key}] is a table, but settings are "
                              f"top-level keys (write `epochs = 5`, not `[{key}]` and then "
                              "`epochs = 5`); see examples/run.toml")
        if name not in FIELDS or name == "config":
            raise _unknown(key, f"config file {path!r}")
        out[name] = _convert(name, value)
    return out


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as DOWNPOUR_<NAME> variables."""
    out = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            raise _unknown(var, "the environment", prefix=ENV_PREFIX)
        out[name] = _convert(name, value)
    return out


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str],
                  exclude: Iterable[str] = ()) -> None:
    """Add a flag for every setting named, or in a group named, in `names`, but `exclude`.

    Flags not given stay out of the namespace, so `resolve` can tell them apart.
    """
    names, exclude = tuple(names), set(exclude)
    for group in dict.fromkeys(f.metadata["group"] for f in fields(Config)):
        chosen = [f for f in fields(Config) if f.name not in exclude
                  and f.metadata["group"] == group and (group in names or f.name in names)]
        section = parser.add_argument_group(group) if chosen else None
        for f in chosen:
            flag = "--" + f.name.replace("_", "-")
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            help_ = f.metadata["help"]
            if "default" not in help_:                  # some say their default in words
                help_ += f" (default: {shown!r})"
            if isinstance(f.default, bool):
                section.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                     default=argparse.SUPPRESS, help=help_)
            else:
                section.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_,
                                     metavar=f.name.upper())


def parse_list(text: str, what: str, cast=int, choices=None) -> list:
    """The comma-separated values of flag --`what`: positive integers, or names from `choices`."""
    try:
        items = [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items or (choices and any(i not in choices for i in items)) or \
            (cast is int and min(items) < 1):
        raise ConfigError(f"--{what}={text!r}: expected " + (
            f"names from {', '.join(choices)}" if choices else "positive integers, e.g. 1,2,4"))
    return items


def to_args(cfg: Config) -> list[str]:
    """Flags that reproduce `cfg` (its non-default settings, `config` excepted)."""
    args = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "config" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def to_dict(cfg: Config) -> dict[str, Any]:
    """`cfg` as plain values (tuples as lists), for the cluster spec."""
    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v
            for f in fields(Config)}


def from_dict(d: Mapping[str, Any]) -> Config:
    """The Config of `to_dict` output; unknown keys and bad values are ConfigErrors."""
    for key in d:
        if key not in FIELDS:
            raise _unknown(key, "the cluster spec")
    return replace(Config(), **{k: _convert(k, v) for k, v in d.items()})


def given(args: argparse.Namespace | Mapping[str, Any] | None = None,
          environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given explicitly, converted: parsed flags `args` over DOWNPOUR_*
    variables over the TOML file they name. Defaults are not in it."""
    flags = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    flags = {k: v for k, v in flags.items() if k in FIELDS}
    env = from_environ(os.environ if environ is None else environ)
    path = flags.get("config") or env.get("config") or ""
    values = {**(load_toml(path) if path else {}), **env}
    values.update({k: _convert(k, v) for k, v in flags.items()})
    return values


def resolve(args: argparse.Namespace | Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Config:
    """The Config for parsed flags `args`, after the file they name and the environment."""
    return replace(Config(), **given(args, environ))


def unused_settings(names: Iterable[str], mode: str) -> dict[str, tuple[str, ...]]:
    """{setting: the modes that use it} for each setting in `names` that `mode` does not use."""
    return {n: FIELDS[n].metadata["modes"] for n in names
            if mode not in FIELDS[n].metadata["modes"]}


def check_used(names: Iterable[str], mode: str) -> None:
    """ConfigError if a setting in `names` (those given explicitly) means nothing in `mode`."""
    for name, modes in unused_settings(names, mode).items():
        raise ConfigError(f"{name} is a setting of --mode {', '.join(modes)}; --mode {mode} does "
                          f"not use it: drop it, or run one of those modes")
