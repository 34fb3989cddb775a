"""Wire models of the HTTP API, shared by the service and the clients (pydantic only, no torch)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "EntryOut",
    "ErrorOut",
    "Health",
    "JobOut",
    "ModelOut",
    "Problem",
    "Progress",
    "SeriesOut",
    "StudyOut",
]


class Problem(BaseModel):
    """RFC 9457 problem details, with radcache's stable ``code``."""

    type: str = Field(examples=["https://radcache.dev/problems/not-dicom"])
    title: str = Field(examples=["Not a DICOM, NIfTI or other readable volume file"])
    status: int = Field(examples=[415])
    detail: str = Field(examples=["notes.txt: not a DICOM file (no 'DICM' marker at byte 128 …)"])
    code: str = Field(examples=["not-dicom"])
    instance: str | None = Field(None, examples=["/v1/studies"])


class SeriesOut(BaseModel):
    study: str
    series: str
    part: str
    entry: str = Field(description="cache entry key (content + model + recipe + precision)")
    modality: str | None
    slices: int
    cache: Literal["hit", "miss"]
    seconds: float
    warnings: list[str] = []


class ErrorOut(BaseModel):
    path: str | None = Field(description="the uploaded file (or series) the error is about")
    code: str = Field(examples=["truncated-file"])
    message: str


class Progress(BaseModel):
    done: int = Field(description="slices embedded (or found cached)")
    total: int = Field(description="slices in the job")


class JobOut(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "partially_failed", "failed"]
    created: dt.datetime
    started: dt.datetime | None = None
    finished: dt.datetime | None = None
    progress: Progress
    series: list[SeriesOut] = []
    errors: list[ErrorOut] = []
    failure: str | None = Field(None, description="why the whole job failed, if it did")


class EntryOut(BaseModel):
    entry: str
    study: str
    series: str
    part: str
    modality: str | None
    slices: int
    dim: int
    model: str
    recipe_hash: str
    precision: str
    kinds: list[str]
    created: str
    geometry: dict[str, Any]
    recipe: dict[str, Any]
    labels: dict[str, Any] = {}


class StudyOut(BaseModel):
    study: str = Field(description="keyed pseudonym of the StudyInstanceUID (or the UID if kept)")
    modalities: list[str]
    series: list[EntryOut]


class ModelOut(BaseModel):
    name: str
    hf_id: str | None
    dim: int
    patch_size: int
    image_size: int
    num_registers: int
    random_weights: bool
    loaded: bool


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str | None = None
    queue_depth: int | None = None
