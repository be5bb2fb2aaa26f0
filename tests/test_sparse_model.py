"""The sparse model core (common/nn/sparse.py): dedup, embedding bags, lr and fm.

Every gradient is checked against central finite differences of the loss in float64,
and the fm logit against its pairwise definition sum_{f<g} <v_f, v_g>."""

import numpy as np
import pytest

from downpour.common.errors import ConfigError
from downpour.common.nn.sparse import Bags, CtrModel, EmbeddingBag, dedup, logloss, scatter_rows


def batch(rng, B=6, F=5, vocab=9):
    keys = rng.integers(0, vocab, size=(B, F)).astype(np.int64) * 7 + 3
    y = rng.integers(0, 2, size=B).astype(np.float64)
    return keys, y


def test_dedup_gives_each_key_once_and_the_inverse_rebuilds_the_batch():
    rng = np.random.default_rng(0)
    keys, _ = batch(rng, B=50, F=7)
    bags = dedup(keys)
    assert np.array_equal(bags.uniq, np.unique(keys))
    assert bags.inv.shape == (50, 7, 1)
    assert np.array_equal(bags.uniq[bags.inv[:, :, 0]], keys)


def test_dedup_with_a_mask_pulls_only_the_present_keys():
    keys = np.array([[[5, 9], [2, 7]]], np.int64)                  # (1, 2, 2)
    mask = np.array([[[True, False], [True, True]]])
    bags = dedup(keys, mask)
    assert bags.uniq.tolist() == [2, 5, 7]                          # 9 is absent
    assert bags.uniq[bags.inv[mask]].tolist() == [5, 2, 7]


def test_scatter_rows_sums_the_rows_of_equal_indices():
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    out = scatter_rows(np.array([2, 0, 2, 1, 0, 2]), values, 4)
    assert out.tolist() == [[2 + 8, 3 + 9], [6, 7], [0 + 4 + 10, 1 + 5 + 11], [0, 0]]


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_forward_and_backward_with_absent_keys(mode):
    rows = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], np.float32)
    bags = Bags(np.array([1, 2, 3]), np.array([[[0, 1, 2], [1, 0, 0]]]),
                np.array([[[True, True, True], [True, False, False]]]))
    bag = EmbeddingBag(mode)
    e = bag.forward(rows, bags)
    want = np.array([[[111, 222], [10, 20]]], np.float32)
    if mode == "mean":
        want[0, 0] /= 3
    assert np.allclose(e, want)
    d_rows = bag.backward(np.ones_like(e), bags)
    w = 1 / 3 if mode == "mean" else 1.0
    assert np.allclose(d_rows, [[w, w], [w + 1, w + 1], [w, w]])    # row 1 is in both bags


@pytest.mark.parametrize("kind,dim", [("lr", 0), ("fm", 3)])
def test_gradients_match_finite_differences(kind, dim):
    rng = np.random.default_rng(1)
    keys, y = batch(rng)
    model = CtrModel(kind, dim)
    bags = dedup(keys)
    rows = rng.normal(0, 0.5, (len(bags.uniq), model.dim)).astype(np.float32)
    bias = 0.3
    _, d_rows, d_bias = model.loss_and_grads(rows, bags, bias, y)

    def loss(r, b):
        return model.loss_and_grads(r.astype(np.float32), bags, b, y)[0]
    h = 1e-3
    numeric = np.zeros(rows.shape)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            up, down = rows.astype(np.float64).copy(), rows.astype(np.float64).copy()
            up[i, j] += h
            down[i, j] -= h
            numeric[i, j] = (loss(up, bias) - loss(down, bias)) / (2 * h)
    assert np.allclose(d_rows, numeric, atol=2e-4)
    assert d_bias == pytest.approx((loss(rows, bias + h) - loss(rows, bias - h)) / (2 * h), abs=2e-4)


def test_fm_logit_is_bias_plus_weights_plus_every_pair_of_factors():
    rng = np.random.default_rng(2)
    keys, _ = batch(rng, B=3, F=4)
    model = CtrModel("fm", 2)
    bags = dedup(keys)
    rows = rng.normal(0, 1, (len(bags.uniq), 3)).astype(np.float32)
    z, _ = model.logits(rows, bags, 0.25)
    for b in range(3):
        r = rows[bags.inv[b, :, 0]].astype(np.float64)             # (F, 3)
        pairs = sum(r[f, 1:] @ r[g, 1:] for f in range(4) for g in range(f + 1, 4))
        assert z[b] == pytest.approx(0.25 + r[:, 0].sum() + pairs, rel=1e-5)


def test_logloss_and_bad_settings():
    assert logloss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    assert logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-np.log(1e-7))   # clipped
    with pytest.raises(ConfigError, match="lr, fm"):
        CtrModel("dlrm")
    with pytest.raises(ConfigError, match="embed-dim"):
        CtrModel("fm", 0)
    with pytest.raises(ConfigError, match="sum, mean"):
        EmbeddingBag("max")
