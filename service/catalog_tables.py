"""The entry catalog's tables (migrations ``0003``, ``0005``, ``0006``) and the rows one
entry makes in them; :mod:`.entry_catalog` reads and writes them.

``catalog_entries``: one row per entry (key, space, its own study, series and part,
modality, patient pseudonym, created, and the metadata an answer shows); ``catalog_refs``:
every (study, series, part) that names an entry, its own and its aliases';
``catalog_spaces``: how far each store table has been followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from radcache.embeddings.pseudonyms import DEFAULT_TENANT

from .jobs import Base

__all__ = ["CatalogEntry", "CatalogRef", "CatalogSpace", "entry_rows"]

#: The entry metadata a catalog row keeps (what the answers about entries show).
_VOLUME_FIELDS = ("study", "series", "part", "modality", "patient", "body_part")
_FIELDS = ("n_slices", "recipe_hash", "precision", "space", "kinds", "created", "complete")
_SHOWN = ("labels", "collections", "geometry", "recipe", "aliases")


class CatalogEntry(Base):
    __tablename__ = "catalog_entries"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    space: Mapped[str] = mapped_column(String(200), index=True)
    study: Mapped[str] = mapped_column(String(128))
    series: Mapped[str] = mapped_column(String(128))
    part: Mapped[str] = mapped_column(String(128))
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    created: Mapped[str] = mapped_column(String(40))
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)  # the metadata answers show
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)


class CatalogRef(Base):
    """One (study, series, part) that names an entry; the primary key orders studies. The
    tenant is the entry's (an entry, and every name of it, belongs to one tenant)."""

    __tablename__ = "catalog_refs"
    __table_args__ = (
        Index("ix_catalog_refs_series", "series", "tenant", "part"),
        # with the key, a page of studies finds its entries from this index alone
        Index("ix_catalog_refs_tenant_study", "tenant", "study", "key"),
    )

    study: Mapped[str] = mapped_column(String(128), primary_key=True)
    series: Mapped[str] = mapped_column(String(128), primary_key=True)
    part: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(32), primary_key=True, index=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)


class CatalogSpace(Base):
    """How far a table has been followed: its identity, generation, rows and tombstones."""

    __tablename__ = "catalog_spaces"

    space: Mapped[str] = mapped_column(String(200), primary_key=True)
    table_id: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(BigInteger)
    deleted: Mapped[int] = mapped_column(BigInteger)


def _doc(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an entry's metadata a catalog row keeps."""
    vol = attrs.get("volume", {})
    model = attrs.get("model", {})
    return {
        "volume": {k: vol.get(k) for k in _VOLUME_FIELDS if k in vol},
        "model": {k: model.get(k) for k in ("name", "dim", "weights_hash")},
        **{k: attrs[k] for k in (*_FIELDS, *_SHOWN) if k in attrs},
    }


def entry_rows(key: str, attrs: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The catalog_entries row and catalog_refs rows of one entry."""
    doc = _doc(attrs)
    vol = doc["volume"]
    primary = {k: str(vol.get(k) or "") for k in ("study", "series", "part")}
    refs = {(primary["study"], primary["series"], primary["part"])}
    for a in attrs.get("aliases", []):
        refs.add((str(a.get("study", "")), str(a.get("series", "")), str(a.get("part", ""))))
    tenant = str(attrs.get("tenant") or DEFAULT_TENANT)
    row = {
        "key": key,
        "tenant": tenant,
        "space": str(attrs.get("space", "")),
        **primary,
        "modality": vol.get("modality") or None,
        "patient": vol.get("patient") or None,
        "created": str(attrs.get("created", "")),
        "doc": doc,
    }
    return row, [
        {"study": s, "series": r, "part": p, "key": key, "tenant": tenant}
        for s, r, p in sorted(refs)
    ]
