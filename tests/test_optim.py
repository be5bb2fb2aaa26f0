"""Tests of common/nn/optim.py: every optimizer against its formula written out here in
float64 NumPy, against torch where it is installed, chunk- and shard-invariance,
state_dict round trips, validation and gradient clipping."""

import io

import numpy as np
import pytest

from downpour.common.errors import ConfigError
from downpour.common.nn import optim
from downpour.common.nn.optim import OPTIMIZERS, clip_by_global_norm, clip_by_value, make_optimizer

LRS = (0.01, 0.02, 0.005)  # one learning rate per step: the schedule lives outside

# (optimizer, hyperparameters): every optimizer with its defaults and with non-default
# values including weight decay.
CASES = [
    ("sgd", {}), ("sgd", {"weight_decay": 0.1}),
    ("momentum", {}), ("momentum", {"momentum": 0.5, "weight_decay": 0.1}),
    ("nesterov", {}), ("nesterov", {"momentum": 0.7, "weight_decay": 0.05}),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-6, "weight_decay": 0.1}),
    ("adadelta", {}), ("adadelta", {"rho": 0.8, "eps": 1e-4, "weight_decay": 0.1}),
    ("rmsprop", {}), ("rmsprop", {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1}),
    ("adam", {}), ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("adamax", {}), ("adamax", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("nadam", {}),
    ("nadam", {"betas": (0.8, 0.99), "eps": 1e-6, "momentum_decay": 0.01, "weight_decay": 0.1}),
]
IDS = [f"{name}-{'default' if not h else 'custom'}" for name, h in CASES]
WITH_DECAY = [(name, h) for name, h in CASES if h]


def test_every_optimizer_is_tested():
    assert set(OPTIMIZERS) == {name for name, _ in CASES} == {name for name, _ in WITH_DECAY}


# ---- the formulas, written out by hand (textbook state, float64) ---------------------

def reference(name, p, grads, lrs, h):
    """p after one step per (grad, lr), and the textbook state, in float64."""
    p, s = p.astype(np.float64), {}
    wd = h.get("weight_decay", 0.0)
    b1, b2 = h.get("betas", (0.9, 0.999))
    zeros = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64) + wd * p
        if name == "sgd":
            p = p - lr * g
        elif name in ("momentum", "nesterov"):
            mu = h.get("momentum", 0.9)
            b = s["momentum_buffer"] = mu * s.get("momentum_buffer", zeros) + g
            p = p - lr * (g + mu * b if name == "nesterov" else b)
        elif name == "adagrad":
            G = s["sum"] = s.get("sum", zeros + h.get("initial_accumulator_value", 0.0)) + g * g
            clr = lr / (1 + (t - 1) * h.get("lr_decay", 0.0))
            p = p - clr * g / (np.sqrt(G) + h.get("eps", 1e-10))
        elif name == "adadelta":
            rho, eps = h.get("rho", 0.9), h.get("eps", 1e-6)
            v = s["square_avg"] = rho * s.get("square_avg", zeros) + (1 - rho) * g * g
            u = s.get("acc_delta", zeros)
            d = np.sqrt(u + eps) / np.sqrt(v + eps) * g
            s["acc_delta"] = rho * u + (1 - rho) * d * d
            p = p - lr * d
        elif name == "rmsprop":
            alpha = h.get("alpha", 0.99)
            v = s["square_avg"] = alpha * s.get("square_avg", zeros) + (1 - alpha) * g * g
            p = p - lr * g / (np.sqrt(v) + h.get("eps", 1e-8))
        elif name in ("adam", "adamax", "nadam"):
            m = s["exp_avg"] = b1 * s.get("exp_avg", zeros) + (1 - b1) * g
            eps = h.get("eps", 1e-8)
            if name == "adam":
                v = s["exp_avg_sq"] = b2 * s.get("exp_avg_sq", zeros) + (1 - b2) * g * g
                p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
            elif name == "adamax":
                u = s["exp_inf"] = np.maximum(b2 * s.get("exp_inf", zeros), np.abs(g) + eps)
                p = p - lr / (1 - b1 ** t) * m / u
            else:
                psi = h.get("momentum_decay", 4e-3)
                mu, mu_next = (b1 * (1 - 0.5 * 0.96 ** (i * psi)) for i in (t, t + 1))
                P = s["mu_product"] = s.get("mu_product", 1.0) * mu
                v = s["exp_avg_sq"] = b2 * s.get("exp_avg_sq", zeros) + (1 - b2) * g * g
                d = np.sqrt(v / (1 - b2 ** t)) + eps
                p = p - lr * (1 - mu) / (1 - P) * g / d - lr * mu_next / (1 - P * mu_next) * m / d
    return p, s


