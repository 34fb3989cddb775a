"""Export: a protocol's figures as JSON (:func:`save_json`) and features for other tools
(:func:`export_features`, npz or Parquet), each file replaced atomically or written whole."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from .featureset import Features

__all__ = ["export_features", "save_json"]


def save_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Write a protocol's figures as JSON (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(dict(result)), indent=1))


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds (readers
    never see a half-written file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_features(f: Features, path: str | Path, fmt: Literal["npz", "parquet"] = "npz") -> Path:
    """Write ``f`` for other tools, atomically (a temporary file in the same folder, then a
    rename): per row ``entry, study, series, part, patient, modality``, ``slice``, ``labels``
    (JSON) and the features ``x``.

    npz: missing strings as ``""``, ``slice`` -1 at series level, ``x`` an (n, D) array.
    Parquet: string columns (null where missing), ``slice`` int32 (null at series level),
    ``x`` a ``fixed_size_list<float32>[D]`` column; ``space``, ``level``, ``kind`` and
    ``model`` (JSON) in the schema metadata."""
    if fmt not in ("npz", "parquet"):
        raise InputError(f"unknown export format {fmt!r}; expected npz or parquet.")
    path = Path(path)
    cols = ("entry", "study", "series", "part", "patient", "modality")
    labels = [json.dumps(r["labels"], sort_keys=True) for r in f.rows]
    slices = [r["slice"] for r in f.rows]
    with _replacing(path) as tmp:
        if fmt == "npz":
            arrays: dict[str, Any] = {
                c: np.asarray([str(r[c] or "") for r in f.rows]) for c in cols
            }
            arrays["x"] = f.x
            arrays["slice"] = np.asarray([-1 if s is None else s for s in slices])
            arrays["labels"] = np.asarray(labels)
            with tmp.open("xb") as fh:
                np.savez(fh, **arrays)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            x = np.ascontiguousarray(f.x, dtype=np.float32)
            columns = {
                c: pa.array([None if r[c] is None else str(r[c]) for r in f.rows], pa.string())
                for c in cols
            }
            columns["slice"] = pa.array(slices, pa.int32())
            columns["labels"] = pa.array(labels, pa.string())
            columns["x"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            meta = {"space": f.space, "level": f.level, "kind": f.kind}
            meta["model"] = json.dumps(f.meta.get("model"), sort_keys=True)
            pq.write_table(pa.table(columns, metadata=meta), tmp)
    return path
