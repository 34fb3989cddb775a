"""Features: a store read in one pass into a matrix and one row description per vector.

:func:`features` reads every entry of one space (series or slice level, one of
:data:`KINDS`) into a :class:`Features` value; :func:`read_labels` reads labels from CSV or
Parquet to join onto its rows; :func:`pool_slices` pools slice features per volume (the 3D
classification protocol).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from ..pseudonyms import DEFAULT_TENANT
from ..store import EmbeddingStore
from ..store.spaces import choose_space

__all__ = ["KINDS", "Features", "Kind", "Level", "features", "pool_slices", "read_labels"]

Level = Literal["series", "slice"]
Kind = Literal["pooled", "cls", "cls_last4", "cls+meanpatch", "cls_last4+meanpatch"]
KINDS: tuple[Kind, ...] = ("pooled", "cls", "cls_last4", "cls+meanpatch", "cls_last4+meanpatch")
LAST = 4  # blocks whose CLS the cls_last4 kinds concatenate


@dataclass
class Features:
    """Feature vectors ``x`` (n, D) and, per row, where it came from and its labels."""

    x: np.ndarray
    rows: list[dict[str, Any]]
    level: Level
    kind: Kind
    space: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray | Sequence[int]) -> Features:
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, x=self.x[idx], rows=[self.rows[i] for i in idx])

    def labels(self, name: str) -> np.ndarray:
        """The label ``name`` of each row as strings (None where a row has none)."""
        out = [r["labels"].get(name) for r in self.rows]
        return np.asarray([None if v is None else str(v) for v in out], dtype=object)

    def label_sets(self, name: str) -> list[frozenset[str] | None]:
        """The label ``name`` of each row as a set of class names: the value split on ``|``
        (ChestX-ray14's ``Effusion|Nodule``); ``""`` is the empty set (no positive class),
        None where a row has no value. ``No Finding`` is a class like any other: drop those
        rows or values beforehand to leave it out."""
        return [
            None if v is None else frozenset(c.strip() for c in v.split("|") if c.strip())
            for v in self.labels(name)
        ]

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        first = parts[0]
        x = np.concatenate([p.x for p in parts])
        return replace(first, x=x, rows=[r for p in parts for r in p.rows])

    def labelled(self, name: str) -> Features:
        return self.take([i for i, v in enumerate(self.labels(name)) if v is not None])


def read_labels(path: str | Path) -> dict[str, dict[str, Any]]:
    """Labels from a CSV or Parquet file (by suffix ``.parquet``) keyed by its first column
    (an entry key, ``series``, ``series#part`` or ``study``; with a ``slice`` column,
    ``series@slice``): every other column is a label, values as strings, null or empty
    values left out."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc}).") from exc
        return _label_rows(path, table.column_names, table.to_pylist())
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        return _label_rows(path, reader.fieldnames or [], reader)


