"""Click-through data drawn from a planted model, in the Criteo layout (downpour.common.ctr).

`downpour synth ctr DIR --rows N --seed S` writes

    DIR/train.tsv   N rows
    DIR/test.tsv    N // 5 rows
    DIR/truth.json  the planted model's own logloss and AUC on the test rows (the floor
                    no model can beat), the bias, each split's label rate, the settings,
                    and seen_logloss: the planted model with every value the training
                    rows never show set to zero (w and u): what a model that learned
                    every seen value exactly, and nothing else, would score (a reference,
                    not a bound: averaging over the unseen values would do a little better)

The model, every parameter drawn from the seed:

    26 categorical fields; field i in 0..25 has round(10**(1 + 5 i / 25)) values (10 to
        10**6), drawn Zipf: P(rank r) ~ r**-1.1 over a random permutation of the values;
        value v is written as the 8 hex digits of v XOR a random 32-bit mask of the field
    13 integer features x_j = floor(lognormal(mean 1, sigma 1.5)), missing (empty, adding
        0) with probability 0.1
    logit = bias + sum_fields w_v + sum_{fields a < b} <u_a, u_b> + sum_j c_j log1p(x_j)
        w_v ~ N(0, 0.5**2), u_v ~ N(0, 0.3**2 I_4), c_j ~ N(0, 0.3**2); the pairs' sum is
        0.5 (|sum u|**2 - sum |u|**2)
    bias: set by bisection so that the mean of sigmoid(logit) over the training rows is 0.25
    label ~ Bernoulli(sigmoid(logit))

The same seed gives the same files, byte for byte. Memory: the model's ~2.7M values
(about 100 MB with their samplers) and about 250 bytes a row, train and test together.
Text is formatted a block of rows at a time, with no Python loop over rows or fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from downpour.common import ctr
from downpour.common.errors import ConfigError
from downpour.common.fileio import atomic_write, prepare_output

MIN_ROWS = 5                # so the test split (rows // TEST_DIVISOR) holds a row
TEST_DIVISOR = 5            # test rows = training rows // 5
ZIPF_EXPONENT = 1.1         # P(rank r) proportional to r**-ZIPF_EXPONENT
FIRST_ORDER_STD = 0.5       # w_v
FACTOR_RANK = 4             # u_v in R**FACTOR_RANK
FACTOR_STD = 0.3            # each component of u_v
INT_COEF_STD = 0.3          # c_j
INT_LOG_MEAN, INT_LOG_SIGMA = 1.0, 1.5      # x_j = floor(lognormal(mean, sigma))
INT_MISSING = 0.1           # probability that an integer feature is empty
MEAN_CTR = 0.25             # the mean of sigmoid(logit) over the training rows
BISECTION_STEPS = 100       # halvings of the bias interval (below float64's resolution)
FORMAT_ROWS = 1 << 15       # rows formatted per block of text
CARDINALITIES = tuple(round(10 ** (1 + 5 * i / 25)) for i in range(ctr.N_CAT))

_HEX_CHARS = np.frombuffer(b"0123456789abcdef", np.uint8)
_HEX_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)               # 8 digits, most significant first
_TAB, _NL, _ZERO = 9, 10, ord("0")


class _Field(NamedTuple):
    """One categorical field of the planted model, its values indexed 0..cardinality-1."""

    cdf: np.ndarray             # (cardinality,) float64: P(rank <= r), Zipf
    values: np.ndarray          # (cardinality,) int32: the value of each rank
    mask: int                   # the value written is value XOR mask (32 bits)
    w: np.ndarray               # (cardinality,) float32: first-order weights
    u: np.ndarray               # (cardinality, FACTOR_RANK) float32: factors


class _Model(NamedTuple):
    fields: list[_Field]
    c: np.ndarray               # (N_INT,) coefficients of log1p(x_j)


class _Rows(NamedTuple):
    cats: np.ndarray            # (n, N_CAT) int32 value indices
    ints: np.ndarray            # (n, N_INT) int64, -1 where missing
    logit: np.ndarray           # (n,) float64, without the bias


def write_ctr(directory: str | os.PathLike, rows: int, seed: int) -> dict:
    """Draw a planted model from `seed` and write train.tsv (`rows` rows), test.tsv (rows //
    5) and truth.json into `directory` (created if missing), each atomically. Returns
    what truth.json holds. ConfigError for rows < MIN_ROWS, a negative seed, or a
    directory that cannot be one."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < MIN_ROWS:
        raise ConfigError(f"--rows {rows!r}: expected a whole number >= {MIN_ROWS} (the test "
                          f"split gets rows // {TEST_DIVISOR})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed {seed!r}: expected a whole number >= 0")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"synth directory {str(directory)!r} exists and is not a directory; "
                          f"give a folder (it is created if missing)")
    prepare_output(directory, "synth directory", directory=True)

    rng = np.random.default_rng(seed)
    model = _draw_model(rng)
    train, test = _draw_rows(model, rng, rows), _draw_rows(model, rng, rows // TEST_DIVISOR)
    bias = _calibrate(train.logit)
    p_train, p_test = _sigmoid(train.logit + bias), _sigmoid(test.logit + bias)
    y_train, y_test = rng.random(len(p_train)) < p_train, rng.random(len(p_test)) < p_test

    # the planted model knowing exactly the values the training rows hold, and nothing of
    # the others
    seen = [np.bincount(train.cats[:, i], minlength=len(f.w)) > 0 for i, f in enumerate(model.fields)]
    p_seen = _sigmoid(_logit(model, test.cats, test.ints, seen) + bias)
    masks = np.array([f.mask for f in model.fields], np.uint32)
    atomic_write(directory / "train.tsv", lambda f: _write_rows(f, train, y_train, masks))
    atomic_write(directory / "test.tsv", lambda f: _write_rows(f, test, y_test, masks))
    truth = {
        "rows": rows, "test_rows": len(y_test), "seed": seed, "bias": bias,
        "train_label_rate": float(y_train.mean()), "test_label_rate": float(y_test.mean()),
        "floor_logloss": ctr.logloss(y_test, p_test),
        "floor_auc": ctr.auc(y_test, p_test) if 0 < y_test.sum() < len(y_test) else None,
        "base_logloss": ctr.logloss(y_test, np.full(len(y_test), y_train.mean())),
        "seen_logloss": ctr.logloss(y_test, p_seen),
        "logit_std": float((train.logit + bias).std()),
        "params": {
            "categorical_fields": ctr.N_CAT, "cardinalities": list(CARDINALITIES),
            "zipf_exponent": ZIPF_EXPONENT, "first_order_std": FIRST_ORDER_STD,
            "factor_rank": FACTOR_RANK, "factor_std": FACTOR_STD,
            "integer_fields": ctr.N_INT, "integer_coef_std": INT_COEF_STD,
            "integer_lognormal_mean": INT_LOG_MEAN, "integer_lognormal_sigma": INT_LOG_SIGMA,
            "integer_missing": INT_MISSING, "mean_ctr": MEAN_CTR,
        },
    }
    text = (json.dumps(truth, indent=2) + "\n").encode()
    atomic_write(directory / "truth.json", lambda f: f.write(text))
    return truth


def summary(truth: dict) -> str:
    """One line for people: the splits and the floor."""
    auc = "n/a (one class)" if truth["floor_auc"] is None else f"{truth['floor_auc']:.4f}"
    return (f"planted CTR model, seed {truth['seed']}: {truth['rows']} training rows (label rate "
            f"{truth['train_label_rate']:.3f}), {truth['test_rows']} test rows (label rate "
            f"{truth['test_label_rate']:.3f}); the best possible test logloss is "
            f"{truth['floor_logloss']:.4f} (the base rate's {truth['base_logloss']:.4f}), "
            f"AUC {auc}")


# ---------------------------------------------------------------------------- drawing


def _draw_model(rng: np.random.Generator) -> _Model:
    fields = []
    for cardinality in CARDINALITIES:
        weights = np.arange(1, cardinality + 1, dtype=np.float64) ** -ZIPF_EXPONENT
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        values = rng.permutation(cardinality).astype(np.int32)
        mask = int(rng.integers(0, 1 << 32))
        w = FIRST_ORDER_STD * rng.standard_normal(cardinality, dtype=np.float32)
        u = FACTOR_STD * rng.standard_normal((cardinality, FACTOR_RANK), dtype=np.float32)
        fields.append(_Field(cdf, values, mask, w, u))
    return _Model(fields, INT_COEF_STD * rng.standard_normal(ctr.N_INT))


def _draw_rows(model: _Model, rng: np.random.Generator, n: int) -> _Rows:
    """n rows of the model: their features and their logits without the bias."""
    cats = np.empty((n, ctr.N_CAT), np.int32)
    for i, field in enumerate(model.fields):
        rank = np.searchsorted(field.cdf, rng.random(n), side="right")
        cats[:, i] = field.values[np.minimum(rank, len(field.cdf) - 1)]   # rounding may leave cdf[-1] < u
    ints = np.floor(rng.lognormal(INT_LOG_MEAN, INT_LOG_SIGMA, (n, ctr.N_INT))).astype(np.int64)
    ints[rng.random((n, ctr.N_INT)) < INT_MISSING] = -1
    return _Rows(cats, ints, _logit(model, cats, ints))


def _logit(model: _Model, cats: np.ndarray, ints: np.ndarray,
           known: list[np.ndarray] | None = None) -> np.ndarray:
    """(n,) the logits of rows without the bias; with `known` (per field, which values are
    known), an unknown value's w and u count as zero."""
    n = len(cats)
    logit = np.zeros(n)
    u_sum = np.zeros((n, FACTOR_RANK))                      # sum over fields of u_v
    u_squares = np.zeros(n)                                 # sum over fields of |u_v|**2
    for i, field in enumerate(model.fields):
        v = cats[:, i]
        keep = 1.0 if known is None else known[i][v]
        u = field.u[v] * (keep if known is None else keep[:, None])    # (n, FACTOR_RANK)
        logit += field.w[v] * keep
        u_sum += u
        u_squares += np.einsum("nk,nk->n", u, u)
    logit += 0.5 * (np.einsum("nk,nk->n", u_sum, u_sum) - u_squares)
    logit += np.where(ints >= 0, np.log1p(np.maximum(ints, 0)), 0.0) @ model.c
    return logit


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _calibrate(logit: np.ndarray) -> float:
    """The bias b with mean(sigmoid(logit + b)) = MEAN_CTR, by bisection (the mean rises
    with b)."""
    lo, hi = -float(np.abs(logit).max()) - 40.0, float(np.abs(logit).max()) + 40.0
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logit + mid).mean() < MEAN_CTR:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- text


