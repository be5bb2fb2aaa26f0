"""Central finite differences, the reference every analytic gradient is checked against."""

import numpy as np

from downpour.common.nn.layers import Dropout


def numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d a by central differences, perturbing `a` in place one element at a time."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||), 0 when both are 0."""
    den = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return 0.0 if den == 0 else float(np.linalg.norm(analytic - numeric) / den)


def bind(layer, rng):
    """Give a layer float64 parameters (random) and gradient/buffer arrays of its own."""
    params = {n: rng.standard_normal(s) for n, s, _ in layer.param_specs()}
    grads = {n: np.zeros(s) for n, s, _ in layer.param_specs()}
    buffers = {n: rng.uniform(0.5, 1.5, s) for n, s, _ in layer.buffer_specs()}
    layer.bind(params, grads, buffers)
    return params, grads


def check_layer(layer, x, train, rng, before_forward=lambda: None, tol=1e-6):
    """f(x, params) = sum(forward(x) * R); compare backward(R) with finite differences
    for the input and every parameter. Returns dx."""
    params, grads = bind(layer, rng)
    y = layer.forward(x, train)
    R = rng.standard_normal(y.shape)

    def f():
        before_forward()
        return float(np.sum(layer.forward(x, train) * R))

    before_forward()
    layer.forward(x, train)
    dx = layer.backward(R)
    dx = None if dx is None else dx.copy()
    analytic = {n: g.copy() for n, g in grads.items()}
    if dx is not None:
        err = rel_error(dx, numeric_grad(f, x))
        assert err < tol, f"{type(layer).__name__} input: relative error {err:.2e}"
    for name, p in params.items():
        err = rel_error(analytic[name], numeric_grad(f, p))
        assert err < tol, f"{type(layer).__name__}.{name}: relative error {err:.2e}"
    return dx


def check_model(model, x, y, tol=1e-6):
    """A float64 Model's loss_and_grad against finite differences over its whole flat vector
    (dropout draws the same masks at every evaluation)."""
    dropouts = [layer for layer in model.layers if isinstance(layer, Dropout)]

    def f():
        for i, layer in enumerate(dropouts):          # the same masks at every evaluation
            layer.rng = np.random.default_rng(i)
        return model.loss_and_grad(x, y)

    f()
    analytic = model.grads.copy()
    err = rel_error(analytic, numeric_grad(f, model.params))
    assert err < tol, f"model gradient: relative error {err:.2e}"
