"""Wire codecs (common/wire/codec.py): parse, each codec against a reference, error feedback,
every malformed payload refused before anything is written, and hypothesis fuzzing of decode.

References: none is x itself; fp16 is numpy's own cast (x clipped, then astype(float16)); topk
is checked against the definition (every sent |x| >= every unsent |x|, exactly min(k, the
nonzero entries) sent, the values unchanged); onebit against np.where(x >= 0, s, -s) with s
the mean |x| computed in float64.
"""

import math
import re

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from downpour.common.errors import ConfigError, ProtocolError
from downpour.common.wire import codec, protocol

TEXTS = ("none", "fp16", "topk:0.01", "topk:0.3", "onebit")
LOSSY = TEXTS[1:]
SENTINEL = np.float32(7.0)          # what `out` holds before a decode that must not write
EPS = float(np.finfo(np.float32).eps)
BIG = float(np.float32(1e30))       # fuzzed vectors stay within +-BIG: onebit's residual x - scale is finite


def gradient(n: int, seed: int = 0) -> np.ndarray:
    """n float32 spread over several decades, like a gradient: normal times exponential."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * rng.exponential(1.0, n)).astype(np.float32)


def reference_half(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.clip(x, -65504, 65504).astype(np.float16)


def refused(c: codec.Codec, fields, frames, n: int) -> str:
    """decode's message for a payload it must refuse, after checking the code and that `out`
    kept every byte."""
    out = np.full(n, SENTINEL)
    with pytest.raises(ProtocolError) as info:
        c.decode(fields, frames, n, out)
    assert info.value.code == protocol.E_PAYLOAD
    assert np.all(out == SENTINEL)
    return str(info.value)


def check_feedback(x: np.ndarray, decoded: np.ndarray, residual: np.ndarray) -> None:
    """decoded + residual == x, but for the one float32 rounding of residual = x - decoded."""
    x64, d64 = x.astype(np.float64), decoded.astype(np.float64)
    bound = EPS * np.maximum(np.abs(x64), np.abs(d64))
    assert np.all(np.abs(d64 + residual - x64) <= bound)


def check_topk(c: codec.Codec, x: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """The definition: strictly increasing indices, values unchanged, exactly min(k, nonzero)
    of them, every sent |x| >= every unsent |x|, no zero sent."""
    assert indices.dtype == np.dtype("<u4") and values.dtype == np.dtype("<f4")
    assert np.all(np.diff(indices.astype(np.int64)) > 0)
    assert np.array_equal(values, x[indices])
    assert indices.size == min(c.count(x.size), np.count_nonzero(x))
    unsent = np.ones(x.size, bool)
    unsent[indices] = False
    if indices.size and unsent.any():
        assert np.abs(values).min() >= np.abs(x[unsent]).max()
    assert np.all(values != 0)


# -- parse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, normal, lossy", [
    ("none", "none", "none", False), ("FP16", "fp16", "fp16", True),
    (" TopK : 0.010 ", "topk", "topk:0.01", True), ("topk:1e-3", "topk", "topk:0.001", True),
    ("topk:1", "topk", "topk:1.0", True), ("onebit", "onebit", "onebit", True)])
def test_parse(text, name, normal, lossy):
    c = codec.parse(text)
    assert (c.name, c.text, c.lossy) == (name, normal, lossy)
    assert codec.parse(c.text).text == c.text


def test_every_spelling_in_codecs_parses():
    names = [codec.parse(t.replace(":R", ":0.5")).name for t in codec.CODECS]
    assert names == ["none", "fp16", "topk", "onebit"]


@pytest.mark.parametrize("text, says", [
    ("topk", "give a fraction, e.g. topk:0.01"), ("topk:", "give a fraction, e.g. topk:0.01"),
    ("topk:2", "R must be in (0, 1]"), ("topk:0", "R must be in (0, 1]"),
    ("topk:-0.1", "R must be in (0, 1]"), ("topk:nan", "R must be in (0, 1]"),
    ("topk:inf", "R must be in (0, 1]"), ("topk:1%", "'1%' is not a number"),
    ("fp16:2", "fp16 takes no parameter; write fp16"), ("onebit:", "onebit takes no parameter"),
    ("top-k", "did you mean topk?"), ("fp32", "write one of none, fp16, topk:R"),
    ("", "unknown codec ''"), (3, "a codec is a name, got int")])
def test_parse_refuses(text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        codec.parse(text)


# -- each codec against its reference ------------------------------------------------------

def test_none_sends_x_itself():
    c, x = codec.parse("none"), gradient(1000)
    fields, frames = c.encode(x)
    assert fields == {"codec": "none"} and len(frames) == 1
    assert np.shares_memory(np.frombuffer(frames[0], np.float32), x)           # zero-copy
    assert c.decode(fields, frames, x.size).tobytes() == x.tobytes()


def test_fp16_is_numpys_cast_after_clipping():
    """Every finite float16, the midpoints between neighbours (ties go to even) and the
    floats either side of them, float32 subnormals, values past float16's range, random bits."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    bits = np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    extremes = np.array([1e-45, 1e-40, 2.0 ** -25, 65519.99, 65520.0, 1e6, 3.4e38], np.float32)
    x = np.concatenate([finite, mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(-np.inf)), extremes, np.negative(extremes),
                        bits.view(np.float32)])
    x = x[np.isfinite(x)]
    c = codec.parse("fp16")
    fields, frames = c.encode(x)
    want = reference_half(x)
    assert fields == {"codec": "fp16"} and frames[0].nbytes == 2 * x.size
    assert np.array_equal(np.frombuffer(frames[0], np.uint16), want.view(np.uint16))
    decoded = c.decode(fields, frames, x.size)
    assert np.array_equal(decoded.view(np.uint32), want.astype(np.float32).view(np.uint32))
    assert np.abs(decoded).max() == 65504                        # clipped, never inf


