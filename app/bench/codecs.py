"""`downpour bench codecs`: each wire codec's encode and decode of one vector, against np.copyto.

For N float32 (default: the parameters of the MLP 784-1024-1024-10, standard normal
values standing in for a gradient), each codec of CODECS (common/wire/codec.py):

  encode   ms for codec.encode(x)
  ef       ms for codec.encode(x, residual): encode with error feedback
  decode   ms for codec.decode into a preallocated vector (the frames of one encode)
  MB/s     the raw float32 bytes (4N) over encode + decode
  ratio    raw bytes / the frames' bytes (the header's few fields not counted)

and a reference row, copy: np.copyto of the same 4N bytes as its encode and as its decode.
Every codec is a few whole-array NumPy passes, so the figures are bound by memory
bandwidth and one core (NumPy's elementwise work runs on one thread); copy is that bound
measured in the same process. All contenders are timed in alternating rounds
(bench.timing.interleaved), so load on a shared machine hits all of them; a figure is
a median.
"""

from __future__ import annotations

import json

import numpy as np

from downpour.bench.timing import interleaved
from downpour.common.errors import ConfigError
from downpour.common.nn.model import ModelSpec, model_layout
from downpour.common.wire import codec

CODECS = ("none", "fp16", "topk:0.01", "topk:0.001", "onebit")
MLP = ModelSpec(n_inputs=784, n_outputs=10, hidden=(1024, 1024))    # its vector: the default N


def default_n() -> int:
    """The parameter count of the MLP 784-1024-1024-10."""
    return model_layout(MLP).size


def run(n: int, repeats: int) -> dict:
    """Every row as a JSON-able dict: {"n", "rows": [{codec, encode_ms, ef_ms, decode_ms, mb_s,
    ratio, sent_bytes}, ...]}, copy first."""
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    out, residual = np.empty_like(x), np.empty_like(x)
    fns = {"copy": lambda: np.copyto(out, x)}
    sent = {"copy": x.nbytes}
    for text in CODECS:
        c = codec.parse(text)
        fields, frames = c.encode(x)
        sent[text] = sum(f.nbytes for f in frames)
        fns[f"{text} encode"] = lambda c=c: c.encode(x)
        fns[f"{text} ef"] = lambda c=c: c.encode(x, residual)
        fns[f"{text} decode"] = lambda c=c, f=fields, fr=frames: c.decode(f, fr, n, out)
    t = interleaved(fns, repeats)
    rows = [_row("copy", t["copy"], None, t["copy"], x.nbytes, sent["copy"])]
    rows += [_row(text, t[f"{text} encode"], t[f"{text} ef"], t[f"{text} decode"], x.nbytes, sent[text])
             for text in CODECS]
    return {"n": n, "rows": rows}


def _row(name: str, encode_s: float, ef_s: float | None, decode_s: float, raw: int, sent: int) -> dict:
    return {"codec": name, "encode_ms": 1e3 * encode_s, "ef_ms": None if ef_s is None else 1e3 * ef_s,
            "decode_ms": 1e3 * decode_s, "mb_s": raw / (encode_s + decode_s) / 1e6,
            "ratio": raw / sent if sent else float("inf"), "sent_bytes": sent}


def table(r: dict) -> str:
    lines = [f"downpour bench codecs: encode and decode of {r['n']:,} float32 ({4 * r['n'] / 1e6:.1f} MB), "
             "one core, against np.copyto", "",
             f"{'codec':<12}{'encode ms':>11}{'ef ms':>8}{'decode ms':>11}{'MB/s':>9}{'ratio':>9}"]
    for row in r["rows"]:
        ef = f"{row['ef_ms']:8.2f}" if row["ef_ms"] is not None else f"{'-':>8}"
        lines.append(f"{row['codec']:<12}{row['encode_ms']:11.2f}{ef}{row['decode_ms']:11.2f}"
                     f"{row['mb_s']:9.0f}{row['ratio']:9.1f}")
    lines += ["", "ef: encode with error feedback (the residual written too); MB/s: raw float32 bytes "
              "over encode + decode;", "ratio: raw bytes / frame bytes sent; copy: one np.copyto of "
              "the raw bytes as encode and as decode (the memory-bandwidth bound)"]
    return "\n".join(lines)


def main(args) -> int:
    n = default_n() if args.n is None else args.n
    if n < 1 or args.repeats < 1:
        raise ConfigError(f"--n and --repeats must be positive, got {n} and {args.repeats}")
    r = run(n, args.repeats)
    print(json.dumps(r) if args.json else table(r))
    return 0
