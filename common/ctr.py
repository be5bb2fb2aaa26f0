"""Click-through data in the Criteo layout: hashed keys, chunked reading, CTR metrics.

The layout (Criteo display ads): one sample per line, tab-separated, 40 fields

    label  I1 .. I13  C1 .. C26 \\n
    0|1    decimal    hex, up to 16 digits (68fd1e64)

Integers may be negative; any feature may be empty (missing); a final line without
its newline is read, and a line ending in \\r\\n is read as if it ended in \\n.

The design: a file is cut into chunks of whole lines by one streaming pass
(`index`: byte offsets), and a chunk is parsed without a Python loop over lines
(`read_chunk`): a piece of about 1 MiB at a time, its separators are found in one
NumPy pass, the 40 fields of every line become an (n, 40) array of byte ranges, and
each column is decoded at once, eight characters to a uint64 word (SWAR, below).
Every feature becomes one key of a sparse table (`field_keys`), a pure function of
(field, value), so any process on any machine computes the same key.

    int64 key  = mix64(mix64(f) XOR v) AND (2**63 - 1)      field f in 0..38, v as uint64
    mix64(z)   = the splitmix64 output function of z + 0x9E3779B97F4A7C15:
                 z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
                 z ^ z >> 31                                   (arithmetic mod 2**64)

Fields 0..12 are I1..I13 holding their bin (`int_bins`), 13..38 are C1..C26 holding
the hex value. A missing value of field f has the key of value 0 in the pseudo-field
f + 2**32 (`MISSING_FIELD`): one key per field. Within a field, distinct values have
distinct 64-bit mixes (mix64 is a bijection); the mask to 63 bits keeps keys
non-negative (a table reserves -1), so two values collide with probability 2**-63.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from downpour.common.errors import ConfigError, DataError
from downpour.common.nn import sparse
from downpour.common.nn.hashing import splitmix64

N_INT = 13                      # integer features I1..I13
N_CAT = 26                      # categorical features C1..C26
FIELDS = N_INT + N_CAT          # key fields per sample (the label is not one)
COLUMNS = 1 + FIELDS            # tab-separated fields per line
NAMES = ("label", *(f"I{j}" for j in range(1, N_INT + 1)), *(f"C{j}" for j in range(1, N_CAT + 1)))
MISSING_FIELD = 1 << 32         # a missing value of field f is value 0 of field f + MISSING_FIELD
HEX_DIGITS_MAX = 16             # a categorical value is a uint64
INT_DIGITS_MAX = 18             # an integer fits int64
PROB_EPS = sparse.EPS           # logloss clips p to [PROB_EPS, 1 - PROB_EPS]

_BLOCK_BYTES = 16 << 20         # index(): bytes read per step
_PIECE_BYTES = 1 << 20          # read_chunk(): bytes decoded per step (the temporaries fit in cache)
_SCAN_BYTES = 1 << 12           # read_chunk(): bytes searched per step for the end of a piece
_PAD = 24                       # bytes before a chunk: 3 words end in its first field
_TAB, _NL, _CR, _MINUS = 9, 10, 13, 45
_KEY_MASK = np.uint64((1 << 63) - 1)
_M64 = (1 << 64) - 1


class Batch(NamedTuple):
    """Samples of a chunk: labels (n,) float32 in {0, 1}; keys (n, FIELDS) int64 >= 0,
    columns I1..I13 then C1..C26."""

    labels: np.ndarray
    keys: np.ndarray


# ---------------------------------------------------------------------------- keys


_mix64 = splitmix64                 # (the name the docstring's formulas use)


_FIELD_IDS = np.arange(FIELDS, dtype=np.uint64)
_SEEDS = _mix64(_FIELD_IDS)                                                   # mix64(f), (FIELDS,)
_MISSING_KEYS = (_mix64(_mix64(_FIELD_IDS + np.uint64(MISSING_FIELD))) & _KEY_MASK).view(np.int64)


def int_bins(x: np.ndarray) -> np.ndarray:
    """The bin of each integer feature value (int64): x itself for x <= 2 (so 0, 1, 2 and
    every negative value keep their own bin), else 3 + floor(2 log2 x).

    Half-octave bins: each spans a factor sqrt(2), so the counts of a heavy-tailed
    feature (Criteo's run to millions) need about 40 bins below 10**6, and a bin far in
    the tail is still wide enough to be seen often. The Kaggle winners' floor(ln(x)**2)
    makes ever finer bins where the data is sparsest (190 below 10**6). Large bins start
    at 6, above every small one.
    """
    x = np.asarray(x, np.int64)
    big = np.maximum(x, 3).astype(np.float64)
    return np.where(x <= 2, x, 3 + np.floor(2 * np.log2(big)).astype(np.int64))


def field_keys(field: int, values: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """The int64 keys (>= 0) of `values` of one field, as `read_chunk` makes them.

    field: 0..12 for I1..I13 (`values` are the integers as written; binned here by
    `int_bins`), 13..38 for C1..C26 (`values` are the hex values: uint64, or int64
    holding the same bits). missing: optional bool mask of the same shape; where True,
    the field's missing key replaces the value's. The formula is in the module docstring.
    """
    if not 0 <= field < FIELDS:
        raise ConfigError(f"field {field} is not a key field; expected 0..{FIELDS - 1} "
                          f"(I1..I13 then C1..C26)")
    values = np.asarray(values)
    if field < N_INT:
        values = int_bins(values)
    bits = values.astype(np.int64).view(np.uint64) if values.dtype != np.uint64 else values
    keys = (_mix64(_SEEDS[field] ^ bits) & _KEY_MASK).view(np.int64)
    if missing is not None:
        keys = np.where(missing, _MISSING_KEYS[field], keys)
    return keys


# ---------------------------------------------------------------------------- files


def index(path: str | os.PathLike, chunk_lines: int) -> np.ndarray:
    """Byte offsets cutting `path` into chunks of `chunk_lines` lines (the last may be
    shorter): int64 (n_chunks + 1,), first 0, last the file size; chunk i is bytes
    [off[i], off[i + 1]). One streaming pass, _BLOCK_BYTES at a time.

    DataError if the file is missing or empty; ConfigError if chunk_lines < 1.
    """
    return _scan(path, chunk_lines)[0]


def _scan(path: str | os.PathLike, chunk_lines: int) -> tuple[np.ndarray, int]:
    """(`index`'s offsets, the lines of the file: a last one without newline counts)."""
    if int(chunk_lines) != chunk_lines or chunk_lines < 1:
        raise ConfigError(f"chunk_lines={chunk_lines!r}: expected a whole number of lines >= 1")
    size = _size(path)
    if size == 0:
        raise DataError(f"{path}: the file is empty; expected samples in the Criteo layout "
                        f"(one per line)")
    cuts, seen, pos, last = [np.zeros(1, np.int64)], 0, 0, b""
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == _NL)
            first = (-seen - 1) % chunk_lines       # the first newline here that ends a chunk
            cuts.append(pos + newlines[first::chunk_lines] + 1)
            seen, pos, last = seen + len(newlines), pos + len(block), block[-1:]
    off = np.concatenate(cuts)
    lines = seen + (last != b"\n")
    return (off if off[-1] == size else np.append(off, size)), lines


class CtrSplit:
    """One file in the Criteo layout, indexed once into chunks of `chunk_lines` lines and
    read a chunk at a time, so it is never whole in memory. len() is its lines."""

    def __init__(self, path: str | os.PathLike, chunk_lines: int):
        self.path, self.chunk_lines = path, chunk_lines
        self.offsets, self.lines = _scan(path, chunk_lines)     # (chunks + 1,) bytes

    @property
    def chunks(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.lines

    def read(self, chunk: int) -> Batch:
        """The samples of chunk `chunk` (0 .. chunks - 1); DataError as `read_chunk`."""
        if not 0 <= chunk < self.chunks:
            raise DataError(f"{self.path}: no chunk {chunk}; it has {self.chunks} of "
                            f"{self.chunk_lines} lines")
        return read_chunk(self.path, int(self.offsets[chunk]), int(self.offsets[chunk + 1]))


def read_chunk(path: str | os.PathLike, lo: int, hi: int) -> Batch:
    """The samples in bytes [lo, hi) of `path`, which must hold whole lines (offsets from
    `index`). DataError naming the file and the line (1-based, within the chunk) for
    any line that breaks the layout, and for a range that does not start or end at a
    line boundary. Decoded _PIECE_BYTES at a time, so the temporaries stay in cache."""
    buf = _read_range(path, lo, hi)
    words = np.ndarray((len(buf) - 7,), "<u8", buffer=buf, strides=(1,))  # the 8 bytes from each byte
    parts, start, lines = [], _PAD, 0
    while start < len(buf):
        stop = _after_newline(buf, min(start + _PIECE_BYTES, len(buf)) - 1)
        parts.append(_Piece.split(buf, start, stop, path, lo, lines).decode(words))
        start, lines = stop, lines + len(parts[-1].labels)
    if not parts:
        return Batch(np.zeros(0, np.float32), np.zeros((0, FIELDS), np.int64))
    return Batch(np.concatenate([p.labels for p in parts]), np.concatenate([p.keys for p in parts]))


def _size(path: str | os.PathLike) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected data in the Criteo layout") from None


def _read_range(path: str | os.PathLike, lo: int, hi: int) -> np.ndarray:
    """Bytes [lo, hi) after _PAD bytes of '0', ending in one newline (added after a final
    line without one): uint8."""
    size = _size(path)
    if not 0 <= lo <= hi <= size:
        raise DataError(f"{path}: byte range [{lo}, {hi}) is not inside the file "
                        f"({size} bytes); take offsets from index()")
    buf = np.empty(_PAD + hi - lo + 1, np.uint8)
    buf[:_PAD] = ord("0")
    if hi == lo:
        return buf[:_PAD]
    with open(path, "rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            if f.read(1) != b"\n":
                raise DataError(f"{path}: byte {lo} is not the start of a line; take chunk "
                                f"offsets from index()")
        view, got = memoryview(buf)[_PAD:-1], 0
        while got < hi - lo and (n := f.readinto(view[got:])):
            got += n
    if got != hi - lo:
        raise DataError(f"{path}: ended at byte {lo + got} while reading [{lo}, {hi}); was it "
                        f"truncated while being read?")
    if buf[-2] == _NL:
        return buf[:-1]
    if hi != size:
        raise DataError(f"{path}: byte {hi} is not the end of a line; take chunk offsets "
                        f"from index()")
    buf[-1] = _NL
    return buf


def _after_newline(buf: np.ndarray, pos: int) -> int:
    """The index after the first newline at or after `pos` (buf ends in one)."""
    while True:
        window = buf[pos:pos + _SCAN_BYTES]
        at = int(np.argmax(window == _NL))
        if window[at] == _NL:
            return pos + at + 1
        pos += len(window)


class _Piece:
    """Whole lines of a chunk, [start, end) byte ranges of their fields in `buf`, (n, 40)
    int64 each; `first` is the line (0-based, in the chunk) of the first."""

    def __init__(self, buf, starts, ends, path, lo: int, first: int):
        self.buf, self.starts, self.ends = buf, starts, ends
        self.path, self.lo, self.first = path, lo, first

    @classmethod
    def split(cls, buf: np.ndarray, start: int, stop: int, path, lo: int, first: int) -> _Piece:
        """The lines in buf[start:stop] cut into fields. DataError for the first line
        without exactly 39 tabs, or holding a control byte below \\t."""
        seps = np.flatnonzero(buf[start:stop] < 11)     # tabs, newlines (other bytes < 11: caught below)
        kind = buf[start + seps]
        newline = kind == _NL
        n = int(np.count_nonzero(newline))
        if len(seps) != n * COLUMNS or not newline[COLUMNS - 1::COLUMNS].all() \
                or not (newline | (kind == _TAB)).all():
            cls._bad_separators(kind, newline, path, lo, first)
        ends = (seps + start).reshape(n, COLUMNS)
        starts = np.empty_like(ends)
        starts[:, 1:] = ends[:, :-1] + 1
        starts[0, 0] = start
        starts[1:, 0] = ends[:-1, -1] + 1
        last = ends[:, -1]
        last -= (buf[last - 1] == _CR) & (last > starts[:, -1])     # \r\n read as \n
        return cls(buf, starts, ends, path, lo, first)

    @staticmethod
    def _bad_separators(kind, newline, path, lo: int, first: int):
        other = np.flatnonzero((kind != _TAB) & ~newline)
        at = np.flatnonzero(newline)
        tabs = np.diff(at, prepend=-1) - 1                      # tabs (and others) on each line
        wrong = np.flatnonzero(tabs != COLUMNS - 1)
        if len(other) and (not len(wrong) or other[0] < at[wrong[0]]):
            line = int(np.count_nonzero(newline[:other[0]]))
            raise _line_error(path, lo, first + line, f"control byte 0x{kind[other[0]]:02x}; "
                              f"expected text with tabs between the fields")
        bad = int(wrong[0])
        raise _line_error(path, lo, first + bad, f"{tabs[bad]} tabs ({tabs[bad] + 1} fields); "
                          f"expected {COLUMNS - 1} tabs: the label, {N_INT} integer and {N_CAT} "
                          f"categorical fields")

    def fail(self, bad: np.ndarray, column: int, expected: str) -> DataError:
        """The error for the first True of `bad` ((lines, columns) from `column`)."""
        line, col = (int(i) for i in np.argwhere(bad)[0])
        text = self.buf[self.starts[line, column + col]:self.ends[line, column + col]].tobytes()
        shown = text[:40].decode("utf-8", "replace") + ("..." if len(text) > 40 else "")
        return _line_error(self.path, self.lo, self.first + line,
                           f"field {NAMES[column + col]} is {shown!r}; expected {expected}")

    def decode(self, words: np.ndarray) -> Batch:
        """The labels and keys of these lines; `words` views buf as the uint64 at each byte."""
        lengths = self.ends - self.starts
        label = self.buf[self.starts[:, 0]]
        bad = (lengths[:, 0] != 1) | ((label != ord("0")) & (label != ord("1")))
        if bad.any():
            raise self.fail(bad[:, None], 0, "0 or 1")
        values = np.empty((len(lengths), FIELDS), np.uint64)
        ints = slice(1, 1 + N_INT)
        values[:, :N_INT] = int_bins(self._decimals(words, ints)).view(np.uint64)
        values[:, N_INT:] = self._hexes(words, slice(1 + N_INT, COLUMNS))
        keys = (_mix64(_SEEDS ^ values) & _KEY_MASK).view(np.int64)
        keys = np.where(lengths[:, 1:] == 0, _MISSING_KEYS, keys)
        return Batch((label - ord("0")).astype(np.float32), keys)

    def _decimals(self, words: np.ndarray, columns: slice) -> np.ndarray:
        """The integer fields of `columns` as int64 (n, columns); 0 where empty."""
        starts, ends = self.starts[:, columns], self.ends[:, columns]
        lengths = ends - starts
        negative = (self.buf[starts] == _MINUS) & (lengths > 0)
        digits = lengths - negative
        bad = (digits > INT_DIGITS_MAX) | (negative & (digits == 0))
        if bad.any():
            raise self.fail(bad, columns.start, f"a decimal integer of at most {INT_DIGITS_MAX} "
                            f"digits, optionally after '-', or nothing")
        x = np.zeros(lengths.shape, np.uint64)
        for j in range(-(-int(digits.max()) // 8)):                 # 8 digits a word, lowest first
            w = _chars(words, ends, digits, j)
            bad = ~_all_between(w, ord("0"), ord("9"))
            if bad.any():
                raise self.fail(bad, columns.start, "a decimal integer (digits, optionally "
                                "after '-') or nothing")
            x += _swar_decimal(w) * np.uint64(10 ** (8 * j))
        x = x.view(np.int64)
        return np.where(negative, -x, x)

    def _hexes(self, words: np.ndarray, columns: slice) -> np.ndarray:
        """The categorical fields of `columns` as uint64 (n, columns); 0 where empty."""
        ends = self.ends[:, columns]
        lengths = ends - self.starts[:, columns]
        bad = lengths > HEX_DIGITS_MAX
        if bad.any():
            raise self.fail(bad, columns.start, f"at most {HEX_DIGITS_MAX} hex digits")
        x = np.zeros(lengths.shape, np.uint64)
        for j in range(-(-int(lengths.max()) // 8)):
            w = _chars(words, ends, lengths, j)
            lower = w | np.uint64(0x20 * _ONES)
            bad = ~(_all_between(w, ord("0"), ord("9"), lower, ord("a"), ord("f")))
            if bad.any():
                raise self.fail(bad, columns.start, "hex digits (0-9, a-f, A-F) or nothing")
            x |= _swar_hex(w) << np.uint64(32 * j)
        return x


def _line_error(path, lo: int, line: int, what: str) -> DataError:
    """line: 0-based within the chunk."""
    return DataError(f"{path}: line {line + 1} of the chunk at byte {lo}: {what}")


# ---------------------------------------------------------------------------- SWAR
# Eight characters decoded at once in one uint64 (SIMD within a register): byte k of a
# word is the k-th of 8 characters, so the first (most significant) digit is the lowest
# byte. No carry crosses a byte while every byte is below 0x80; a word with a byte at or
# above it fails the check by that byte alone.

_ONES = 0x0101010101010101
_HIGH = np.uint64(0x80 * _ONES)
_ZEROS = np.uint64(0x30 * _ONES)                                    # eight '0'
_KEEP = np.array([_M64 << 8 * (8 - k) & _M64 for k in range(9)], np.uint64)  # the top k bytes


def _chars(words: np.ndarray, ends: np.ndarray, lengths: np.ndarray, j: int) -> np.ndarray:
    """The j-th 8 characters from the end of each field, bytes before the field read as
    '0' (so a short field is a number with leading zeros): uint64 like `ends`."""
    keep = _KEEP[np.clip(lengths - 8 * j, 0, 8)]
    return (words[ends - 8 * (j + 1)] & keep) | (_ZEROS & ~keep)


def _at_least(w: np.ndarray, c: int) -> np.ndarray:
    """The high bit of each byte set where that byte >= c (bytes below 0x80)."""
    return (w + np.uint64((0x80 - c) * _ONES)) & _HIGH


def _all_between(w: np.ndarray, lo: int, hi: int, w2: np.ndarray | None = None, lo2: int = 0,
                 hi2: int = 0) -> np.ndarray:
    """Whether every byte of w is in [lo, hi] (or, given w2, its byte of w2 in [lo2, hi2])."""
    inside = _at_least(w, lo) & ~_at_least(w, hi + 1)
    if w2 is not None:
        inside |= _at_least(w2, lo2) & ~_at_least(w2, hi2 + 1)
    return ((w & _HIGH) == 0) & (inside == _HIGH)


def _swar_decimal(w: np.ndarray) -> np.ndarray:
    """The value of 8 decimal characters (each '0'..'9'): uint64 < 10**8."""
    with np.errstate(over="ignore"):
        d = w - _ZEROS                                                  # a digit per byte
        d = (d * np.uint64(10) + (d >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
        d = (d * np.uint64(100) + (d >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
        return (d * np.uint64(10000) + (d >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _swar_hex(w: np.ndarray) -> np.ndarray:
    """The value of 8 hex characters (each 0-9, a-f, A-F): uint64 < 2**32."""
    d = (w & np.uint64(0x0F * _ONES)) + ((w >> np.uint64(6)) & np.uint64(_ONES)) * np.uint64(9)
    d = ((d << np.uint64(4)) | (d >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    d = ((d << np.uint64(8)) | (d >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return ((d << np.uint64(16)) | (d >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------- metrics


def _labels_and_probabilities(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, np.float64).ravel()
    p = np.asarray(p, np.float64).ravel()
    if len(y) != len(p) or len(y) == 0:
        raise DataError(f"{len(y)} labels and {len(p)} predictions; expected the same "
                        f"number, at least one")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("labels must be 0 or 1")
    return y, p


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy -(y ln p + (1 - y) ln(1 - p)) in nats, p clipped to
    [PROB_EPS, 1 - PROB_EPS]. DataError for lengths that differ, or labels not 0/1."""
    y, p = _labels_and_probabilities(y, p)
    return sparse.logloss(y, p)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (Mann-Whitney U over ranks, tied scores
    sharing their average rank).

    DataError when y holds one class only: the area is then undefined (as in scikit-
    learn's roc_auc_score), and 0.5 would pass for a random model.
    """
    y, p = _labels_and_probabilities(y, p)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise DataError(f"AUC needs both classes; the labels are all {int(y[0])} "
                        f"({len(y)} samples)")
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    group = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])     # first index of each tie
    counts = np.diff(np.r_[group, len(p)])
    ranks = np.empty(len(p))
    ranks[order] = np.repeat(group + (counts + 1) / 2, counts)        # 1-based average ranks
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))
