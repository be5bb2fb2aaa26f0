"""Wire codecs: a piece's float32 vector compressed for the wire, and strict checks of what arrives.

`parse` turns a setting ("none", "fp16", "topk:0.01", "onebit") into a Codec. A codec
encodes a contiguous 1-D float32 vector x (n,) into `fields` (a small map for the
message header) and `frames` (raw little-endian buffers), and decodes them back:

    codec    fields                     frames                                 decodes to
    none     codec                      x                       4n B  <f4     x
    fp16     codec                      x as float16            2n B  <f2     float32(float16(clip(x)))
    topk:R   codec, k                   indices                 4k B  <u4     x at the indices,
                                        x at the indices        4k B  <f4     0 elsewhere
    onebit   codec                      sign bits         ceil(n/8) B  u1     +scale where x >= 0,
                                        scale                    4 B  <f4     -scale elsewhere

  fp16    x is clipped to +-F16_MAX (65504) first, so a large value arrives as the largest
          float16, never as inf; then rounded to nearest even, as numpy's astype(float16).
  topk    the k = max(1, round(R * n)) entries of largest |x| (all nonzero ones when x has
          fewer: zeros are never sent), indices strictly increasing; the threshold is
          estimated from a sample, which costs a second pass now and then (_TopK).
  onebit  bit i of byte b is element 8b + i (np.packbits, bitorder little), 1 where x >= 0;
          the padding bits after element n - 1 are 0. scale = mean |x| = ||x||_1 / n, one per
          piece (BytePS's onebit).

Error feedback: `encode(x, residual)` also writes residual[:] = x - decode(encode(x)),
computed from what encode has at hand (topk: x with the sent entries zeroed). A sender
that adds the residual to its next vector (x = g + residual) sends, over T steps, the
sum of its g minus the last residual: nothing is lost, only delayed.

Guarantees:
- decode checks everything before it writes: the codec name, frame count and byte
  lengths, k in [0, n], indices strictly increasing and < n, every value and scale
  finite, a scale >= 0, padding bits 0. Anything wrong raises ProtocolError with code
  E_PAYLOAD, and `out` is unchanged. What decode returns is n finite float32.
- decode reads only its own fields (codec, and topk's k): a whole header holding
  them may be passed as `fields`.
- encode refuses an x that holds nan or inf (ProtocolError E_PAYLOAD): a receiver would.
- encode's frames are new buffers the caller owns, except none's, which is x itself
  (zero-copy: leave x unchanged until ZeroMQ has sent it; a copy if residual is x).
- A caller's mistake (x, residual or out not a contiguous 1-D float32 array of the
  right size, a negative n) is a ValueError, not a ProtocolError.
- A Codec keeps scratch arrays (grown to the largest n it has seen) and topk's random
  generator: use one per thread. Frames are not cut at protocol.MAX_FRAME: send pieces.

Cost: each codec is a few whole-array NumPy passes, bound by memory bandwidth on one
core (`downpour bench codecs` measures them against np.copyto). fp16 converts with
integer and float passes (_to_half, _from_half), not astype, whose cast is a scalar loop.
"""

from __future__ import annotations

import difflib
import math
import threading

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.wire import protocol

CODECS = ("none", "fp16", "topk:R", "onebit")     # the spellings, for help texts
HELP = "none, fp16, topk:R (0 < R <= 1, e.g. topk:0.01) or onebit"
F16_MAX = np.float32(65504)      # the largest finite float16; fp16 clips to +-F16_MAX
HALF_BLOCK = 1 << 17             # fp16: elements converted at a time (1 MB of scratch)
SAMPLE = 1 << 14                 # topk: positions sampled to estimate the threshold
SAMPLE_SIGMAS = 3.0              # topk: the threshold sits this many sampling sds low

F32, U32, U16 = np.float32, np.uint32, np.uint16    # on the wire: little-endian ("<f4", ...)


