"""`downpour bench core`: the NumPy core against PyTorch on the CPU, in one process.

Times, with the same BLAS thread count on both sides (default 1):

  step   one training step (forward, backward, update) with PyTorch running the
         same model with the same optimizer, its fastest CPU form (fused=True):
         "mlp"   784-1024-1024-10 (ReLU, softmax cross-entropy, float32) at each
                 batch size, with SGD and with Adam
         "cnn"   conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,
                 relu on 1x28x28 images, Adam, batch 64
         "lstm"  lstm:128 over 28 steps of 28 features, Adam, batch 64
  adam   one Adam update of N float32 elements (default 16M) against fused Adam
  copy   one np.copyto of N float32 elements: the memory bandwidth the update is
         bound by, to express the update as a fraction of the machine's limit

The two libraries are timed in alternating rounds, so a change in machine load
hits both; each figure is the median over all rounds. Ratios are NumPy / PyTorch
(below 1 means NumPy is faster).
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from downpour.bench.timing import interleaved
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.optim import make_optimizer

SPEC = ModelSpec(n_inputs=784, n_outputs=10, hidden=(1024, 1024), activation="relu",
                 loss="softmax_ce")
SPECS = {  # model name -> (its spec, batch size of its row)
    "cnn": ModelSpec(n_inputs=784, n_outputs=10, input_shape=(1, 28, 28),
                     layers="conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu"),
    "lstm": ModelSpec(n_inputs=784, n_outputs=10, input_shape=(28, 28), layers="lstm:128"),
}
LAYER_BATCH = 64
OPTIMIZERS = ("sgd", "adam")


def _numpy_step(batch: int, optimizer: str, rng: np.random.Generator,
                spec: ModelSpec = SPEC) -> Callable[[], None]:
    model = Model(spec, seed=0)
    opt = make_optimizer(optimizer)
    x = rng.standard_normal((batch, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        model.loss_and_grad(x, y)
        opt.step(model.params, model.grads, 1e-3)
    return step


def _torch_model(torch, name: str):
    """The PyTorch twin of model `name`; (module, the input shape of one sample)."""
    nn = torch.nn
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128),
                             nn.ReLU(), nn.Linear(128, 10)), (1, 28, 28)
    if name == "lstm":
        class LastStep(nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm, self.out = nn.LSTM(28, 128, batch_first=True), nn.Linear(128, 10)

            def forward(self, x):                             # (B, T, F) -> (B, 10)
                return self.out(self.lstm(x)[0][:, -1])
        return LastStep(), (28, 28)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10)), (784,)


def _torch_step(torch, batch: int, optimizer: str, rng: np.random.Generator,
                name: str = "mlp") -> Callable[[], None]:
    nn = torch.nn
    model, shape = _torch_model(torch, name)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = cls(model.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(rng.standard_normal((batch, *shape), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def run(batch_sizes: list[int], repeats: int, adam_size: int, threads: int,
        use_torch: bool = True) -> dict:
    """All measurements as a JSON-able dict."""
    torch = None
    if use_torch:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
    rng = np.random.default_rng(0)
    result: dict = {"threads": threads, "torch": getattr(torch, "__version__", None),
                    "numpy": np.__version__, "step": [], "adam": {}, "copy": {}}
    for optimizer in OPTIMIZERS:
        for batch in batch_sizes:
            fns = {"numpy": _numpy_step(batch, optimizer, rng)}
            if torch is not None:
                fns["torch"] = _torch_step(torch, batch, optimizer, rng)
            t = interleaved(fns, repeats)
            result["step"].append(_row(t, model="mlp", batch=batch, optimizer=optimizer))
    for name, spec in SPECS.items():
        fns = {"numpy": _numpy_step(LAYER_BATCH, "adam", rng, spec)}
        if torch is not None:
            fns["torch"] = _torch_step(torch, LAYER_BATCH, "adam", rng, name)
        t = interleaved(fns, repeats)
        result["step"].append(_row(t, model=name, batch=LAYER_BATCH, optimizer="adam"))

    p = rng.standard_normal(adam_size, dtype=np.float32)
    g = rng.standard_normal(adam_size, dtype=np.float32) * np.float32(1e-2)
    opt = make_optimizer("adam")
    fns = {"numpy": lambda: opt.step(p, g, 1e-3)}
    if torch is not None:
        tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
        tp.grad = torch.from_numpy(g.copy())
        fns["torch"] = torch.optim.Adam([tp], lr=1e-3, fused=True).step
    t = interleaved(fns, max(10, repeats // 3))
    result["adam"] = _row(t, elements=adam_size)
    # Adam reads p, g, m, v and writes p, m, v: 7 arrays of N float32 at the least.
    result["adam"]["numpy_gb_s"] = 7 * 4 * adam_size / t["numpy"] / 1e9
    dst = np.empty_like(p)
    copy_s = interleaved({"copy": lambda: np.copyto(dst, p)}, 10)["copy"]
    result["copy"] = {"ms": 1e3 * copy_s, "gb_s": 2 * 4 * adam_size / copy_s / 1e9}
    return result


def _row(t: dict[str, float], **key) -> dict:
    row = {**key, "numpy_ms": 1e3 * t["numpy"]}
    if "torch" in t:
        row["torch_ms"] = 1e3 * t["torch"]
        row["ratio"] = t["numpy"] / t["torch"]
    return row


NO_TORCH = 'not installed (for the reference: pip install -e ".[bench]")'


def table(r: dict) -> str:
    lines = [f"downpour bench core: {r['threads']} BLAS thread(s), numpy {r['numpy']}, "
             f"torch {r['torch'] or NO_TORCH}",
             "step: forward, backward and update (softmax cross-entropy, float32) of the MLP "
             "784-1024-1024-10 (ReLU),",
             f"the CNN {','.join(SPECS['cnn'].layers)} on 1x28x28, "
             f"and lstm:128 over 28 steps of 28",
             "", f"{'case':<34}{'numpy ms':>10}{'torch ms':>10}{'ratio':>8}"]

    def fmt(name, row):
        torch_ms = f"{row['torch_ms']:10.2f}" if "torch_ms" in row else f"{'-':>10}"
        ratio = f"{row['ratio']:8.2f}" if "ratio" in row else f"{'-':>8}"
        return f"{name:<34}{row['numpy_ms']:10.2f}{torch_ms}{ratio}"
    for row in r["step"]:
        lines.append(fmt(f"step {row['model']} {row['optimizer']}, batch {row['batch']}", row))
    a = r["adam"]
    lines.append(fmt(f"adam update, {a['elements'] / 2**20:g}M float32", a))
    lines += ["", f"adam moves {a['numpy_gb_s']:.1f} GB/s; np.copyto moves {r['copy']['gb_s']:.1f} GB/s "
              f"(the update is {a['numpy_gb_s'] / r['copy']['gb_s']:.0%} of copy bandwidth)",
              "ratio = numpy / torch; below 1 means numpy is faster"]
    return "\n".join(lines)


def main(args) -> int:
    from downpour.common.config import ConfigError, parse_list
    batches = parse_list(args.batch_sizes, "batch-sizes")
    if args.repeats < 1 or args.adam_size < 1:
        raise ConfigError("--repeats and --adam-size must be positive")
    r = run(batches, args.repeats, args.adam_size, args.threads, use_torch=not args.no_torch)
    print(json.dumps(r) if args.json else table(r))
    return 0
