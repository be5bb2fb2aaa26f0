"""Saved models: the flat vectors and their layouts in one .npz, written atomically.

A saved model (`save_model`) is an .npz archive, readable without pickle:

    params          float32 (P,)   the flat parameter vector
    buffers         float32 (Q,)   non-trainable state (batch-norm running statistics)
    meta            str            JSON: {"layout": ..., "buffer_layout": ..., "spec": ..., ...}
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from common.errors import DataError
from common.fileio import atomic_write
from common.layout import Layout


def save_model(path: str | os.PathLike, params: np.ndarray, layout: Layout,
               buffers: np.ndarray | None = None, buffer_layout: Layout | None = None,
               **meta: Any) -> None:
    """Write the flat parameters, buffers, their layouts and `meta` (JSON-able) to `path`."""
    info = {"layout": layout.to_dict(),
            "buffer_layout": (buffer_layout or Layout([])).to_dict(), **meta}
    arrays = {"params": params,
              "buffers": buffers if buffers is not None else np.zeros(0, params.dtype),
              "meta": np.array(json.dumps(info))}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_model(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a saved model: params, buffers, layout, buffer_layout and the rest of meta."""
    try:
        with np.load(path, allow_pickle=False) as z:
            params, buffers, meta = z["params"], z["buffers"], json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise DataError(f"saved model {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{str(path)!r} is not a downpour saved model ({e})") from None
    layout, buffer_layout = Layout.from_dict(meta.pop("layout")), Layout.from_dict(meta.pop("buffer_layout"))
    if params.shape != (layout.size,):
        raise DataError(f"{str(path)!r}: params has {params.size} elements, its layout {layout.size}")
    return {"params": params, "buffers": buffers, "layout": layout,
            "buffer_layout": buffer_layout, **meta}
