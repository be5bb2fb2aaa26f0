"""Learning-rate schedules: the update count t maps to a learning rate.

    sched = parse_schedule("step:every=1000,gamma=0.5", lr=0.1)
    opt.step(param, grad, sched(opt.t))     # t: optimizer steps already applied, from 0

A schedule returns `base_lr_at(t) * scale`. The kinds, with their spec keys:

    constant                           eta0
    inverse  k                         eta0 / (1 + k t)
    exp      gamma, every=1            eta0 * gamma^(t / every)
    step     every, gamma=0.1          eta0 * gamma^floor(t / every)
    plateau  factor=0.5, patience=2,   eta0, while `scale` is multiplied by factor each
             threshold=1e-4, min_lr=0  time `patience` observed metrics in a row fail to
                                       beat the best (relative threshold, as torch's
                                       ReduceLROnPlateau mode='min', threshold_mode='rel')

`scale` is a plain attribute (1.0 at the start) because in distributed mode the
scheduler process owns the plateau logic (`observe`) and tells the servers the scale.
Unlike torch, which waits for patience + 1 bad epochs, plateau cuts at the
`patience`-th bad observation in a row. `min_lr` floors the scale at min_lr / eta0.
"""

import math
import numbers

from downpour.common.errors import ConfigError

# key -> (what it must be, test, integer?)
_KEYS = {
    "k": ("a finite number >= 0", lambda x: x >= 0, False),
    "gamma": ("a finite number in (0, 1]", lambda x: 0 < x <= 1, False),
    "every": ("an integer >= 1", lambda x: x >= 1, True),
    "factor": ("a finite number in (0, 1)", lambda x: 0 < x < 1, False),
    "patience": ("an integer >= 1", lambda x: x >= 1, True),
    "threshold": ("a finite number in [0, 1)", lambda x: 0 <= x < 1, False),
    "min_lr": ("a finite number >= 0", lambda x: x >= 0, False),
}


