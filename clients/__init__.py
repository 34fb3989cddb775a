"""radcache.clients: the HTTP API from Python, with httpx, numpy and pydantic (no torch)."""

from ._core import RadcacheAPIError
from .client import AsyncRadcacheClient, RadcacheClient
from .models import EntryOut, ErrorOut, JobOut, ModelOut, SeriesOut, StudyOut

__all__ = [
    "AsyncRadcacheClient",
    "EntryOut",
    "ErrorOut",
    "JobOut",
    "ModelOut",
    "RadcacheAPIError",
    "RadcacheClient",
    "SeriesOut",
    "StudyOut",
]
