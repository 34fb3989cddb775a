"""Free text from DICOM headers, made safe to keep: descriptions and body parts.

A volume is stored with no header free text by default. Where a deployment keeps series
descriptions (``RADCACHE_KEEP_DESCRIPTIONS``), :func:`clean_description` removes from each
the tokens that match the same file's identifying values: every part of the patient's and
the physicians' names, the patient IDs, the accession number, the institution, the file's
dates in any common rendering and anything else that looks like a date. A connecting word
left before a removed token ("for", "patient", "dr"…) goes with it. Body Part Examined is
kept only when it is a defined term of DICOM PS3.16 Annex L (:func:`body_part`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ._body_parts import BODY_PART_TERMS

__all__ = ["OTHER_BODY_PART", "body_part", "clean_description"]

#: What a Body Part Examined value outside the defined terms is kept as.
OTHER_BODY_PART = "OTHER"

#: Person names and the institution: each of their words (split on ``^``, ``=``, commas,
#: spaces and other punctuation) is removed.
_NAMES = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "InstitutionName",
)
#: Identifiers: the whole value, and each part of it of three characters or more.
_IDENTIFIERS = ("PatientID", "OtherPatientIDs", "AccessionNumber")
_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate")

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY, _MON = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])"
#: Anything that looks like a date: 2024-03-01, 2024.3.1, 20240301, 01.03.2024, 3/1/24,
#: 1 Mar 2024, March 1, 2024, Mar 2024.
_DATE_LIKE = re.compile(
    "|".join(
        (
            rf"(?<!\d)(?:19|20)\d\d[-./]{_MON}[-./]{_DAY}(?!\d)",
            r"(?<!\d)(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)",
            rf"(?<!\d){_DAY}[-./]{_DAY}[-./](?:\d{{4}}|\d\d)(?!\d)",
            rf"(?<!\d){_DAY}(?:st|nd|rd|th)?[-\s./]*{_MONTH}\b[-\s./,]*(?:\d{{4}}|\d\d)(?!\d)",
            rf"\b{_MONTH}\b[-\s./]*{_DAY}(?:st|nd|rd|th)?,?[-\s./]+(?:\d{{4}}|\d\d)(?!\d)",
            rf"\b{_MONTH}\b[-\s./,]*(?:19|20)\d\d(?!\d)",
        )
    ),
    re.IGNORECASE,
)
#: Words that only introduce what follows them ("for DOE^JOHN", "dob 1970-01-01").
# fmt: off
_CONNECTORS = frozenset((
    "for", "of", "from", "by", "at", "to", "on", "re", "per", "with", "pt", "pat", "patient",
    "name", "id", "no", "nr", "dr", "mr", "mrs", "ms", "dob", "born", "date", "dated", "acc",
    "accession", "mrn",
))
# fmt: on
_GONE = "\x00"  # stands for a removed date while the text is split into tokens
_MAX_CHARS = 64  # the length of a LO value


def _values(ds: Dataset, keyword: str) -> Iterator[str]:
    """The non-empty values of ``keyword`` as text; nothing if it is absent or unreadable."""
    try:
        value: Any = ds.get(keyword)
    except Exception:  # a value pydicom cannot convert: it is not in the text either
        return
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    for item in items:
        text = "" if item is None else str(item).strip()
        if text:
            yield text


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def _identifying(ds: Dataset) -> tuple[set[str], set[str]]:
    """(words a token must not be, longer strings a token must not contain), lower case."""
    words: set[str] = set()
    for kw in _NAMES:
        for value in _values(ds, kw):
            words.update(_words(value))
            words.add("".join(_words(value)))
    for kw in _IDENTIFIERS:
        for value in _values(ds, kw):
            words.add(value.lower())
            words.update(w for w in _words(value) if len(w) >= 3)
            words.add("".join(_words(value)))
    for item in _sequence(ds, "OtherPatientIDsSequence"):
        for value in _values(item, "PatientID"):
            words.add(value.lower())
            words.add("".join(_words(value)))
    words.discard("")
    return words, {w for w in words if len(w) >= 4 and w.isalnum()}


def _sequence(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        return list(ds.get(keyword) or [])
    except Exception:
        return []


def _file_dates(ds: Dataset) -> set[str]:
    """The file's own dates in every rendering a description might use."""
    out: set[str] = set()
    for kw in _DATES:
        for value in _values(ds, kw):
            if re.fullmatch(r"\d{8}", value):
                y, m, d = value[:4], value[4:6], value[6:]
                out |= {value, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}"}
                out |= {f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{d}-{m}-{y}", f"{m}/{d}/{y}"}
    return out


def clean_description(text: str | None, ds: Dataset) -> str | None:
    """``text`` (a SeriesDescription) without the tokens that identify anyone, or None.

    ``ds`` is the file the description came from: its names, IDs, institution and dates
    are what is removed, together with any date-like text and the connecting words left
    before a removed token. Returns None when nothing is left.
    """
    if not text or not text.strip():
        return None
    for date in sorted(_file_dates(ds), key=len, reverse=True):
        text = re.sub(re.escape(date), f" {_GONE} ", text, flags=re.IGNORECASE)
    text = _DATE_LIKE.sub(f" {_GONE} ", text)
    words, contained = _identifying(ds)
    tokens = text.split()
    gone = [_removed(t, words, contained) for t in tokens]
    for i in range(len(tokens) - 2, -1, -1):  # backwards, so "for patient DOE" goes whole
        bare = "".join(_words(tokens[i]))
        if gone[i + 1] and not gone[i] and (not bare or bare in _CONNECTORS):
            gone[i] = True
    kept = " ".join(t for t, g in zip(tokens, gone, strict=True) if not g)
    kept = kept.strip(" \t,;:-/#()[]")[:_MAX_CHARS].strip()
    return kept or None


def _removed(token: str, words: set[str], contained: set[str]) -> bool:
    if _GONE in token:
        return True
    lower = token.lower()
    parts = _words(token)
    if lower in words or any(p in words for p in parts):
        return True
    compact = "".join(parts)
    return any(c in compact for c in contained)


def body_part(value: str | None) -> str | None:
    """Body Part Examined as kept: a PS3.16 Annex L defined term (compared after
    upper-casing and stripping), :data:`OTHER_BODY_PART` for any other text, None if absent."""
    if value is None or not value.strip():
        return None
    term = value.strip().upper()
    return term if term in BODY_PART_TERMS else OTHER_BODY_PART
