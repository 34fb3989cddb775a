"""Wire models of the HTTP API, shared by the service and the clients (pydantic only, no torch)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

_SERIES_EXAMPLE: dict[str, JsonValue] = {
    "study": "c9ebca20e1d2083232b67ca4be4da805",
    "series": "a3afaa5b5267002c42b458087006c7a6",
    "part": "",
    "entry": "ee8c540a05b9c3bc93ac845b79f86974",
    "modality": "CT",
    "slices": 150,
    "cache": "miss",
    "seconds": 3.1,
    "warnings": [],
}

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
    model_config = ConfigDict(json_schema_extra={"examples": [_SERIES_EXAMPLE]})

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "path": "00003-IM0004.dcm",
                    "code": "truncated-file",
                    "message": "the pixel data holds 8130 bytes but the header describes 8192; …",
                }
            ]
        }
    )

    path: str | None = Field(description="the uploaded file (or series) the error is about")
    code: str = Field(examples=["truncated-file"])
    message: str


class Progress(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"done": 96, "total": 150}]})

    done: int = Field(description="slices embedded (or found cached)")
    total: int = Field(description="slices in the job")


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "6f1c0d3b2a9e4c57b8d1e2f3a4b5c6d7",
                    "state": "partially_failed",
                    "created": "2026-11-29T04:00:00Z",
                    "started": "2026-11-29T04:00:01Z",
                    "finished": "2026-11-29T04:00:05Z",
                    "progress": {"done": 150, "total": 150},
                    "series": [_SERIES_EXAMPLE],
                    "errors": [
                        {
                            "path": "00150-notes.txt",
                            "code": "not-dicom",
                            "message": "not a DICOM file (no 'DICM' marker at byte 128 …)",
                        }
                    ],
                    "failure": None,
                }
            ]
        }
    )

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entry": "ee8c540a05b9c3bc93ac845b79f86974",
                    "study": "c9ebca20e1d2083232b67ca4be4da805",
                    "series": "a3afaa5b5267002c42b458087006c7a6",
                    "part": "",
                    "modality": "CT",
                    "slices": 150,
                    "dim": 768,
                    "model": "dinov2-base",
                    "recipe_hash": "7cd06edd2c1f0a43",
                    "precision": "bf16",
                    "kinds": [
                        "cls",
                        "cls_last",
                        "mean_patch",
                        "patch",
                        "pooled",
                        "positions",
                        "slice_index",
                    ],
                    "created": "2026-11-29T04:00:05+00:00",
                    "geometry": {
                        "spacing": [0.7, 0.7, 2.0],
                        "origin": [-180.0, -180.0, -300.0],
                        "direction": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                        "shape": [150, 512, 512],
                    },
                    "recipe": {
                        "slice_axis": "acquisition",
                        "intensity": {"kind": "ct-windows", "windows": [[40.0, 400.0]]},
                    },
                    "labels": {"finding": "nodule"},
                }
            ]
        }
    )

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"study": "c9ebca20e1d2083232b67ca4be4da805", "modalities": ["CT"], "series": []}
            ]
        }
    )

    study: str = Field(description="keyed pseudonym of the StudyInstanceUID (or the UID if kept)")
    modalities: list[str]
    series: list[EntryOut]


class ModelOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "dinov2-base",
                    "hf_id": "facebook/dinov2-base",
                    "dim": 768,
                    "patch_size": 14,
                    "image_size": 224,
                    "num_registers": 0,
                    "random_weights": False,
                    "loaded": True,
                }
            ]
        }
    )

    name: str
    hf_id: str | None
    dim: int
    patch_size: int
    image_size: int
    num_registers: int
    random_weights: bool
    loaded: bool


class Health(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ok", "model": "dinov2-base", "queue_depth": 0}]}
    )

    status: Literal["ok"] = "ok"
    model: str | None = None
    queue_depth: int | None = None
