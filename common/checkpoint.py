"""Saved models: the flat vectors and their layouts in one .npz, written atomically.

Every file here is an .npz archive of arrays plus one JSON string `meta`, readable
without pickle, written atomically (downpour.common.fileio). A saved model (`save_model`):

    params          float32 (P,)   the flat parameter vector
    buffers         float32 (Q,)   non-trainable state (batch-norm running statistics)
    meta            str            JSON: {"layout": ..., "buffer_layout": ..., "spec": ..., ...}
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import numpy as np

from downpour.common.errors import DataError
from downpour.common.fileio import atomic_write
from downpour.common.nn.layout import Layout

T = TypeVar("T")


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write `arrays` and JSON-able `meta` to one .npz at `path`, atomically, without pickle."""
    entries = {**arrays, "meta": np.array(json.dumps(meta))}
    atomic_write(path, lambda f: np.savez(f, **entries))


def check_not_replaced(path: str | os.PathLike, run_id: str, incarnation: int, what: str) -> None:
    """DataError if `path` holds a `what` of run `run_id` written by a newer incarnation of
    the same server (one that replaced this process): a stale server must write nothing."""
    if os.path.isfile(path):
        saved = load_meta(path, what)
        if saved.get("run_id") == run_id and saved.get("incarnation", 0) > incarnation:
            raise DataError(f"{path} was written by a newer server of this run (it replaced "
                            "this one): this stale server writes nothing")


def load_arrays(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and meta of a `save_arrays` file; DataError naming `what` if it is not one."""
    return _read(path, what, lambda z: ({k: z[k] for k in z.files if k != "meta"},
                                        json.loads(str(z["meta"]))))


def load_meta(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The meta of a `save_arrays` file, without reading its arrays; DataError as `load_arrays`."""
    return _read(path, what, lambda z: json.loads(str(z["meta"])))


def _read(path: str | os.PathLike, what: str, read: Callable[[Any], T]) -> T:
    """`read(the open archive)`; DataError naming `what` if `path` is missing or not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except FileNotFoundError:
        raise DataError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{str(path)!r} is not a downpour {what} ({e})") from None


def save_model(path: str | os.PathLike, params: np.ndarray, layout: Layout,
               buffers: np.ndarray | None = None, buffer_layout: Layout | None = None,
               **meta: Any) -> None:
    """Write the flat parameters, buffers, their layouts and `meta` (JSON-able) to `path`."""
    info = {"layout": layout.to_dict(),
            "buffer_layout": (buffer_layout or Layout([])).to_dict(), **meta}
    arrays = {"params": params,
              "buffers": buffers if buffers is not None else np.zeros(0, params.dtype)}
    save_arrays(path, arrays, info)


def load_model(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a saved model: params, buffers, layout, buffer_layout and the rest of meta."""
    arrays, meta = load_arrays(path, "saved model")
    try:
        params, buffers = arrays["params"], arrays["buffers"]
        layout = Layout.from_dict(meta.pop("layout"))
        buffer_layout = Layout.from_dict(meta.pop("buffer_layout"))
    except KeyError as e:
        raise DataError(f"{str(path)!r} is not a downpour saved model (no {e})") from None
    if params.shape != (layout.size,):
        raise DataError(f"{str(path)!r}: params has {params.size} elements, its layout {layout.size}")
    return {"params": params, "buffers": buffers, "layout": layout,
            "buffer_layout": buffer_layout, **meta}