def _label_rows(
    path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    if not columns:
        raise InputError(f"{path}: no header row; expected a key column and label columns.")
    key = columns[0]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row.pop(key)
        if name in (None, ""):
            continue
        sl = row.pop("slice", None)
        if sl not in (None, ""):
            try:
                name = f"{name}@{int(sl)}"
            except ValueError:
                raise InputError(f"{path}: slice {sl!r} of {name} is not an integer.") from None
        out[name] = {k: str(v) for k, v in row.items() if v not in (None, "")}
    return out


def features(
    store: EmbeddingStore,
    *,
    level: Level = "series",
    kind: Kind = "pooled",
    space: str | None = None,
    labels: Mapping[str, Mapping[str, Any]] | None = None,
    tenant: str | None = None,
    model: str | None = None,
    modality: str | None = None,
) -> Features:
    """Every entry of one space (of one ``tenant``, when given) as features, read in one
    pass over the store.

    ``kind``: ``pooled`` (series: the stored mean of slice CLS; slice: the CLS), ``cls``
    (the same vectors), ``cls_last4`` (CLS of the last 4 blocks after the final norm,
    earliest first), ``cls+meanpatch`` (CLS and mean patch token, concatenated) or
    ``cls_last4+meanpatch`` (both: the DINOv2 linear-evaluation input with 4 blocks and
    average pooling, ``create_linear_input`` in dinov2/eval/classification/utils.py of
    MohammedSB/DINOv2ForRadiology). Series level averages per-slice kinds over the volume.
    A model with fewer than 4 blocks gives all it has (``meta["cls_blocks"]`` says how
    many). ``labels`` (from :func:`read_labels`) override labels stored at submission.
    Without ``space``, the one space matching ``model`` and ``modality`` is read.
    """
    if kind not in KINDS:
        raise InputError(f"unknown feature kind {kind!r}; expected one of {', '.join(KINDS)}.")
    name = choose_space(store, space, model=model, modality=modality)
    table = store.table(name)
    attrs = store.entry_attrs(table.keys)
    xs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    blocks = 0  # CLS blocks of the cls_last4 kinds
    for i, key in enumerate(table.keys):
        a = attrs.get(key)
        if a is None or tenant not in (None, a.get("tenant", DEFAULT_TENANT)):
            continue
        vol = a.get("volume", {})
        base = {
            "entry": key,
            "study": vol.get("study"),
            "series": vol.get("series"),
            "part": vol.get("part", ""),
            "patient": vol.get("patient") or vol.get("study"),
            "patient_known": bool(vol.get("patient")),  # else the study stands in for it
            "modality": vol.get("modality"),
        }
        stored = dict(a.get("labels", {}))
        if kind in ("pooled", "cls"):
            per_slice = table.slice_cls(i)
        else:
            parts = []
            if kind.startswith("cls_last4"):
                last = _last_blocks(store, key, a)
                blocks = last.shape[1]  # one model per space: the same for every entry
                parts.append(last.reshape(len(last), -1))
            else:
                parts.append(table.slice_cls(i))
            if kind.endswith("meanpatch"):
                parts.append(store.read(key, "mean_patch"))
            per_slice = np.concatenate(parts, axis=1)
        if level == "series":
            vec = table.pooled[i] if kind in ("pooled", "cls") else per_slice.mean(axis=0)
            xs.append(np.asarray(vec, np.float32)[None])
            rows.append({**base, "slice": None, "labels": _labels_for(base, None, stored, labels)})
        else:
            sl = store.read(key, "slice_index") if a.get("volume_slices") != a["n_slices"] else None
            xs.append(np.asarray(per_slice, np.float32))
            for r in range(len(per_slice)):
                s = int(sl[r]) if sl is not None else r
                lab = _labels_for(base, s, stored, labels)
                rows.append({**base, "slice": s, "labels": lab})
    if not xs:
        times = {"cls+meanpatch": 2, "cls_last4": LAST, "cls_last4+meanpatch": LAST + 1}
        xs.append(np.zeros((0, int(table.attrs["dim"]) * times.get(kind, 1)), np.float32))
    x = np.concatenate(xs)
    meta: dict[str, Any] = {"model": table.attrs.get("model")}
    if blocks:
        meta["cls_blocks"] = blocks
    return Features(x, rows, level, kind, name, meta)


def _last_blocks(store: EmbeddingStore, key: str, attrs: Mapping[str, Any]) -> np.ndarray:
    """An entry's stored CLS of the last blocks (slices, blocks, D), cut to the last
    :data:`LAST`; fewer only where the model has no more blocks."""
    from ..models import REGISTRY

    if not attrs.get("cls_last_n"):
        raise InputError(
            f"entry {key} was embedded without the CLS of the last blocks; the cls_last4 kinds "
            f"need them: re-embed with cls_last_n of {LAST} or more (RADCACHE_CLS_LAST_N)."
        )
    last = store.read(key, "cls_last")
    if last.shape[1] >= LAST:
        return last[:, -LAST:]
    name = (attrs.get("model") or {}).get("name")
    cfg = REGISTRY.get(name) if isinstance(name, str) else None
    if cfg is None or cfg.depth != last.shape[1]:
        raise InputError(
            f"entry {key} stores the CLS of its last {last.shape[1]} blocks; the cls_last4 "
            f"kinds need {LAST}: re-embed with cls_last_n of {LAST} or more "
            "(RADCACHE_CLS_LAST_N)."
        )
    return last


def _labels_for(
    base: Mapping[str, Any],
    sl: int | None,
    stored: Mapping[str, Any],
    given: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, Any]:
    out = dict(stored)
    if given:
        series = base["series"] + (f"#{base['part']}" if base["part"] else "")
        for name in (base["study"], base["series"], series, base["entry"]):
            out.update(given.get(name, {}))
            if sl is not None:
                out.update(given.get(f"{name}@{sl}", {}))
    return out


def pool_slices(f: Features, how: Literal["mean", "max", "mean+max"] = "mean") -> Features:
    """Slice-level features pooled per volume (the 3D classification protocol)."""
    if f.level != "slice":
        raise InputError("pool_slices needs slice-level features.")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(f.rows):
        groups.setdefault(r["entry"], []).append(i)
    xs, rows = [], []
    for idx in groups.values():
        part = f.x[idx]
        pooled = {
            "mean": part.mean(axis=0),
            "max": part.max(axis=0),
            "mean+max": np.concatenate([part.mean(axis=0), part.max(axis=0)]),
        }[how]
        xs.append(pooled)
        r = dict(f.rows[idx[0]])
        rows.append({**r, "slice": None, "labels": dict(r["labels"])})
    return Features(np.stack(xs).astype(np.float32), rows, "series", f.kind, f.space, f.meta)
