"""Element-wise optimizers over one slice of the flat parameter vector, and clipping.

A shard owns `param[lo:hi]` and that range's optimizer state; every optimizer here is
element-wise over a 1-D array, so a shard runs exactly, bit for bit, the update one
process would run on the same elements.

    opt = make_optimizer("adam", betas=(0.9, 0.999), weight_decay=1e-4)
    opt.step(param, grad, lr)     # param (n,) updated in place; grad (n,) only read

As in torch/optim/adam.py an optimizer is validated hyperparameters (torch's names and
defaults), state created by the first `step`, and the update math for one chunk
(`_update`, with the rule as math in the class docstring). `Optimizer.step` holds the
only loop: chunks of `CHUNK` elements, so that a chunk of param, grad, state and
scratch stays in cache while ~10 in-place ufuncs pass over it.

Exponential moving averages are kept as unnormalised sums: for torch's
`m <- b m + (1-b) g` we keep `M = m / (1-b)`, updated as `M <- b M + g`, and fold the
constants into per-step scalars. That saves one ufunc pass per average (Adam: 10
passes instead of 12; `downpour bench core` times it against torch's fused Adam, and
the README's "Measured" section has the figures). Results equal torch's formulas up
to rounding.
`state_dict()` gives both the sums (which restore bit-exactly) and the textbook
averages under torch's state names (exp_avg, exp_avg_sq, ...).
"""

import math

import numpy as np

from downpour.common.errors import ConfigError

CHUNK = 65536
"""Elements per chunk: 64 Ki float32 = 256 KiB per array (measured best of 16 Ki..256 Ki)."""

# hyperparameter -> (what it must be, test): torch's ranges, except that eps must be
# > 0 (0/0 where a gradient is 0) and decay rates < 1 (an average that never decays).
_AT_LEAST_0 = ("a finite number >= 0", lambda x: x >= 0)
_UNIT = ("a finite number in [0, 1)", lambda x: 0 <= x < 1)
_RULES = {"weight_decay": _AT_LEAST_0, "lr_decay": _AT_LEAST_0, "initial_accumulator_value": _AT_LEAST_0,
          "momentum_decay": _AT_LEAST_0, "momentum": _UNIT, "betas": _UNIT, "rho": _UNIT, "alpha": _UNIT,
          "eps": ("a finite number > 0", lambda x: x > 0)}


def _number(key, value, what="a finite number", ok=lambda x: True):
    """`value` (a real number or 0-d array) as a float, else ConfigError naming `key`."""
    value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(float(value))):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return float(value)


def _integer(key, value):
    value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
    return int(value)


def _hyper(key, value):
    """Validated, normalised value of one hyperparameter (a float or a pair of floats)."""
    if key == "betas":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), got {value!r}")
        return tuple(_number(f"betas[{i}]", b, *_RULES[key]) for i, b in enumerate(value))
    return _number(key, value, *_RULES[key])


