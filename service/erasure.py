"""Consent deletion: a study leaves the API and search before ``DELETE /v1/studies/{study}``
answers, and every byte that names it or holds its vectors leaves the store, the index
files and the job database by the time the erasure job the answer points to is done.

:func:`delete_study` is the part the request waits for: the study's entries are found in
the entry catalog and the index, removed from the store (entry groups and re-sent-file
records deleted, table rows tombstoned; an entry that another study of the tenant also
delivered stays, named by that study alone), forgotten by the catalog, taken out of the
tenant's job reports and out of the index in memory, and the instances of it the DICOM
receiver holds and its original UIDs in the UID vault are deleted; then an erasure job
(kind ``erase``) is queued.
:meth:`.worker.IndexKeeper.erase` does the rest for every pending
erasure at once, so that a burst of deletions shares one pass: the tables are compacted
(the deleted rows' keys and vectors leave the table files), the indexes saved and every
earlier saved version deleted; then the jobs read ``done``. A restart finishes the
erasures a stop interrupted (the tombstones and the queued jobs are on disk).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .deps import Resources
from .dicom.hold import forget_study
from .entry_catalog import EntryCatalog
from .jobs import JobRow

__all__ = ["delete_study", "names_of"]


def names_of(study: str, attrs: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The pseudonyms that name ``study`` in entries ``attrs`` (key → metadata): the
    study, its series and their entry keys, and the patients of those entries."""
    names = {study}
    for key, a in attrs.items():
        vol = a.get("volume") or {}
        refs = [vol, *a.get("aliases", [])]
        mine = [r for r in refs if r.get("study") == study]
        names.update(str(r[f]) for r in mine for f in ("series", "patient") if r.get(f))
        if mine and len(mine) == len(refs):  # the entry leaves with the study
            names.add(key)
    return names


def delete_study(res: Resources, catalog: EntryCatalog, study: str, tenant: str) -> JobRow | None:
    """Remove ``tenant``'s study from everything the API and search read, and queue the
    erasure of what is left on disk; returns the erasure job, or None when nothing
    names the study (already deleted, or never stored)."""
    forget_study(res.settings, tenant, study)  # instances the DICOM receiver holds
    if res.vault is not None:
        res.vault.forget(tenant, study)  # its original UIDs
    named = set(catalog.study_keys(study, tenant)) | set(res.indexes.study_entries(study, tenant))
    if not named:
        return None
    attrs = res.store.entry_attrs(named)
    gone = set(res.store.delete_study(study, keys=named))
    catalog.forget(gone)
    kept = sorted(named - gone)
    catalog.record(res.store, kept)  # kept by another study: now named by it
    remaining = res.store.entry_attrs(kept)  # what the kept entries are named by now
    res.jobs.rename_entries({k: _primary(a) for k, a in remaining.items()})
    names = names_of(study, attrs)
    names -= _still_named(catalog, names, remaining, tenant)
    res.jobs.redact(tenant, names)
    res.keeper.refresh()  # its vectors leave the search before this answers
    res.keeper.touch(kept)
    job = res.jobs.create("", options={"kind": "erase"}, tenant=tenant)
    res.keeper.erase_soon()
    return job


def _primary(attrs: Mapping[str, Any]) -> tuple[str, str]:
    vol = attrs.get("volume") or {}
    return str(vol.get("study", "")), str(vol.get("series", ""))


def _still_named(
    catalog: EntryCatalog,
    names: set[str],
    remaining: Mapping[str, Mapping[str, Any]],
    tenant: str,
) -> set[str]:
    """Of ``names``, those that the tenant's remaining entries still use (a patient with
    other studies; the entries and series another study kept, ``remaining``)."""
    still = {p for p in names if catalog.has_patient(p, tenant)}
    for key, a in remaining.items():
        vol = a.get("volume") or {}
        for r in (vol, *a.get("aliases", [])):
            still.update(str(r.get(f) or "") for f in ("study", "series", "patient"))
        still.add(key)
    return still & names
