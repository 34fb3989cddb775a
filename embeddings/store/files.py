"""Re-sent files: ``files/`` and ``volumes/``.

``files/`` maps keyed file digests to the content hash of the volume they made, and
``volumes/<content>`` records that volume (modality, files, slices) and, under
``groups``, the names each set of files that made it was sent under: a file set is named
by :func:`file_group` of its digests. Files with other UIDs but the same pixels make the
same volume under other names, so a re-sent study is recognised from its bytes alone,
before any DICOM parsing or decoding, and answered under its own names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xxhash
import zarr

from ..cache_keys import tenant_content
from ..pseudonyms import DEFAULT_TENANT
from ._common import _array, _group, _key_words, _meta, _words_key

__all__ = [
    "REF_FIELDS",
    "SHARED_FILE",
    "FileIndex",
    "file_group",
    "forget_study",
    "same_ref",
    "volume_record",
]

#: Content label of a file that made more than one volume (later rows override earlier).
SHARED_FILE = "0" * 32
#: The names one delivery of a volume was sent under (an entry's own, or an alias).
REF_FIELDS = ("study", "series", "part", "patient")


def file_group(digests: Iterable[str]) -> str:
    """The id of a set of files, from their keyed digests in any order (so it is keyed too)."""
    return xxhash.xxh3_128_hexdigest("|".join(sorted(set(digests))).encode())


class FileIndex:
    """The ``files/`` map of one store, cached in this process and reloaded when it grows."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}
        self._files_count = 0

    def remember(
        self, root: zarr.Group, content: str, digests: Iterable[str], record: dict[str, Any]
    ) -> None:
        """Record that exactly the files ``digests`` make the volume with ``content`` hash
        (the caller holds the store's commit lock)."""
        known = self.mapping(root)
        wanted = set(digests)
        # A file that made another volume too (a multi-stack multi-frame file) cannot
        # answer for one volume: it is marked SHARED and never recognised.
        new = sorted(d for d in wanted if d not in known or known[d] not in (content, SHARED_FILE))
        labels = [content if d not in known else SHARED_FILE for d in new]
        _name_group(root.require_group("volumes"), content, file_group(wanted), record)
        if not new:
            return
        g = _files_group(root)
        meta = _meta(g)
        n = int(meta["count"])
        d_a, c_a = _array(g["digest"]), _array(g["content"])
        d_a.resize((n + len(new), 2))
        c_a.resize((n + len(new), 2))
        d_a[n:] = np.asarray([_key_words(d) for d in new], dtype=np.uint64)
        c_a[n:] = np.asarray([_key_words(c) for c in labels], dtype=np.uint64)
        g.attrs["radcache"] = {**meta, "count": n + len(new)}  # the commit point
        known.update(zip(new, labels, strict=True))
        self._files_count = n + len(new)

    def mapping(self, root: zarr.Group) -> dict[str, str]:
        """Every known file digest → the content hash of its volume."""
        try:
            g = _group(root["files"])
        except KeyError:
            return self._files
        n = int(_meta(g).get("count", 0))
        if n != self._files_count:  # another writer appended: reload
            words = np.asarray(_array(g["digest"])[:n])
            contents = np.asarray(_array(g["content"])[:n])
            self._files = {
                _words_key(dh, dl): _words_key(ch, cl)
                for (dh, dl), (ch, cl) in zip(words, contents, strict=True)
            }
            self._files_count = n
        return self._files


def _name_group(vols: zarr.Group, content: str, group: str, record: dict[str, Any]) -> None:
    """Record the volume ``content`` (first time) and the names its file set ``group`` was
    sent under."""
    names = {k: record.get(k) for k in REF_FIELDS}
    if content not in vols:
        vols.create_group(content).attrs["radcache"] = {**record, "groups": {group: names}}
        return
    g = _group(vols[content])
    meta = _meta(g)
    groups = dict(meta.get("groups", {}))
    if groups.get(group) != names:
        groups[group] = names
        g.attrs["radcache"] = {**meta, "groups": groups}


def same_ref(known: Mapping[str, Any], ref: Mapping[str, Any]) -> bool:
    """``ref`` names what ``known`` names (an alias recorded before aliases kept the
    patient matches on study, series and part)."""
    return all(known.get(k) == v for k, v in ref.items() if k in known or k != "patient")


def forget_study(
    root: zarr.Group, entry: Mapping[str, Any], study: str, kept: Mapping[str, Any]
) -> None:
    """Drop the names of ``study`` from the ``volumes/`` record of an entry (its
    attributes ``entry``) that another study keeps (its names are ``kept``); the caller
    holds the commit lock. The files stay known: sent again, they are decoded and named
    anew."""
    tenant = str(entry.get("tenant") or DEFAULT_TENANT)
    content = tenant_content(str(entry.get("content_hash", "")), tenant)
    try:
        g = _group(root[f"volumes/{content}"])
    except KeyError:
        return
    meta = _meta(g)
    groups = {k: v for k, v in meta.get("groups", {}).items() if v.get("study") != study}
    top = {k: kept.get(k) for k in REF_FIELDS} if meta.get("study") == study else {}
    g.attrs["radcache"] = {**meta, **top, "groups": groups}


def volume_record(root: zarr.Group, content: str) -> dict[str, Any] | None:
    """The names recorded for the volume with ``content`` hash, or None."""
    try:
        return _meta(_group(root[f"volumes/{content}"]))
    except KeyError:
        return None


def _files_group(root: zarr.Group) -> zarr.Group:
    if "files" in root:
        return _group(root["files"])
    g = root.create_group("files")
    for name in ("digest", "content"):
        g.create_array(
            name,
            shape=(0, 2),
            dtype="uint64",
            chunks=(1 << 16, 2),
            dimension_names=("file", "word"),
        )
    g.attrs["radcache"] = {"count": 0}
    return g