def data(n, dtype, seed=0, steps=3):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) * (1 + i) for i in range(steps)]
    return p, grads


def run(opt, p, grads, lrs=LRS):
    p = p.copy()
    for g, lr in zip(grads, lrs):
        opt.step(p, g, lr)
    return p


def assert_close(actual, desired, scale, rtol, what):
    """|actual - desired| <= rtol * scale, element-wise: an error relative to the
    magnitude the computation went through (p can shrink from 0.2 to 0.004 by
    cancellation, keeping the rounding error of 0.2)."""
    err = np.abs(actual.astype(np.float64) - desired)
    worst = np.argmax(err - rtol * scale)
    assert np.all(err <= rtol * scale), (
        f"{what}[{worst}]: {actual[worst]!r} != {desired[worst]!r} (error {err[worst]:.3g}, "
        f"allowed {rtol * np.broadcast_to(scale, err.shape)[worst]:.3g})")


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("name, h", CASES, ids=IDS)
def test_matches_formula(name, h, dtype, rtol):
    p0, grads = data(301, dtype)
    opt = make_optimizer(name, **h)
    p = run(opt, p0, grads)
    p_ref, s_ref = reference(name, p0, grads, LRS, h)
    assert p.dtype == dtype and opt.t == 3
    assert_close(p, p_ref, np.maximum(np.abs(p0), np.abs(p_ref)), rtol, "p")
    d = opt.state_dict()
    for key, value in s_ref.items():  # the textbook state, under torch's names
        assert_close(np.asarray(d[key]), value, np.max(np.abs(value)), rtol, key)


@pytest.mark.parametrize("name, h", WITH_DECAY, ids=[n for n, _ in WITH_DECAY])
def test_chunking_is_invisible(name, h, monkeypatch):
    p0, grads = data(100, np.float32, seed=1)
    one = make_optimizer(name, **h)
    p_one = run(one, p0, grads)
    monkeypatch.setattr(optim, "CHUNK", 7)       # 15 chunks, the last of 2 elements
    many = make_optimizer(name, **h)
    p_many = run(many, p0, grads)
    np.testing.assert_array_equal(p_many, p_one)
    assert_same_state(many.state_dict(), one.state_dict())


@pytest.mark.parametrize("name, h", WITH_DECAY, ids=[n for n, _ in WITH_DECAY])
def test_shards_equal_the_whole(name, h, monkeypatch):
    monkeypatch.setattr(optim, "CHUNK", 16)      # shard boundary 37 is inside a chunk
    p0, grads = data(101, np.float32, seed=2)
    whole = run(make_optimizer(name, **h), p0, grads)
    left = run(make_optimizer(name, **h), p0[:37], [g[:37] for g in grads])
    right = run(make_optimizer(name, **h), p0[37:], [g[37:] for g in grads])
    np.testing.assert_array_equal(np.concatenate([left, right]), whole)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, h", WITH_DECAY, ids=[n for n, _ in WITH_DECAY])
