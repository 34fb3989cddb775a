"""Re-sent files: ``files/`` and ``volumes/``.

``files/`` maps keyed file digests to the content hash of the volume they made, and
``volumes/<content>`` records that volume's names, so a re-sent study is recognised from
its bytes alone, before any DICOM parsing or decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from ._common import _array, _group, _key_words, _meta, _words_key

__all__ = ["SHARED_FILE", "FileIndex", "volume_record"]

#: Content label of a file that made more than one volume (later rows override earlier).
SHARED_FILE = "0" * 32


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
        vols = root.require_group("volumes")
        if content not in vols:
            vols.create_group(content).attrs["radcache"] = record
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