def test_fp16_decodes_every_finite_float16_exactly():
    halves = np.arange(1 << 16, dtype=np.uint16)
    finite = halves[np.isfinite(halves.view(np.float16))]        # -0.0 and the subnormals too
    decoded = codec.parse("fp16").decode({"codec": "fp16"}, [finite.tobytes()], finite.size)
    assert np.array_equal(decoded.view(np.uint32), finite.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n, ratio", [(1000, 0.01), (5000, 0.3), (16384, 0.05), (16385, 0.05),
                                      (200_000, 0.01), (200_000, 0.001), (1_000_000, 1e-5),
                                      (3000, 1.0)])
def test_topk_sends_the_largest(n, ratio):
    """Small n is exact in one pass; above codec.SAMPLE the threshold is sampled (and redone
    when it lands too high): the count is exact either way, over many draws."""
    c = codec.parse(f"topk:{ratio}", seed=3)
    for seed in range(20 if n <= 200_000 else 3):
        x = gradient(n, seed)
        fields, frames = c.encode(x)
        indices, values = c.decode_sparse(fields, frames, n)
        assert fields == {"codec": "topk", "k": c.count(n)} == {"codec": "topk", "k": indices.size}
        check_topk(c, x, indices, values)
        decoded = c.decode(fields, frames, n)
        assert np.array_equal(decoded[indices], values) and np.count_nonzero(decoded) == indices.size


@pytest.mark.parametrize("sigmas", [-3.0, -1e9], ids=["second-pass", "third-pass"])
def test_topk_threshold_too_high_is_redone(monkeypatch, sigmas):
    """A sample that puts the threshold above the k-th largest |x| (forced here: the threshold
    sits above the quantile, or at the sample's maximum) still sends exactly the k largest."""
    monkeypatch.setattr(codec, "SAMPLE_SIGMAS", sigmas)
    c, x = codec.parse("topk:0.01"), gradient(100_000)
    check_topk(c, x, *c.decode_sparse(*c.encode(x), x.size))


def test_topk_ties_and_zeros():
    c = codec.parse("topk:0.1")
    x = np.zeros(100, np.float32)
    x[[3, 50, 97]] = [1, -2, 1]
    assert np.array_equal(c.decode_sparse(*c.encode(x), 100)[0], [3, 50, 97])     # no zeros sent
    assert np.array_equal(c.decode_sparse(*c.encode(np.ones(100, np.float32)), 100)[0], np.arange(10))
    fields, frames = c.encode(np.zeros(100, np.float32))
    assert fields["k"] == 0 and not c.decode(fields, frames, 100).any()
    # sampled: |x| in {0, 1, 2}, 40% at the top value: the k lowest indices of those
    x = np.random.default_rng(1).integers(-2, 3, 100_000).astype(np.float32)
    indices, values = c.decode_sparse(*c.encode(x), x.size)
    assert np.array_equal(indices, np.flatnonzero(np.abs(x) == 2)[:10_000])
    check_topk(c, x, indices, values)