def test_state_dict_round_trip_continues_bit_identically(name, h, dtype):
    p0, grads = data(50, dtype, seed=3, steps=5)
    straight = make_optimizer(name, **h)
    p_straight = run(straight, p0, grads, lrs=[0.01] * 5)

    first = make_optimizer(name, **h)
    p = run(first, p0, grads[:2], lrs=[0.01] * 2)
    saved = first.state_dict()
    first.step(p.copy(), grads[2], 0.01)         # later steps must not alter `saved`
    resumed = make_optimizer(name, **h)
    resumed.load_state_dict(saved)
    assert resumed.t == 2
    p = run(resumed, p, grads[2:], lrs=[0.01] * 3)
    np.testing.assert_array_equal(p, p_straight)
    assert_same_state(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize("name, h", WITH_DECAY, ids=[n for n, _ in WITH_DECAY])
def test_state_dict_survives_npz(name, h):
    """A checkpoint written with np.savez gives back 0-d arrays; they load the same."""
    p0, grads = data(20, np.float32, seed=4)
    opt = make_optimizer(name, **h)
    p = run(opt, p0, grads[:2])
    buf = io.BytesIO()
    np.savez(buf, **opt.state_dict())
    buf.seek(0)
    resumed = make_optimizer(name, **h)
    resumed.load_state_dict(dict(np.load(buf)))
    q = p.copy()
    opt.step(p, grads[2], 0.01)
    resumed.step(q, grads[2], 0.01)
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("name", ["adam", "nadam", "adamax", "adadelta", "rmsprop"])
def test_load_from_textbook_averages_only(name):
    """Without the internal sums, the textbook averages restore up to rounding."""
    p0, grads = data(40, np.float64, seed=5)
    straight = make_optimizer(name)
    p_straight = run(straight, p0, grads)
    first = make_optimizer(name)
    p = run(first, p0, grads[:2])
    textbook = {k: v for k, v in first.state_dict().items() if "_sum" not in k}
    resumed = make_optimizer(name)
    resumed.load_state_dict(textbook)
    resumed.step(p, grads[2], LRS[2])
    np.testing.assert_allclose(p, p_straight, rtol=1e-13, atol=1e-15)


def test_load_state_dict_rejects_what_does_not_fit():
    p0, grads = data(10, np.float32)
    opt = make_optimizer("adam", weight_decay=0.1)
    run(opt, p0, grads[:1])
    good = opt.state_dict()
    with pytest.raises(ConfigError, match="'adamax'"):
        make_optimizer("adamax", weight_decay=0.1).load_state_dict(good)
    with pytest.raises(ConfigError, match="weight_decay"):
        make_optimizer("adam").load_state_dict(good)
    with pytest.raises(ConfigError, match="exp_sum_sq"):
        make_optimizer("adam", weight_decay=0.1).load_state_dict(
            {k: v for k, v in good.items() if k not in ("exp_sum_sq", "exp_avg_sq")})
    with pytest.raises(ConfigError, match="exp_sum"):
        make_optimizer("adam", weight_decay=0.1).load_state_dict({**good, "exp_sum": good["exp_sum"][:5]})
    sized = make_optimizer("adam", weight_decay=0.1)
    run(sized, *data(11, np.float32)[:2])
    with pytest.raises(ConfigError, match="size"):
        sized.load_state_dict(good)
    assert sized.t == 3                           # unchanged by the failed load


def test_state_is_created_on_first_step_in_the_params_dtype():
    opt = make_optimizer("adam")
    assert opt.t == 0 and "size" not in opt.state_dict() and "exp_avg" not in opt.state_dict()
    p, grads = data(9, np.float64)
    opt.step(p, grads[0], 0.1)
    d = opt.state_dict()
    assert d["size"] == 9 and d["exp_sum"].dtype == np.float64 and d["name"] == "adam" and d["t"] == 1
    with pytest.raises(ConfigError, match="dtype"):
        opt.step(p.astype(np.float32), grads[0].astype(np.float32), 0.1)


@pytest.mark.parametrize("name, h", WITH_DECAY, ids=[n for n, _ in WITH_DECAY])
def test_grad_is_never_written(name, h):
    p, grads = data(30, np.float32)
    before = [g.copy() for g in grads]
    run(make_optimizer(name, **h), p, grads)
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b)


# ---- validation -------------------------------------------------------------------

@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_lr(lr):
    p, grads = data(5, np.float32)
    with pytest.raises(ConfigError, match=r"lr must be a finite number >= 0, got"):
        make_optimizer("sgd").step(p, grads[0], lr)


@pytest.mark.parametrize("name, hyper, key", [
    ("adam", {"betas": (float("nan"), 0.999)}, r"betas\[0\]"),
    ("nadam", {"betas": (0.9, 1.0)}, r"betas\[1\]"),
    ("adam", {"betas": 0.9}, "betas"),
    ("adam", {"eps": 0.0}, "eps"),
    ("momentum", {"momentum": -0.5}, "momentum"),
    ("sgd", {"weight_decay": -1e-4}, "weight_decay"),
    ("adadelta", {"rho": 1.0}, "rho"),
    ("rmsprop", {"alpha": True}, "alpha"),
    ("adagrad", {"lr_decay": float("inf")}, "lr_decay"),
])
def test_bad_hyperparameter_names_itself(name, hyper, key):
    with pytest.raises(ConfigError, match=f"{key} must be"):
        make_optimizer(name, **hyper)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'adamw'.*sgd, momentum, nesterov, .*nadam"):
        make_optimizer("adamw")


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'beta1'.*betas, eps, weight_decay"):
        make_optimizer("adam", beta1=0.9)


