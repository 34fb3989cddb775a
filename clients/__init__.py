"""radcache.clients: the HTTP API from Python, with httpx, numpy and pydantic (no torch)."""

from ._base import RadcacheAPIError
from .client import AsyncRadcacheClient, RadcacheClient
from .schemas import (
    ClassifyOut,
    EntryOut,
    ErrorOut,
    IndexOut,
    JobOut,
    ModelOut,
    SearchOut,
    SeriesOut,
    StudyOut,
    StudyPage,
    SubmitOptions,
)

__all__ = [
    "AsyncRadcacheClient",
    "ClassifyOut",
    "EntryOut",
    "ErrorOut",
    "IndexOut",
    "JobOut",
    "ModelOut",
    "RadcacheAPIError",
    "RadcacheClient",
    "SearchOut",
    "SeriesOut",
    "StudyOut",
    "StudyPage",
    "SubmitOptions",
]