class Optimizer:
    """Base class: validation, state, the chunk loop, weight decay, (de)serialisation.

    Subclasses set `name`, `defaults` (every hyperparameter with its default),
    `state_names` (per-element state arrays, in `_update`'s order) and `n_scratch`, and
    implement `_constants(lr)` (this step's scalars) and `_update` (one chunk's math).
    weight_decay is coupled L2 as in torch: the update sees g + weight_decay * p,
    computed into scratch; the caller's grad is never written.
    """

    name, defaults, state_names, n_scratch = "", {}, (), 1
    initial_scalars: dict = {}          # scalar state (NAdam's mu_product) -> initial value

    def __init__(self, **hyper):
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            raise ConfigError(f"optimizer {self.name!r} has no hyperparameter {unknown[0]!r}; "
                              f"valid ones: {', '.join(self.defaults)}")
        self.hyper = {k: _hyper(k, hyper.get(k, d)) for k, d in self.defaults.items()}
        self.t = 0                      # steps applied so far
        self.scalars = dict(self.initial_scalars)
        self._state = None              # tuple of (n,) arrays, created by the first step
        self._size = None               # n, fixed by the first step or by load_state_dict
        self._scratch = []              # (chunk,) arrays, reallocated if CHUNK or dtype change

    def _constants(self, lr):
        """This step's scalars, in `_update`'s order (self.t already counts the step)."""
        raise NotImplementedError

    def _update(self, p, g, state, scratch, k):
        """Update one chunk in place. p, g, state[i], scratch[i]: (c,) views; k: 0-d arrays."""
        raise NotImplementedError

    def _initial_value(self, state_name):
        return 0.0

    def _textbook(self):
        """{torch's state name: (internal state name, factor)}; textbook = factor * internal."""
        return {}

    def step(self, param, grad, lr):
        """Apply one update to `param` in place; `grad` is only read.

        param, grad: 1-D floating arrays of one length and dtype, param writeable, not
        overlapping. Raises ConfigError on a bad lr or array, or if the size or dtype
        differs from the state's (one optimizer serves one slice). Gradient values are
        not checked: whoever receives a push validates it.
        """
        lr = _number("lr", lr, "a finite number >= 0", lambda x: x >= 0)
        self._check_arrays(param, grad)
        n, dtype = param.shape[0], param.dtype
        if self._state is None:
            self._state = tuple(np.full(n, self._initial_value(s), dtype) for s in self.state_names)
            self._size = n
        self.t += 1
        k = tuple(np.array(c, dtype) for c in self._constants(lr))  # 0-d: the fast ufunc path
        wd = np.array(self.hyper["weight_decay"], dtype)
        chunk = max(1, min(CHUNK, n))
        scratch = self._get_scratch(chunk, dtype, self.n_scratch + bool(wd))
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            p, g = param[lo:hi], grad[lo:hi]
            s = scratch if hi - lo == chunk else [b[:hi - lo] for b in scratch]
            if wd:
                g = add(mul(p, wd, s[-1]), g, s[-1])                  # g' = g + wd p
            self._update(p, g, [a[lo:hi] for a in self._state], s[:self.n_scratch], k)

    def adopt_state(self, arrays, initialise: bool) -> None:
        """Keep the state in `arrays` (one 1-D array per name in `state_names`, e.g. views
        of shared memory) instead of arrays of its own; fill them with the initial state
        if `initialise`. Several optimizers may share them (Hogwild!)."""
        arrays = tuple(arrays)
        if len(arrays) != len(self.state_names) or len({(a.shape, a.dtype) for a in arrays}) > 1 \
                or any(a.ndim != 1 for a in arrays):
            raise ConfigError(f"{self.name} needs {len(self.state_names)} state arrays "
                              f"({', '.join(self.state_names)}) of one 1-D shape and dtype")
        if initialise:
            for name, a in zip(self.state_names, arrays):
                a[:] = self._initial_value(name)
        if arrays:
            self._state, self._size = arrays, arrays[0].shape[0]

    def state_dict(self, textbook=True):
        """Name, hyperparameters, t, scalar state and, after the first step, `size` and
        copies of the state arrays: the internal sums, which restore exactly, and (unless
        `textbook` is False) the textbook averages under torch's state names (exp_avg, ...)."""
        d = {"name": self.name, "t": self.t, **self.hyper, **self.scalars}
        if self._state is not None:
            d["size"] = self._size
            d.update((s, a.copy()) for s, a in zip(self.state_names, self._state))
            for tb, (s, f) in (self._textbook() if textbook else {}).items():
                d[tb] = self._state[self.state_names.index(s)] * f
        return d

    def load_state_dict(self, d):
        """Restore a `state_dict()`; stepping on then continues bit-identically.

        Hyperparameters in `d` must equal this optimizer's (build it with the
        checkpoint's settings). An internal sum may be missing if its textbook average
        is there (then it is restored up to rounding). Raises ConfigError on another
        name, hyperparameter, size or dtype or a missing entry, leaving `self` unchanged.
        """
        missing = [k for k in ("name", "t", *self.hyper, *self.scalars) if k not in d]
        if missing:
            raise ConfigError(f"{self.name} state_dict has no {missing[0]!r}; was it made by state_dict()?")
        name = d["name"].item() if isinstance(d["name"], np.ndarray) else d["name"]
        if name != self.name:
            raise ConfigError(f"state_dict is for optimizer {name!r}, not {self.name!r}")
        for key, mine in self.hyper.items():
            if _hyper(key, d[key]) != mine:
                raise ConfigError(f"state_dict has {key}={d[key]!r} but this optimizer has {key}={mine!r}; "
                                  f"construct it with the checkpoint's hyperparameters")
        t, state, size = _integer("t", d["t"]), None, None
        scalars = {s: _number(s, d[s]) for s in self.scalars}
        if t > 0:
            size = _integer("size", d.get("size"))
            if self._size is not None and size != self._size:
                raise ConfigError(f"state_dict size {size} differs from this optimizer's {self._size}")
            state = tuple(self._load_array(d, s, size) for s in self.state_names)
            if len({a.dtype for a in state}) > 1:
                raise ConfigError(f"{self.name} state arrays differ in dtype: "
                                  f"{[a.dtype.name for a in state]}")
        self.t, self.scalars, self._state, self._size = t, scalars, state, size

    def _load_array(self, d, s, size):
        """State array `s` from `d`: a copy of d[s], else the sum made from its average."""
        tb = [(name, f) for name, (s2, f) in self._textbook().items() if s2 == s]
        a = d.get(s)
        if a is None and tb and isinstance(d.get(tb[0][0]), np.ndarray):
            avg = d[tb[0][0]]
            a = avg / np.array(tb[0][1], avg.dtype)
        if not (isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.shape == (size,)):
            also = f" (or {tb[0][0]!r})" if tb else ""
            got = f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            raise ConfigError(f"{self.name} state_dict {s!r}{also} must be a floating array of shape "
                              f"({size},), got {got}")
        return np.array(a, order="C", copy=True)

    def _check_arrays(self, param, grad):
        for what, a in (("param", param), ("grad", grad)):
            if not (isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind == "f"):
                raise ConfigError(f"{what} must be a 1-D floating numpy array, got "
                                  f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise ConfigError(f"grad ({grad.dtype}, {grad.shape[0]} elements) must match "
                              f"param ({param.dtype}, {param.shape[0]} elements)")
        if not param.flags.writeable or np.may_share_memory(param, grad):
            raise ConfigError("param must be writeable and must not overlap grad: the update is in place")
        if self._size is not None and param.shape[0] != self._size:
            raise ConfigError(f"param has {param.shape[0]} elements but this {self.name} optimizer's "
                              f"state has {self._size}: one optimizer serves one fixed slice")
        if self._state and param.dtype != self._state[0].dtype:
            raise ConfigError(f"param dtype {param.dtype} differs from the state's {self._state[0].dtype}")

    def _get_scratch(self, chunk, dtype, count):
        if [(b.shape[0], b.dtype) for b in self._scratch] != [(chunk, dtype)] * count:
            self._scratch = [np.empty(chunk, dtype) for _ in range(count)]
        return self._scratch

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hyper.items())})"