def _write_rows(f: BinaryIO, rows: _Rows, labels: np.ndarray, masks: np.ndarray) -> None:
    digits = max(1, len(str(int(rows.ints.max()))))
    for i in range(0, len(labels), FORMAT_ROWS):
        block = slice(i, i + FORMAT_ROWS)
        f.write(_format(labels[block], rows.ints[block], rows.cats[block], masks, digits))


def _format(labels: np.ndarray, ints: np.ndarray, cats: np.ndarray, masks: np.ndarray,
            digits: int) -> bytes:
    """Lines in the Criteo layout. Each row is laid out at fixed width, the unused bytes
    (leading zeros, missing values) left 0, and those are then dropped."""
    n = len(labels)
    int_width = 1 + digits                                  # tab, then right-aligned digits
    line = np.zeros((n, 1 + ctr.N_INT * int_width + ctr.N_CAT * 9 + 1), np.uint8)
    line[:, 0] = _ZERO + labels
    int_part = line[:, 1:1 + ctr.N_INT * int_width].reshape(n, ctr.N_INT, int_width)
    int_part[:, :, 0] = _TAB
    powers = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)          # (digits,)
    x = ints[:, :, None]
    chars = (_ZERO + x // powers % 10).astype(np.uint8)
    chars[(x < powers) & (powers > 1)] = 0                  # leading zeros (x = 0 keeps its last)
    chars[ints < 0] = 0                                     # missing
    int_part[:, :, 1:] = chars
    cat_part = line[:, 1 + ctr.N_INT * int_width:-1].reshape(n, ctr.N_CAT, 9)
    cat_part[:, :, 0] = _TAB
    written = cats.astype(np.uint32) ^ masks                # (n, N_CAT)
    cat_part[:, :, 1:] = _HEX_CHARS[(written[:, :, None] >> _HEX_SHIFTS) & 0xF]
    line[:, -1] = _NL
    flat = line.ravel()
    return flat[flat != 0].tobytes()