def _real(key, value, what, ok=lambda x: True, integer=False):
    """`value` as a float (an int if `integer`), else ConfigError naming `key`."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(value) and (not integer or float(value).is_integer())):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return int(value) if integer else float(value)


class Schedule:
    """The constant schedule, and the base of the others: call it with t, get an lr.

    Subclasses set `kind`, `keys` ({key: default, None if required}), `example` (a
    valid spec) and override `base_lr_at`; a plateau schedule also `observe`.
    """

    kind, keys, example = "constant", {}, "constant"

    def __init__(self, lr, **keys):
        """Raise ConfigError for a bad lr, an unknown or missing key or a bad value."""
        self.lr = _real("lr", lr, "a finite number >= 0", lambda x: x >= 0)
        unknown = sorted(set(keys) - set(self.keys))
        if unknown:
            valid = ", ".join(self.keys) or "none"
            raise ConfigError(f"schedule {self.kind!r} has no key {unknown[0]!r} (valid keys: {valid})")
        for key, default in self.keys.items():
            if keys.get(key, default) is None:
                raise ConfigError(f"schedule {self.kind!r} needs a value for {key!r}")
            setattr(self, key, _real(key, keys.get(key, default), *_KEYS[key]))
        self.scale = 1.0

    def base_lr_at(self, t):
        return self.lr

    def __call__(self, t):
        """The learning rate after t >= 0 optimizer steps: base_lr_at(t) * scale."""
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"t must be an integer >= 0 (optimizer steps applied), got {t!r}")
        return self.base_lr_at(int(t)) * self.scale

    def observe(self, metric):
        """Record a validation metric (lower is better); True if `scale` changed.
        Only the plateau schedule reacts; the others return False."""
        return False

    def state_dict(self):
        return {"kind": self.kind, "scale": self.scale}

    def load_state_dict(self, d):
        """Restore a `state_dict()` of the same kind; ConfigError if it does not fit."""
        if d.get("kind") != self.kind:
            raise ConfigError(f"schedule state_dict is for kind {d.get('kind')!r}, not {self.kind!r}")
        self.scale = _real("scale", d.get("scale"), "a finite number > 0", lambda x: x > 0)

    def __repr__(self):
        keys = "".join(f", {k}={getattr(self, k)!r}" for k in self.keys)
        return f"{type(self).__name__}(lr={self.lr!r}{keys}, scale={self.scale!r})"


class Inverse(Schedule):
    """eta0 / (1 + k t)"""

    kind, keys, example = "inverse", {"k": None}, "inverse:k=0.001"

    def base_lr_at(self, t):
        return self.lr / (1 + self.k * t)


class Exponential(Schedule):
    """eta0 * gamma^(t / every): a smooth decay by gamma per `every` steps."""

    kind, keys, example = "exp", {"gamma": None, "every": 1}, "exp:gamma=0.999"

    def base_lr_at(self, t):
        return self.lr * self.gamma ** (t / self.every)


class StepDecay(Schedule):
    """eta0 * gamma^floor(t / every): a cut by gamma every `every` steps."""

    kind, keys, example = "step", {"every": None, "gamma": 0.1}, "step:every=1000,gamma=0.5"

    def base_lr_at(self, t):
        return self.lr * self.gamma ** (t // self.every)


class Plateau(Schedule):
    """eta0 * scale, where observe() cuts scale by `factor` on a plateau of the metric.

    An observation improves if metric < best * (1 - threshold); `bad` counts the
    observations in a row that did not. When bad reaches `patience`, scale becomes
    max(scale * factor, min_scale) and bad restarts at 0. min_scale = min_lr / eta0.
    """

    kind, example = "plateau", "plateau:factor=0.5,patience=2"
    keys = {"factor": 0.5, "patience": 2, "threshold": 1e-4, "min_lr": 0.0}

    def __init__(self, lr, **keys):
        super().__init__(lr, **keys)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be <= lr ({self.lr!r}), got {self.min_lr!r}")
        self.min_scale = self.min_lr / self.lr if self.lr > 0 else 0.0
        self.best = math.inf     # best metric so far
        self.bad = 0             # observations in a row that did not improve on best

    def observe(self, metric):
        """Record a validation metric (lower is better; NaN and inf never improve).
        Returns True if this observation changed `scale`."""
        if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
            raise ConfigError(f"metric must be a number, got {metric!r}")
        metric = float(metric)
        if metric < self.best * (1 - self.threshold):
            self.best, self.bad = metric, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.bad = 0
        old, self.scale = self.scale, max(self.scale * self.factor, self.min_scale)
        return self.scale < old

    def state_dict(self):
        return {**super().state_dict(), "best": self.best, "bad": self.bad}

    def load_state_dict(self, d):
        best = d.get("best")
        if isinstance(best, bool) or not isinstance(best, numbers.Real) or math.isnan(best):
            raise ConfigError(f"plateau state_dict best must be a number or inf, got {best!r}")
        bad = _real("bad", d.get("bad"), "an integer >= 0", lambda x: x >= 0, integer=True)
        super().load_state_dict(d)
        self.best, self.bad = float(best), bad


_KINDS = {cls.kind: cls for cls in (Schedule, Inverse, Exponential, StepDecay, Plateau)}
SCHEDULES = tuple(_KINDS)


def parse_schedule(spec, lr):
    """The schedule described by `spec`, starting at learning rate `lr`.

    spec: `kind` or `kind:key=value,key=value`, e.g. "constant", "inverse:k=0.001",
    "exp:gamma=0.999", "step:every=1000,gamma=0.5", "plateau:factor=0.5,patience=2".
    Raises ConfigError quoting the spec, naming the key and showing valid syntax.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a learning-rate schedule must be a string like 'exp:gamma=0.999', got {spec!r}")
    kind, _, rest = spec.partition(":")
    cls = _KINDS.get(kind.strip())
    if cls is None:
        raise ConfigError(f"learning-rate schedule {spec!r}: unknown kind {kind.strip()!r}; valid kinds: "
                          f"{', '.join(SCHEDULES)}; e.g. 'step:every=1000,gamma=0.5'")

    def bad(why):
        return ConfigError(f"learning-rate schedule {spec!r}: {why}; e.g. {cls.example!r}")

    values = {}
    for item in rest.split(",") if rest.strip() else []:
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise bad(f"{item.strip()!r} is not key=value")
        if key not in cls.keys:
            raise bad(f"unknown key {key!r} for {cls.kind!r} (valid keys: {', '.join(cls.keys) or 'none'})")
        if key in values:
            raise bad(f"key {key!r} is given twice")
        try:
            values[key] = float(text)
        except ValueError:
            raise bad(f"{key}={text!r} is not a number") from None
    try:
        return cls(lr, **values)
    except ConfigError as e:
        raise bad(str(e)) from None