def test_topk_is_deterministic_for_a_seed():
    x = gradient(100_000)
    a, b = codec.parse("topk:0.01", seed=5), codec.parse("topk:0.01", seed=5)
    for _ in range(3):
        assert [bytes(f) for f in a.encode(x)[1]] == [bytes(f) for f in b.encode(x)[1]]


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_onebit_sends_signs_and_the_mean_magnitude(n):
    x = gradient(n, n)
    x[0] = -0.0                                                  # >= 0: sent as +scale
    c = codec.parse("onebit")
    fields, frames = c.encode(x)
    assert fields == {"codec": "onebit"} and [f.nbytes for f in frames] == [-(-n // 8), 4]
    unpacked = np.unpackbits(np.frombuffer(frames[0], np.uint8), bitorder="little")
    assert np.array_equal(unpacked[:n], x >= 0) and not unpacked[n:].any()     # padding is 0
    scale = np.frombuffer(frames[1], np.float32)[0]
    assert math.isclose(scale, np.abs(x.astype(np.float64)).mean(), rel_tol=1e-6)
    assert np.array_equal(c.decode(fields, frames, n), np.where(x >= 0, scale, -scale))


def test_onebit_scale_of_huge_values_is_finite():
    x = np.full(1000, 3e38, np.float32)                          # float32's sum overflows
    c = codec.parse("onebit")
    fields, frames = c.encode(x)
    assert np.frombuffer(frames[1], np.float32)[0] == np.float32(3e38)
    assert np.all(c.decode(fields, frames, 1000) == np.float32(3e38))


@pytest.mark.parametrize("text", TEXTS)
def test_empty_vector(text):
    c = codec.parse(text)
    residual = np.empty(0, np.float32)
    fields, frames = c.encode(np.empty(0, np.float32), residual)
    assert c.decode(fields, frames, 0).shape == (0,)
    assert fields.get("k", 0) == 0


@pytest.mark.parametrize("text", TEXTS)
def test_frames_of_every_kind_decode(text):
    """bytes, bytearray, zmq.Frame, numpy arrays and memoryviews of any format."""
    c, x = codec.parse(text), gradient(100)
    fields, frames = c.encode(x)
    want = c.decode(fields, frames, 100)
    for kind in (bytes, bytearray, zmq.Frame, lambda f: np.frombuffer(f, np.uint8),
                 lambda f: memoryview(np.frombuffer(f, np.uint8).copy())):
        assert np.array_equal(c.decode(fields, [kind(f) for f in frames], 100), want)


# -- error feedback ------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("alias", [False, True], ids=["residual", "residual-is-x"])
def test_error_feedback_identity(text, alias):
    """decode(encode(x)) + residual == x; the frames are the same with or without a residual,
    also when the residual is x itself (x becomes the residual)."""
    x = gradient(20_000) * np.float32(1e3)
    plain = codec.parse(text, seed=1).encode(x.copy())[1]
    c, p = codec.parse(text, seed=1), x.copy()
    residual = p if alias else np.full_like(x, np.nan)           # every element must be written
    fields, frames = c.encode(p, residual)
    assert [bytes(f) for f in frames] == [bytes(f) for f in plain]
    check_feedback(x, c.decode(fields, frames, x.size), residual)


@pytest.mark.parametrize("text", TEXTS)
def test_error_feedback_loses_nothing(text):
    """Over T steps: what was sent + the last residual == the sum of the inputs."""
    n, steps = 3000, 40
    c, rng = codec.parse(text), np.random.default_rng(2)
    residual = np.zeros(n, np.float32)
    sent, total = np.zeros(n), np.zeros(n)
    for _ in range(steps):
        g = rng.standard_normal(n, dtype=np.float32)
        total += g
        fields, frames = c.encode(g + residual, residual)
        sent += c.decode(fields, frames, n)
    np.testing.assert_allclose(sent + residual, total, rtol=0, atol=steps * 1e-5)
    assert np.abs(residual).max() < np.abs(total).max() or not c.lossy


def test_topk_error_feedback_sends_everything_eventually():
    """One input, then zeros: k entries go per step, each exactly once, until none is left."""
    c, x = codec.parse("topk:0.1"), gradient(1000)
    residual, sent = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    g = x
    for _ in range(10):
        fields, frames = c.encode(g + residual, residual)
        indices, values = c.decode_sparse(fields, frames, 1000)
        assert indices.size == 100 and not sent[indices].any()
        sent[indices] = values
        g = np.zeros_like(x)
    assert not residual.any() and np.array_equal(sent, x)


# -- what encode and decode refuse ----------------------------------------------------------

def _array_bytes(frame, dtype, index, value) -> bytes:
    a = np.frombuffer(frame, dtype).copy()
    a[index] = value
    return a.tobytes()


def _set(fields: dict, **changes) -> dict:
    """`fields` with `changes`; a change to None removes the key."""
    out = {**fields, **changes}
    return {k: v for k, v in out.items() if v is not None}


N = 13                                       # not a multiple of 8: onebit has padding bits


def _malformed():
    """(text, what is wrong, fields, frames) for every rule decode enforces."""
    cases = []
    for text in ("none", "fp16", "topk:0.3", "onebit"):
        fields, frames = codec.parse(text).encode(gradient(N, 4))
        frames = [bytes(f) for f in frames]
        name = fields["codec"]
        other = "onebit" if name != "onebit" else "fp16"
        cases += [(text, "fields not a map", [*fields.items()], frames),
                  (text, "another codec", _set(fields, codec=other), frames),
                  (text, "no codec", _set(fields, codec=None), frames),
                  (text, "codec not a str", _set(fields, codec=1), frames),
                  (text, "no frames", fields, []),
                  (text, "a frame missing", fields, frames[:-1]),
                  (text, "a frame too many", fields, [*frames, b""]),
                  (text, "frames not a list", fields, frames[0]),
                  (text, "frame a byte short", fields, [frames[0][:-1], *frames[1:]]),
                  (text, "frame a byte long", fields, [frames[0] + b"\0", *frames[1:]]),
                  (text, "frame a str", fields, ["x" * len(frames[0]), *frames[1:]]),
                  (text, "frame an int", fields, [len(frames[0]), *frames[1:]]),
                  (text, "frame not contiguous", fields,
                   [memoryview(bytes(2 * len(frames[0])))[::2], *frames[1:]])]
    fields, (values,) = {"codec": "none"}, [bytes(f) for f in codec.parse("none").encode(gradient(N))[1]]
    cases += [("none", f"value {v}", fields, [_array_bytes(values, "<f4", 5, v)])
              for v in (np.nan, np.inf, -np.inf)]
    fields, (half,) = {"codec": "fp16"}, [bytes(f) for f in codec.parse("fp16").encode(gradient(N))[1]]
    cases += [("fp16", f"float16 bits {b:#x}", fields, [_array_bytes(half, "<u2", 5, b)])
              for b in (0x7C00, 0xFC00, 0x7E00, 0xFFFF)]
    topk = codec.parse("topk:0.3")
    fields, (ix, vs) = topk.encode(gradient(N, 4))
    ix, vs, k = bytes(ix), bytes(vs), fields["k"]
    order = np.frombuffer(ix, "<u4")
    cases += [("topk:0.3", f"k {k!r}", _set(fields, k=k), [ix, vs])
              for k in (None, "4", True, 4.0, -1, N + 1)]
    cases += [("topk:0.3", "k one less than sent", _set(fields, k=k - 1), [ix, vs]),
              ("topk:0.3", "indices not increasing", fields, [order[::-1].tobytes(), vs]),
              ("topk:0.3", "an index twice", fields, [_array_bytes(ix, "<u4", 1, order[0]), vs]),
              ("topk:0.3", "an index == n", fields, [_array_bytes(ix, "<u4", -1, N), vs]),
              ("topk:0.3", "an index 2**32-1", fields, [_array_bytes(ix, "<u4", -1, 2**32 - 1), vs]),
              ("topk:0.3", "a value nan", fields, [ix, _array_bytes(vs, "<f4", 0, np.nan)]),
              ("topk:0.3", "a value -inf", fields, [ix, _array_bytes(vs, "<f4", 2, -np.inf)])]
    fields, (bits, scale) = codec.parse("onebit").encode(gradient(N))
    bits, scale = bytes(bits), bytes(scale)
    cases += [("onebit", f"scale {s}", fields, [bits, np.float32(s).tobytes()])
              for s in (np.nan, np.inf, -np.inf, -1.0, -1e-45)]
    cases += [("onebit", f"padding bit {b}", fields, [bits[:-1] + bytes([bits[-1] | 1 << b]), scale])
              for b in (5, 7)]
    cases += [("onebit", "scale as float64", fields, [bits, np.float64(1).tobytes()])]
    return [pytest.param(*case, id=f"{case[0]}: {case[1]}") for case in cases]


@pytest.mark.parametrize("text, what, fields, frames", _malformed())
def test_decode_refuses_without_writing(text, what, fields, frames):
    c = codec.parse(text)
    refused(c, fields, frames, N)
    if c.name == "topk":                     # decode_sparse checks the same
        with pytest.raises(ProtocolError) as info:
            c.decode_sparse(fields, frames, N)
        assert info.value.code == protocol.E_PAYLOAD


@pytest.mark.parametrize("text", TEXTS)
def test_decode_refuses_another_n(text):
    """Decoded as a piece of another size: the frames' lengths do not fit (for topk, which
    fits any n >= its indices, the last index is out of range)."""
    c = codec.parse(text)
    fields, frames = c.encode(gradient(64))
    if c.name == "topk":
        last = int(c.decode_sparse(fields, frames, 64)[0][-1])
        assert "strictly increasing and below n" in refused(c, fields, frames, last)
    else:
        assert "frame has" in refused(c, fields, frames, 72)


def test_refusals_say_what_was_wrong():
    c = codec.parse("topk:0.5")
    fields, frames = c.encode(gradient(8))
    assert "payload codec 'fp16', expected 'topk'" in refused(c, {**fields, "codec": "fp16"}, frames, 8)
    assert "1 frames, expected 2: indices, values" in refused(c, fields, frames[:1], 8)
    assert "the values frame has 15 bytes, expected 16" in refused(c, fields, [frames[0], b"\0" * 15], 8)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_refuses_nonfinite_x(text):
    for bad in (np.nan, np.inf, -np.inf):
        x = gradient(100)
        x[17] = bad
        with pytest.raises(ProtocolError, match="nan or inf") as info:
            codec.parse(text).encode(x)
        assert info.value.code == protocol.E_PAYLOAD


def test_callers_mistakes_are_value_errors():
    c, x = codec.parse("fp16"), gradient(10)
    for bad in (x.astype(np.float64), x.reshape(2, 5), np.repeat(x, 2)[::2], list(x)):
        with pytest.raises(ValueError, match="C-contiguous 1-D float32"):
            c.encode(bad)
    with pytest.raises(ValueError, match="residual has 9 elements, expected 10"):
        c.encode(x, np.empty(9, np.float32))
    fields, frames = c.encode(x)
    frozen = np.empty(10, np.float32)
    frozen.flags.writeable = False
    for out, says in ((np.empty(11, np.float32), "out has 11 elements"), (frozen, "out is read-only")):
        with pytest.raises(ValueError, match=says):
            c.decode(fields, frames, 10, out)
    for n in (-1, 1.0, True):
        with pytest.raises(ValueError, match="n must be an int"):
            c.decode(fields, frames, n)
    with pytest.raises(TypeError, match="decode_sparse is for topk"):
        c.decode_sparse(fields, frames, 10)


# -- what a caller may rely on --------------------------------------------------------------

@pytest.mark.parametrize("text", LOSSY)
def test_frames_belong_to_the_caller(text):
    """Later calls (other sizes too) never change frames already returned: they may be in flight."""
    c = codec.parse(text)
    fields, frames = c.encode(gradient(50_000, 1))
    kept = [bytes(f) for f in frames]
    for n in (50_000, 100, 70_000):
        other = gradient(n, n)
        c.encode(other, np.empty_like(other))
        c.decode(*c.encode(other), n)
    assert [bytes(f) for f in frames] == kept
    fresh = codec.parse(text)
    assert [bytes(f) for f in fresh.encode(gradient(50_000, 1))[1]] == kept   # scratch of any size


def test_dense_and_apply_read_a_whole_header():
    """The helpers a receiver uses: the codec fields inside the message header, n from it."""
    x, base = gradient(1000, 1), gradient(1000, 2)
    for text in TEXTS:
        c = codec.parse(text)
        fields, frames = c.encode(x)
        header = {"v": protocol.VERSION, "op": "push", "node": "worker-0", "seq": 3, **fields, "n": 1000}
        want = c.decode(fields, frames, 1000)
        assert np.array_equal(codec.dense(header, frames, np.empty(1000, np.float32)), want)
        out = base.copy()
        codec.apply(header, frames, out)
        assert np.array_equal(out, base + want if c.name == "topk" else want)   # topk: a delta
    out = np.full(1000, SENTINEL)
    for header, says in (({**header, "codec": "zip"}, "unknown payload codec 'zip'"),
                         ({**header, "n": 999}, "n=999 elements, expected 1000")):
        for helper in (codec.dense, codec.apply):
            with pytest.raises(ProtocolError, match=says) as info:
                helper(header, frames, out)
            assert info.value.code == protocol.E_PAYLOAD and np.all(out == SENTINEL)


# -- fuzzing ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis's caches go to a temporary folder, not to a .hypothesis folder in the checkout."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture
def examples(request) -> int:
    return request.config.getoption("--fuzz-examples")


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _frame_sizes(name: str, n: int, k) -> list[int]:
    k = k if isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n else 0
    return {"none": [4 * n], "fp16": [2 * n], "topk": [4 * k, 4 * k],
            "onebit": [-(-n // 8), 4]}[name]


def test_fuzz_decode(examples):
    """Random fields and frames (mostly of the right lengths, so the contents get checked
    too): decode gives n finite float32 into `out`, or raises ProtocolError E_PAYLOAD with
    `out` untouched. Nothing else."""
    codecs = {text: codec.parse(text) for text in ("none", "fp16", "topk:0.5", "onebit")}
    seen = {"decoded": 0, "refused": 0}

    @fuzz_settings(examples)
    @given(st.data())
    def run(data):
        c = codecs[data.draw(st.sampled_from(sorted(codecs)))]
        n = data.draw(st.integers(0, 40))
        k = data.draw(st.one_of(st.integers(0, n), st.integers(-3, n + 3), st.none(), st.booleans(),
                                st.floats(), st.text(max_size=2)))
        fields = {"codec": data.draw(st.one_of(st.just(c.name), st.sampled_from(sorted(codecs)),
                                               st.text(max_size=6), st.integers(), st.none()))}
        if k is not None:
            fields["k"] = k
        fields.update(data.draw(st.dictionaries(st.sampled_from(["n", "seq", "meta"]), st.integers(),
                                                max_size=2)))
        sizes = _frame_sizes(c.name, n, k)
        count = data.draw(st.one_of(st.just(len(sizes)), st.integers(0, 3)))
        frames = []
        for i in range(count):
            size = sizes[i] if i < len(sizes) else 4
            if c.name == "topk" and i == 0 and size and data.draw(st.booleans()):   # valid indices
                chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=size // 4,
                                            max_size=size // 4, unique=True))
                frames.append(np.array(sorted(chosen), "<u4").tobytes())
            else:
                frames.append(data.draw(st.one_of(st.binary(min_size=size, max_size=size),
                                                  st.binary(max_size=size + 4))))
        out = np.full(n, SENTINEL)
        try:
            result = c.decode(fields, frames, n, out)
        except ProtocolError as e:
            assert e.code == protocol.E_PAYLOAD and np.all(out == SENTINEL)
            seen["refused"] += 1
        else:
            assert result is out and np.isfinite(result).all()
            seen["decoded"] += 1
    run()
    assert seen["decoded"] > examples // 20 and seen["refused"] > examples // 20, seen


def test_fuzz_round_trip(examples):
    """Any finite float32 vector (subnormals, -0.0, +-1e30): each codec's result against its
    reference, and decode(encode(x)) + residual == x."""
    codecs = {text: codec.parse(text) for text in TEXTS}

    @fuzz_settings(examples)
    @given(hnp.arrays(np.float32, st.integers(0, 60),
                      elements=st.floats(-BIG, BIG, width=32)), st.sampled_from(TEXTS))
    def run(x, text):
        c = codecs[text]
        residual = np.empty_like(x)
        fields, frames = c.encode(x, residual)
        decoded = c.decode(fields, frames, x.size)
        assert np.isfinite(decoded).all() and np.isfinite(residual).all()
        check_feedback(x, decoded, residual)
        if c.name == "none":
            assert decoded.tobytes() == x.tobytes()
        elif c.name == "fp16":
            assert np.array_equal(decoded, reference_half(x).astype(np.float32))
        elif c.name == "topk":
            check_topk(c, x, *c.decode_sparse(fields, frames, x.size))
        elif x.size:
            scale = np.float32(np.abs(x.astype(np.float64)).mean())
            assert math.isclose(decoded[0] if decoded[0] > 0 else -decoded[0], scale, rel_tol=1e-5)
            assert np.array_equal(decoded > 0, x >= 0) or scale == 0
    run()