# Shorthands for the in-place ufuncs of the update rules: mul(a, b, out) etc.
mul, add, sub, div, sqrt = np.multiply, np.add, np.subtract, np.divide, np.sqrt


# ---- the optimizers: one chunk's math each ----------------------------------------


class SGD(Optimizer):
    """Plain stochastic gradient descent (torch.optim.SGD, momentum=0).

        p <- p - lr * g
    """

    name, defaults = "sgd", {"weight_decay": 0.0}

    def _constants(self, lr):
        return (lr,)

    def _update(self, p, g, state, scratch, k):
        (lr,), (s,) = k, scratch
        sub(p, mul(g, lr, s), p)


class Momentum(SGD):
    """Heavy-ball momentum (torch.optim.SGD, momentum=mu, dampening=0).

        b <- mu * b + g
        p <- p - lr * b
    """

    name, defaults = "momentum", {"momentum": 0.9, "weight_decay": 0.0}
    state_names = ("momentum_buffer",)

    def _constants(self, lr):
        return lr, self.hyper["momentum"]

    def _update(self, p, g, state, scratch, k):
        (lr, mu), (b,), (s,) = k, state, scratch
        add(mul(b, mu, b), g, b)
        sub(p, mul(b, lr, s), p)


class Nesterov(Momentum):
    """Nesterov momentum in torch's form, which needs no look-ahead gradient
    (torch.optim.SGD, momentum=mu, nesterov=True).

        b <- mu * b + g
        p <- p - lr * (g + mu * b)
    """

    name = "nesterov"

    def _update(self, p, g, state, scratch, k):
        (lr, mu), (b,), (s,) = k, state, scratch
        add(mul(b, mu, b), g, b)
        add(mul(b, mu, s), g, s)
        sub(p, mul(s, lr, s), p)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad).

        G <- G + g^2                                   G starts at initial_accumulator_value
        p <- p - lr_t * g / (sqrt(G) + eps),           lr_t = lr / (1 + (t - 1) * lr_decay)
    """

    name = "adagrad"
    defaults = {"lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10, "weight_decay": 0.0}
    state_names = ("sum",)

    def _initial_value(self, state_name):
        return self.hyper["initial_accumulator_value"]

    def _constants(self, lr):
        return lr / (1 + (self.t - 1) * self.hyper["lr_decay"]), self.hyper["eps"]

    def _update(self, p, g, state, scratch, k):
        (clr, eps), (G,), (s,) = k, state, scratch
        add(G, mul(g, g, s), G)
        add(sqrt(G, s), eps, s)
        sub(p, mul(div(g, s, s), clr, s), p)


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta; the caller's lr scales the step, torch's default is 1).

        v <- rho v + (1 - rho) g^2
        d  = sqrt(u + eps) / sqrt(v + eps) * g
        u <- rho u + (1 - rho) d^2
        p <- p - lr * d

    Kept as sums V = v / (1-rho), U = u / (1-rho), so with e = eps / (1-rho):
        V <- rho V + g^2,   d = sqrt((U + e) / (V + e)) * g,   U <- rho U + d^2
    """

    name, defaults = "adadelta", {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}
    state_names, n_scratch = ("square_sum", "acc_delta_sum"), 2

    def _textbook(self):
        f = 1 - self.hyper["rho"]
        return {"square_avg": ("square_sum", f), "acc_delta": ("acc_delta_sum", f)}

    def _constants(self, lr):
        rho = self.hyper["rho"]
        return lr, rho, self.hyper["eps"] / (1 - rho)

    def _update(self, p, g, state, scratch, k):
        (lr, rho, e), (V, U), (s, d) = k, state, scratch
        add(mul(V, rho, V), mul(g, g, s), V)
        div(add(U, e, d), add(V, e, s), d)
        mul(sqrt(d, d), g, d)                                       # d, the step
        add(mul(U, rho, U), mul(d, d, s), U)
        sub(p, mul(d, lr, d), p)


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop, momentum=0, centered=False).

        v <- alpha v + (1 - alpha) g^2
        p <- p - lr * g / (sqrt(v) + eps)

    Kept as the sum V = v / (1-alpha); with c = sqrt(1 - alpha):
        V <- alpha V + g^2,   p <- p - (lr / c) * g / (sqrt(V) + eps / c)
    """

    name, defaults = "rmsprop", {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0}
    state_names = ("square_sum",)

    def _textbook(self):
        return {"square_avg": ("square_sum", 1 - self.hyper["alpha"])}

    def _constants(self, lr):
        alpha = self.hyper["alpha"]
        c = math.sqrt(1 - alpha)
        return alpha, lr / c, self.hyper["eps"] / c

    def _update(self, p, g, state, scratch, k):
        (alpha, K, e), (V,), (s,) = k, state, scratch
        add(mul(V, alpha, V), mul(g, g, s), V)
        div(g, add(sqrt(V, s), e, s), s)
        sub(p, mul(s, K, s), p)


class Adam(Optimizer):
    """Adam (torch.optim.Adam, amsgrad=False).

        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

    Kept as sums M = m / (1-b1), V = v / (1-b2) (2 and 3 ufuncs instead of 3 and 4):
        M <- b1 M + g,  V <- b2 V + g^2,  p <- p - K * M / (sqrt(V) + eps / c)
    with c = sqrt((1 - b2) / (1 - b2^t)) and K = lr (1 - b1) / ((1 - b1^t) c).
    """

    name, defaults = "adam", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    state_names = ("exp_sum", "exp_sum_sq")

    def _textbook(self):
        b1, b2 = self.hyper["betas"]
        return {"exp_avg": ("exp_sum", 1 - b1), "exp_avg_sq": ("exp_sum_sq", 1 - b2)}

    def _constants(self, lr):
        (b1, b2), t = self.hyper["betas"], self.t
        c = math.sqrt((1 - b2) / (1 - b2 ** t))
        return b1, b2, lr * (1 - b1) / ((1 - b1 ** t) * c), self.hyper["eps"] / c

    def _update(self, p, g, state, scratch, k):
        (b1, b2, K, e), (M, V), (s,) = k, state, scratch
        add(mul(M, b1, M), g, M)
        add(mul(V, b2, V), mul(g, g, s), V)
        add(sqrt(V, s), e, s)
        sub(p, mul(div(M, s, s), K, s), p)


class Adamax(Optimizer):
    """Adamax (torch.optim.Adamax).

        m <- b1 m + (1 - b1) g
        u <- max(b2 u, |g| + eps)
        p <- p - lr / (1 - b1^t) * m / u

    Kept as the sum M = m / (1-b1):  M <- b1 M + g,  p <- p - lr (1-b1) / (1-b1^t) * M / u.
    """

    name, defaults = "adamax", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    state_names = ("exp_sum", "exp_inf")

    def _textbook(self):
        return {"exp_avg": ("exp_sum", 1 - self.hyper["betas"][0])}

    def _constants(self, lr):
        b1, b2 = self.hyper["betas"]
        return b1, b2, self.hyper["eps"], lr * (1 - b1) / (1 - b1 ** self.t)

    def _update(self, p, g, state, scratch, k):
        (b1, b2, eps, K), (M, u), (s,) = k, state, scratch
        add(mul(M, b1, M), g, M)
        np.maximum(mul(u, b2, u), add(np.abs(g, out=s), eps, s), out=u)
        sub(p, mul(div(M, u, s), K, s), p)


class NAdam(Adam):
    """NAdam (torch.optim.NAdam, decoupled_weight_decay=False).

        mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay)),  P_t = mu_1 mu_2 ... mu_t
        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        d  = sqrt(v / (1 - b2^t)) + eps
        p <- p - lr (1 - mu_t) / (1 - P_t) * g / d - lr mu_{t+1} / (1 - P_t mu_{t+1}) * m / d

    Kept as sums M = m / (1-b1), V = v / (1-b2); with c = sqrt((1-b2) / (1-b2^t)),
    d = c * (sqrt(V) + eps / c) and the two factors absorb 1 / c and (1 - b1).
    P_t is the scalar state `mu_product` (a Python float, like torch's float64 tensor).
    """

    name = "nadam"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "momentum_decay": 4e-3, "weight_decay": 0.0}
    n_scratch, initial_scalars = 2, {"mu_product": 1.0}      # state_names, _textbook: Adam's

    def _constants(self, lr):
        """Also advances mu_product to P_t."""
        (b1, b2), t, psi = self.hyper["betas"], self.t, self.hyper["momentum_decay"]
        mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        self.scalars["mu_product"] *= mu
        P = self.scalars["mu_product"]
        c = math.sqrt((1 - b2) / (1 - b2 ** t))
        A = lr * (1 - mu) / ((1 - P) * c)
        B = lr * mu_next * (1 - b1) / ((1 - P * mu_next) * c)
        return b1, b2, A, B, self.hyper["eps"] / c

    def _update(self, p, g, state, scratch, k):
        (b1, b2, A, B, e), (M, V), (s, d) = k, state, scratch
        add(mul(M, b1, M), g, M)
        add(mul(V, b2, V), mul(g, g, s), V)
        add(mul(g, A, s), mul(M, B, d), s)                          # A g + B M
        add(sqrt(V, d), e, d)
        sub(p, div(s, d, s), p)


_REGISTRY = {cls.name: cls
             for cls in (SGD, Momentum, Nesterov, Adagrad, Adadelta, RMSprop, Adam, Adamax, NAdam)}
OPTIMIZERS = tuple(_REGISTRY)


def make_optimizer(name, **hyper):
    """The optimizer registered as `name` (one of OPTIMIZERS), built with `hyper`.

    Raises ConfigError for an unknown name or hyperparameter, or a bad value."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return _REGISTRY[name](**hyper)


# ---- gradient clipping: done by the worker, which holds the whole gradient ----------

def clip_by_value(grad, clip):
    """Clamp every element of `grad` (a floating array) to [-clip, clip], in place."""
    clip = _number("clip", clip, "a finite number > 0", lambda x: x > 0)
    np.clip(grad, -clip, clip, out=grad)


def clip_by_global_norm(grad, max_norm):
    """Scale `grad` (1-D floating) in place so its L2 norm is at most `max_norm`.

    Returns the norm before clipping, accumulated in float64 over chunks. As in torch's
    clip_grad_norm_, the factor is max_norm / (norm + 1e-6), applied when below 1. A
    non-finite norm leaves grad unchanged: the caller should drop that gradient.
    """
    max_norm = _number("max_norm", max_norm, "a finite number > 0", lambda x: x > 0)
    if not (isinstance(grad, np.ndarray) and grad.ndim == 1 and grad.dtype.kind == "f"):
        raise ConfigError(f"grad must be a 1-D floating numpy array, got {type(grad).__name__}")
    n = grad.shape[0]
    buf = np.empty(min(CHUNK, n), np.float64)
    total = 0.0
    for lo in range(0, n, CHUNK):
        b = buf[:min(CHUNK, n - lo)]
        np.copyto(b, grad[lo:lo + CHUNK])
        total += float(np.dot(b, b))
    norm = math.sqrt(total)
    coef = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and coef < 1:
        mul(grad, np.array(coef, grad.dtype), grad)
    return norm