def parse(text: str, seed: int = 0) -> Codec:
    """The Codec a setting names: 'none', 'fp16', 'topk:R' (0 < R <= 1) or 'onebit'.

    Case and spaces do not matter; Codec.text is the normalised spelling ('topk:0.01').
    `seed` seeds topk's sampling (the same seed, the same choices). ConfigError says
    what was wrong and what to write instead."""
    if not isinstance(text, str):
        raise ConfigError(f"a codec is a name, got {type(text).__name__} {text!r}; write one of {HELP}")
    name, sep, arg = (part.strip() for part in text.strip().lower().partition(":"))
    if name == "topk":
        if not arg:
            raise ConfigError(f"codec {text!r}: topk sends the largest R fraction of the entries; "
                              "give a fraction, e.g. topk:0.01")
        try:
            ratio = float(arg)
        except ValueError:
            raise ConfigError(f"codec {text!r}: {arg!r} is not a number; R must be in (0, 1], "
                              "e.g. topk:0.01") from None
        if not 0 < ratio <= 1:
            raise ConfigError(f"codec {text!r}: R must be in (0, 1] (the fraction of entries "
                              f"sent), got {arg}; e.g. topk:0.01")
        return _TopK(f"topk:{ratio!r}", ratio, seed)
    kind = _FIXED.get(name)
    if kind is None:
        close = difflib.get_close_matches(name, [*_FIXED, "topk"], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown codec {text!r}; {hint}write one of {HELP}")
    if sep:
        raise ConfigError(f"codec {text!r}: {name} takes no parameter; write {name}")
    return kind(name)


class Codec:
    """One codec: `encode` a vector into (fields, frames), `decode` them back (module docstring).

    name   'none', 'fp16', 'topk' or 'onebit': the `codec` field on the wire
    text   the setting, normalised ('topk:0.01')
    lossy  False only for none
    """

    name = ""
    lossy = True
    _fields: tuple[str, ...] = ()            # the fields besides codec

    def __init__(self, text: str):
        self.text = text
        self._scratch: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"parse({self.text!r})"

    def encode(self, x: np.ndarray, residual: np.ndarray | None = None) -> tuple[dict, list]:
        """(fields, frames) of x (n,), contiguous float32; frames are byte memoryviews.

        With `residual` (n,) float32: error feedback, residual[:] = x - decode(encode(x));
        residual may be x itself. ProtocolError (E_PAYLOAD) if x holds nan or inf."""
        _check_array(x, "x")
        if residual is not None:
            _check_array(residual, "residual", x.size, writable=True)
        if not _finite(x):
            raise protocol.error(protocol.E_PAYLOAD, f"x holds nan or inf: the {self.name} codec "
                                 "sends finite vectors only (a receiver would refuse it)")
        fields, frames = self._encode(x, residual)
        return {"codec": self.name, **fields}, [memoryview(f).cast("B") for f in frames]

    def decode(self, fields: dict, frames: list, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The n float32 that (fields, frames) encode, written into `out` if given.

        ProtocolError (E_PAYLOAD) for anything wrong, and then `out` is unchanged."""
        n = _check_n(n)
        if out is not None:
            _check_array(out, "out", n, writable=True)
        parts = self._read(fields, frames, n)
        out = np.empty(n, F32) if out is None else out
        self._write(parts, out)
        return out

    def decode_sparse(self, fields: dict, frames: list, n: int) -> tuple[np.ndarray, np.ndarray]:
        """topk only: (indices <u4, values <f4), checked as decode; see _TopK.decode_sparse."""
        raise TypeError(f"decode_sparse is for topk; a {self.name} payload is dense: use decode")

    # -- what each codec defines --------------------------------------------------------------
    def _encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[dict, list]:
        raise NotImplementedError

    def _read(self, fields: dict, frames: list, n: int) -> tuple:
        """The checked parts of a payload (views of its frames); raises before anything is written."""
        raise NotImplementedError

    def _write(self, parts: tuple, out: np.ndarray) -> None:
        raise NotImplementedError

    # -- shared steps ---------------------------------------------------------------------------
    def _check_fields(self, fields: dict) -> None:
        if not isinstance(fields, dict):
            raise _bad(f"codec fields are a {type(fields).__name__}, expected a map")
        name = fields.get("codec")
        if not isinstance(name, str) or name != self.name:
            raise _bad(f"payload codec {name!r}, expected {self.name!r}")
        for key in self._fields:
            value = fields.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad(f"{self.name} field {key!r} is {value!r}, expected an int")

    def _buf(self, name: str, n: int, dtype) -> np.ndarray:
        """Scratch array `name` of n `dtype` items, not zeroed; kept at the largest n asked."""
        buf = self._scratch.get(name)
        if buf is None or buf.size < n:
            buf = self._scratch[name] = np.empty(n, dtype)
        return buf[:n]


class _Plain(Codec):
    """none: x itself."""

    name = "none"
    lossy = False

    def _encode(self, x, residual):
        frame = x
        if residual is not None:
            if np.may_share_memory(x, residual):
                frame = x.copy()                  # x is about to become the (zero) residual
            residual.fill(0)
        return {}, [frame]

    def _read(self, fields, frames, n):
        self._check_fields(fields)
        (values,) = _views(frames, [("values", "<f4", n)])
        if not _finite(values):
            raise _bad("values hold nan or inf")
        return (values,)

    def _write(self, parts, out):
        np.copyto(out, parts[0])


class _Half(Codec):
    """fp16: x as IEEE float16 (clipped to +-F16_MAX), decoded exactly back to float32.

    Converted HALF_BLOCK elements at a time, so the scratch of the conversion's passes
    stays in the core's cache (and is that small)."""

    name = "fp16"

    def _encode(self, x, residual):
        half = np.empty(x.size, "<u2")            # float16 bits: the frame, new per call
        for s, a, b in self._blocks(x.size):
            _to_half(x[s], half[s], a, b)
            if residual is not None:
                np.bitwise_and(half[s], U16(0x7FFF), out=b)
                _from_half(half[s], b, a)         # a = what the receiver gets
                np.subtract(x[s], a, out=residual[s])
        return {}, [half]

    def _read(self, fields, frames, n):
        self._check_fields(fields)
        (half,) = _views(frames, [("float16 values", "<u2", n)])
        for s, _, b in self._blocks(n):
            if np.bitwise_and(half[s], U16(0x7FFF), out=b).max() >= 0x7C00:   # exponent all ones
                raise _bad("float16 values hold nan or inf")
        return (half,)

    def _write(self, parts, out):
        (half,) = parts
        for s, _, b in self._blocks(out.size):
            _from_half(half[s], np.bitwise_and(half[s], U16(0x7FFF), out=b), out[s])

    def _blocks(self, n: int):
        """(slice, float32 scratch, uint32 scratch) for each block of range(n)."""
        a, b = self._buf("a", min(n, HALF_BLOCK), F32), self._buf("b", min(n, HALF_BLOCK), U32)
        for lo in range(0, n, HALF_BLOCK):
            m = min(n - lo, HALF_BLOCK)
            yield slice(lo, lo + m), a[:m], b[:m]


class _TopK(Codec):
    """topk:R: the k = max(1, round(R n)) entries of largest |x|, as (indices, values).

    The threshold is sampled, not sorted (a full argpartition costs about ten passes):
    m = SAMPLE positions are drawn with replacement from the codec's generator, and the
    threshold t is the j-th largest |x| among them, j = ceil(mR' + z sqrt(mR')) with
    R' = k/n and z = SAMPLE_SIGMAS: t sits z sampling sds below the (1 - R') quantile,
    so about k (1 + z / sqrt(mR')) entries have |x| >= t. One pass selects them, sorted
    by construction, and the k largest of those are kept (ties at the cut go to the
    lowest indices). If fewer than k have |x| >= t (the sample put t above the k-th
    largest |x|: the chance that a binomial(m, R') reaches j, 0.2% at R = 0.01, 0.3% at
    0.001, 1% at 1e-5), the pass is redone with the 2j-th largest sampled |x|, and if
    that fails too, with every nonzero |x|. For n <= SAMPLE all of |x| is the sample and
    j = k: exact in one pass. So, always: exactly min(k, the nonzero entries of x) are
    sent (zeros never are), and every sent |x| >= every unsent |x|.
    """

    name = "topk"
    _fields = ("k",)

    def __init__(self, text: str, ratio: float, seed: int):
        super().__init__(text)
        self.ratio = ratio
        self._rng = np.random.default_rng(seed)

    def count(self, n: int) -> int:
        """k, the entries targeted for a vector of n."""
        return min(n, max(1, round(self.ratio * n)))

    def _encode(self, x, residual):
        if x.size >= 1 << 32:
            raise ValueError(f"topk indices are uint32: a vector of {x.size} elements is too long; "
                             "encode it in pieces")
        chosen = self._select(x, self.count(x.size))
        indices, values = chosen.astype("<u4"), x[chosen]       # (k,) each, new per call
        if residual is not None:
            if residual is not x:
                np.copyto(residual, x)
            residual[chosen] = 0
        return {"k": int(chosen.size)}, [indices, values]

    def _select(self, x: np.ndarray, k: int) -> np.ndarray:
        """The sorted int64 positions of the k largest |x| (of all nonzero |x| if fewer)."""
        n = x.size
        if k == n:
            return np.flatnonzero(x)                    # every entry but the zeros
        a = np.abs(x, out=self._buf("abs", n, F32))
        mask = self._buf("mask", n, np.bool_)
        for threshold in self._thresholds(a, k):
            if threshold > 0:
                chosen = np.flatnonzero(np.greater_equal(a, threshold, out=mask))
            else:
                chosen = np.flatnonzero(np.greater(a, 0, out=mask))     # zeros are not worth sending
            if chosen.size >= k or threshold <= 0:
                break
        return _largest(chosen, a[chosen], k) if chosen.size > k else chosen

    def _thresholds(self, a: np.ndarray, k: int):
        """Thresholds on |x| to try in turn (see the class): the j-th largest |x| of a sample,
        the 2j-th, then 0."""
        n = a.size
        if n <= SAMPLE:                                   # the sample is all of |x|: exact
            sample, j = self._buf("sample", n, F32), k
            np.copyto(sample, a)
        else:
            sample = np.take(a, self._rng.integers(0, n, SAMPLE), out=self._buf("sample", SAMPLE, F32))
            expected = SAMPLE * k / n                     # sample points above the k-th largest |x|
            j = min(SAMPLE, max(1, math.ceil(expected + SAMPLE_SIGMAS * math.sqrt(expected))))
        for rank in (j, min(sample.size, 2 * j)):
            cut = sample.size - rank
            sample.partition(cut)
            yield sample[cut]
        yield F32(0)

    def _read(self, fields, frames, n):
        self._check_fields(fields)
        k = fields["k"]
        if not 0 <= k <= n:
            raise _bad(f"topk k={k} for a piece of {n} elements; k must be in [0, n]")
        indices, values = _views(frames, [("indices", "<u4", k), ("values", "<f4", k)])
        if k and not (indices[-1] < n and np.all(indices[1:] > indices[:-1])):
            raise _bad(f"topk indices must be strictly increasing and below n={n}")
        if not _finite(values):
            raise _bad("topk values hold nan or inf")
        return indices, values

    def _write(self, parts, out):
        indices, values = parts
        out.fill(0)
        out[indices] = values

    def decode_sparse(self, fields: dict, frames: list, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices <u4 sorted and unique, values <f4), checked as decode does: apply a sparse
        delta with out[indices] += values. Read-only views of the frames: valid while they are."""
        return self._read(fields, frames, _check_n(n))


class _OneBit(Codec):
    """onebit: the signs of x, one bit each, and one scale, mean |x|."""

    name = "onebit"

    def _encode(self, x, residual):
        n = x.size
        positive = np.greater_equal(x, 0, out=self._buf("mask", n, np.bool_))
        bits = np.packbits(positive, bitorder="little")       # (ceil(n/8),) new; padding 0
        a = np.abs(x, out=self._buf("a", n, F32))
        with np.errstate(over="ignore"):
            total = a.sum()
        if not math.isfinite(total):              # float32 overflow of a sum of finite values
            total = a.sum(dtype=np.float64)
        scale = np.float32(total / n) if n else np.float32(0)
        if residual is not None:                  # x - (+-scale), each in one rounding
            np.multiply(positive, scale, out=a)                # 0 or scale
            np.subtract(x, a, out=residual)
            np.subtract(a, scale, out=a)                       # -scale or 0
            np.subtract(residual, a, out=residual)
        return {}, [bits, np.array([scale], "<f4")]

    def _read(self, fields, frames, n):
        self._check_fields(fields)
        bits, scale = _views(frames, [("sign bits", "u1", -(-n // 8)), ("scale", "<f4", 1)])
        scale = scale[0]
        if not (math.isfinite(scale) and scale >= 0):
            raise _bad(f"onebit scale {scale!r}; it must be finite and >= 0")
        if n % 8 and bits[-1] >> (n % 8):
            raise _bad(f"onebit padding bits after element {n - 1} must be 0")
        return bits, scale

    def _write(self, parts, out):
        bits, scale = parts
        signs = np.unpackbits(bits, count=out.size, bitorder="little")    # (n,) 0 or 1
        np.multiply(signs, np.float32(2), out=out)
        np.subtract(out, np.float32(1), out=out)                        # -1 or 1
        np.multiply(out, scale, out=out)


_FIXED = {"none": _Plain, "fp16": _Half, "onebit": _OneBit}


# -- for a receiver that knows the codec from the header ----------------------------------------

def dense(header: dict, frames: list, out: np.ndarray) -> np.ndarray:
    """Decode the payload of a message whose header holds the codec fields into `out` (n,).

    The header's n must be out's size. ProtocolError (E_PAYLOAD) for anything wrong,
    an unknown codec included; `out` is then unchanged."""
    return _decoder(header, out).decode(header, frames, out.size, out)


def apply(header: dict, frames: list, out: np.ndarray) -> np.ndarray:
    """A pull reply's payload onto `out`, the receiver's copy of the piece: a topk payload
    is a delta, added (out[indices] += values); any other codec sends the whole piece,
    decoded into out. Checked as `dense`."""
    decoder = _decoder(header, out)
    if decoder.name != "topk":
        return decoder.decode(header, frames, out.size, out)
    indices, values = decoder.decode_sparse(header, frames, out.size)
    out[indices] += values
    return out


_local = threading.local()      # per thread: one decoder per codec name (their scratch)


def _decoder(header: dict, out: np.ndarray) -> Codec:
    _check_array(out, "out", writable=True)
    if not isinstance(header, dict):
        raise _bad(f"a header is a map, got {type(header).__name__}")
    name = header.get("codec")
    if header.get("n") != out.size:
        raise _bad(f"payload has n={header.get('n')!r} elements, expected {out.size}")
    if name not in (*_FIXED, "topk"):
        raise _bad(f"unknown payload codec {name!r}; this node decodes {', '.join([*_FIXED, 'topk'])}")
    decoders = getattr(_local, "decoders", None)
    if decoders is None:
        decoders = _local.decoders = {}
    if name not in decoders:
        decoders[name] = _TopK("topk", 1.0, 0) if name == "topk" else _FIXED[name](name)
    return decoders[name]


# -- checks -------------------------------------------------------------------------------------

def _bad(msg: str):
    return protocol.error(protocol.E_PAYLOAD, msg)


def _check_array(a, what: str, n: int | None = None, writable: bool = False) -> None:
    """ValueError unless `a` is a C-contiguous 1-D float32 array (of n, writable if asked)."""
    if not (isinstance(a, np.ndarray) and a.dtype == np.dtype("<f4") and a.ndim == 1
            and a.flags.c_contiguous):
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{what} must be a C-contiguous 1-D float32 array, got {desc}")
    if n is not None and a.size != n:
        raise ValueError(f"{what} has {a.size} elements, expected {n}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{what} is read-only; give a writable array")


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(n)


def _finite(v: np.ndarray) -> bool:
    """All of float32 `v` finite: min and max propagate nan (two read-only passes)."""
    return v.size == 0 or (math.isfinite(v.min()) and math.isfinite(v.max()))


def _views(frames, parts: list[tuple[str, str, int]]) -> list[np.ndarray]:
    """Read-only arrays over `frames`, one per (what, dtype, count) of `parts`, each frame
    checked to be exactly count items long; E_PAYLOAD otherwise."""
    if not isinstance(frames, (list, tuple)) or len(frames) != len(parts):
        got = f"{len(frames)} frames" if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise _bad(f"{got}, expected {len(parts)}: " + ", ".join(what for what, _, _ in parts))
    views = []
    for frame, (what, dtype, count) in zip(frames, parts):
        try:
            buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        except TypeError:
            raise _bad(f"the {what} frame is a {type(frame).__name__}, not a buffer") from None
        want = count * np.dtype(dtype).itemsize
        if not isinstance(buf, memoryview) or not buf.c_contiguous or buf.nbytes != want:
            got = buf.nbytes if isinstance(buf, memoryview) else "?"
            raise _bad(f"the {what} frame has {got} bytes, expected {want} ({count} {np.dtype(dtype)})")
        views.append(np.frombuffer(buf, dtype))
    return views


def _largest(chosen: np.ndarray, a: np.ndarray, k: int) -> np.ndarray:
    """The k entries of sorted `chosen` whose `a` (their |x|) are largest, still sorted; ties
    at the cut go to the lowest positions."""
    cut = np.partition(a, a.size - k)[a.size - k]          # the k-th largest
    keep = a > cut
    short = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(a == cut)[:short]] = True
    return chosen[keep]


# -- float16 without astype ---------------------------------------------------------------------

def _to_half(x: np.ndarray, half: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """half (n,) <u2 = the float16 bits of clip(x, +-F16_MAX), rounded to nearest even: what
    x.astype(float16) gives, in 14 passes over the arrays. a (n,) float32, b (n,) uint32: scratch.

    Maratyszcza's fp16_ieee_from_fp32_value (github.com/Maratyszcza/FP16), vectorized:
    with e the exponent of |x|, bias = 2^(max(e, -14) + 15), and the float32 sum
    bias + 4|x| keeps 10 bits of |x| after its leading one (the FPU rounds, to nearest
    even), or, below float16's normal range, |x| in steps of 2^-24. The sum's low 12
    bits are then the implicit one and the mantissa, bits 23..27 the float16 exponent
    less one and bit 28 zero: (bits >> 13) + (bits & 0xFFF), modulo 2^16, is the float16
    without its sign."""
    ua = a.view(U32)
    np.clip(x, -F16_MAX, F16_MAX, out=a)
    np.abs(a, out=a)
    np.bitwise_and(ua, U32(0x7F800000), out=b)               # e + 127, in place
    np.clip(b, U32(113 << 23), U32(142 << 23), out=b)        # max(e, -14); |x| <= F16_MAX
    np.add(b, U32(15 << 23), out=b)                          # bias
    np.multiply(a, np.float32(4), out=a)
    np.add(b.view(F32), a, out=a)                            # bias + 4|x|, rounded
    np.right_shift(ua, U32(13), out=b)
    np.bitwise_and(ua, U32(0xFFF), out=ua)
    np.add(b, ua, out=b)                                     # exponent and mantissa (low 16 bits)
    np.right_shift(x.view(U32), U32(16), out=ua)
    np.bitwise_and(ua, U32(0x8000), out=ua)                  # the sign
    np.bitwise_or(b, ua, out=b)
    np.copyto(half, b, casting="unsafe")                     # modulo 2^16


def _from_half(half: np.ndarray, magnitude: np.ndarray, out: np.ndarray) -> None:
    """out (n,) float32 = the float16 values whose bits are `half` (n,) <u2, all finite;
    `magnitude` (n,) uint32 holds half & 0x7FFF and is used as scratch. Exact: the
    exponent and mantissa shifted into float32's place, times 2^112 to rebias (float16's
    subnormals become float32 subnormals; numpy never flushes them to zero)."""
    np.left_shift(magnitude, U32(13), out=magnitude)
    np.multiply(magnitude.view(F32), np.float32(2.0 ** 112), out=out)
    np.bitwise_and(half, U16(0x8000), out=magnitude)
    np.left_shift(magnitude, U32(16), out=magnitude)
    bits = out.view(U32)
    np.bitwise_or(bits, magnitude, out=bits)