def test_size_mismatch():
    p, grads = data(8, np.float32)
    opt = make_optimizer("adam")
    with pytest.raises(ConfigError, match="grad"):
        opt.step(p, grads[0][:7], 0.1)
    opt.step(p, grads[0], 0.1)
    with pytest.raises(ConfigError, match="param has 7 elements .* state has 8"):
        opt.step(p[:7], grads[0][:7], 0.1)
    sgd = make_optimizer("sgd")                   # no state arrays, still one slice
    sgd.step(p, grads[0], 0.1)
    with pytest.raises(ConfigError, match="param has 7 elements"):
        sgd.step(p[:7], grads[0][:7], 0.1)
    restored = make_optimizer("sgd")
    restored.load_state_dict(sgd.state_dict())
    with pytest.raises(ConfigError, match="param has 7 elements .* state has 8"):
        restored.step(p[:7], grads[0][:7], 0.1)


def test_bad_arrays():
    p, grads = data(8, np.float32)
    opt = make_optimizer("sgd")
    with pytest.raises(ConfigError, match="param must be a 1-D floating"):
        opt.step(p.reshape(2, 4), grads[0].reshape(2, 4), 0.1)
    with pytest.raises(ConfigError, match="grad must be a 1-D floating"):
        opt.step(p, list(grads[0]), 0.1)
    with pytest.raises(ConfigError, match="must match"):
        opt.step(p, grads[0].astype(np.float64), 0.1)
    with pytest.raises(ConfigError, match="overlap"):
        opt.step(p, p, 0.1)
    assert opt.t == 0


# ---- torch, where installed -----------------------------------------------------------

def torch_optimizer(torch, name, h, param):
    h = dict(h)
    cls = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad", "adadelta": "Adadelta",
           "rmsprop": "RMSprop", "adam": "Adam", "adamax": "Adamax", "nadam": "NAdam"}[name]
    if name in ("momentum", "nesterov"):
        h["momentum"] = h.get("momentum", 0.9)    # our default; torch's is 0
        h["nesterov"] = name == "nesterov"
    return getattr(torch.optim, cls)([param], lr=LRS[0], foreach=False, **h)


@pytest.mark.parametrize("name, h", CASES, ids=IDS)
def test_matches_torch(name, h):
    torch = pytest.importorskip("torch", reason="the PyTorch reference: pip install -e '.[bench]'")
    p0, grads = data(301, np.float64, seed=6)
    p = run(make_optimizer(name, **h), p0, grads)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)      # NAdam's mu_product, step counters
    try:
        param = torch.tensor(p0, requires_grad=True)
        opt = torch_optimizer(torch, name, h, param)
        for g, lr in zip(grads, LRS):
            opt.param_groups[0]["lr"] = lr
            param.grad = torch.tensor(g)
            opt.step()
    finally:
        torch.set_default_dtype(default)
    np.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-12, atol=1e-15)


# ---- clipping ---------------------------------------------------------------------------

def test_clip_by_value():
    g = np.array([-3.0, -0.5, 0.0, 0.5, 3.0], np.float32)
    clip_by_value(g, 1.0)
    np.testing.assert_array_equal(g, [-1.0, -0.5, 0.0, 0.5, 1.0])
    with pytest.raises(ConfigError, match="clip must be a finite number > 0"):
        clip_by_value(g, 0.0)


def test_clip_by_global_norm_scales_only_above_max(monkeypatch):
    monkeypatch.setattr(optim, "CHUNK", 7)
    g = np.array([3.0, 4.0] * 10, np.float64)    # norm sqrt(250)
    norm = clip_by_global_norm(g, 100.0)
    assert norm == pytest.approx(250 ** 0.5, rel=1e-15)
    np.testing.assert_array_equal(g, [3.0, 4.0] * 10)
    norm = clip_by_global_norm(g, 5.0)
    assert norm == pytest.approx(250 ** 0.5, rel=1e-15)
    np.testing.assert_allclose(np.linalg.norm(g), 5.0 * norm / (norm + 1e-6), rtol=1e-14)


def test_clip_by_global_norm_is_accurate_in_float32():
    # 2**20 + 1 elements of 0.1 (in float32): a naive float32 running sum drifts.
    g = np.full(2 ** 20 + 1, 0.1, np.float32)
    exact = np.sqrt((g.astype(np.float64) ** 2).sum())
    assert clip_by_global_norm(g, 1e9) == pytest.approx(exact, rel=1e-12)


def test_clip_by_global_norm_leaves_non_finite_gradients_alone():
    g = np.array([1.0, np.inf, 2.0], np.float32)
    assert clip_by_global_norm(g, 1.0) == np.inf
    np.testing.assert_array_equal(g, [1.0, np.inf, 2.0])
    with pytest.raises(ConfigError, match="max_norm"):
        clip_by_global_norm(g, -1.0)
