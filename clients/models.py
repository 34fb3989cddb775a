"""Wire models of the HTTP API, shared by the service and the clients (pydantic only, no torch)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

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
    "ClassifyOut",
    "ClassifyRequest",
    "EntryOut",
    "ErrorOut",
    "Health",
    "IndexOut",
    "JobOut",
    "ModelOut",
    "Prediction",
    "Problem",
    "Progress",
    "QueryResult",
    "SearchFilters",
    "SearchHit",
    "SearchOut",
    "SearchQuery",
    "SearchRequest",
    "SeriesOut",
    "StudyOut",
    "SupportItem",
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
    state: Literal["queued", "running", "done", "partially_failed", "failed", "dead"] = Field(
        description="dead: failed on every delivery the scale-out queue allowed"
    )
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


# -- search and few-shot classification ---------------------------------------------------
LabelValue = str | int | float | bool
_HIT_EXAMPLE: dict[str, JsonValue] = {
    "rank": 1,
    "score": 0.93,
    "entry": "0b9f3c1e2d4a5b6c7d8e9f0a1b2c3d4e",
    "study": "5d41402abc4b2a76b9719d911017c592",
    "series": "7d793037a0760186574b0282f2f435e7",
    "part": "",
    "slice": None,
    "modality": "CT",
    "body_part": "CHEST",
    "series_description": "Chest routine",
    "labels": {"finding": "nodule"},
    "collections": ["teaching"],
}


class SearchQuery(BaseModel):
    """What to search with: one reference (entry, series, study) or a raw vector."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"series": "a3afaa5b5267002c42b458087006c7a6"}]},
    )

    entry: str | None = Field(None, description="an entry key")
    series: str | None = Field(None, description="a series name or series#part")
    study: str | None = Field(None, description="a study: one query per series (or slice)")
    slice: int | None = Field(None, ge=0, description="one volume slice of the entry or series")
    vector: list[float] | None = Field(None, description="a raw vector of the space's dimension")

    @model_validator(mode="after")
    def _one(self) -> SearchQuery:
        given = [k for k in ("entry", "series", "study", "vector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of entry, series, study or vector (got {given})")
        return self


class SearchFilters(BaseModel):
    """Restrict results to entries whose non-identifying metadata matches (all must hold)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"modality": ["CT"], "description": "chest"}]},
    )

    modality: list[str] = Field([], description="any of these modalities")
    body_part: list[str] = Field([], description="any of these BodyPartExamined values")
    description: str | None = Field(None, description="case-insensitive series description match")
    collection: str | None = Field(None, description="only entries submitted to this collection")
    labels: dict[str, LabelValue] = Field({}, description="label values that must all match")
    exclude_studies: list[str] = []
    exclude_patients: list[str] = Field([], description="patient pseudonyms to leave out")


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": {"series": "a3afaa5b5267002c42b458087006c7a6"},
                    "k": 10,
                    "level": "series",
                    "filters": {"modality": ["CT"]},
                }
            ]
        },
    )

    query: SearchQuery | None = Field(None, description="None only when files are uploaded")
    k: int = Field(10, ge=1, le=1000)
    level: Literal["series", "slice"] | None = Field(
        None,
        description="series (pooled vectors) or slice (CLS); default: slice if a slice is named",
    )
    group_by: Literal["series"] | None = Field(
        None, description="slice level: at most one hit per series"
    )
    space: str | None = Field(None, description="index space (GET /v1/indexes); needed for vectors")
    model: str | None = Field(None, description="restrict to spaces of this model")
    filters: SearchFilters = SearchFilters()
    exclude_same_study: bool = Field(True, description="never return the query's own study")
    exclude_same_patient: bool = Field(False, description="never return the query's patient")
    modality: str | None = Field(None, description="uploads: modality of NIfTI files")
    store: bool = Field(False, description="uploads: also store the embedding in the cache")


class SearchHit(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_HIT_EXAMPLE]})

    rank: int
    score: float = Field(description="cosine similarity")
    entry: str
    study: str
    series: str
    part: str
    slice: int | None = Field(description="volume slice (slice level)")
    modality: str | None
    body_part: str | None
    series_description: str | None
    labels: dict[str, Any]
    collections: list[str]


class QueryResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "query": {"entry": "ee8c540a05b9c3bc93ac845b79f86974", "series": "a3af…"},
                    "space": "dinov2-base.1f2e3d4c.7cd06edd",
                    "hits": [_HIT_EXAMPLE],
                }
            ]
        }
    )

    query: dict[str, Any] = Field(description="which query vector (entry, series, slice)")
    space: str
    hits: list[SearchHit]


class SearchOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"level": "series", "k": 10, "results": []}]}
    )

    level: Literal["series", "slice"]
    k: int
    results: list[QueryResult]


class SupportItem(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"query": {"series": "a3afaa5b5267002c42b458087006c7a6"}, "label": "nodule"}
            ]
        },
    )

    query: SearchQuery
    label: LabelValue


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "queries": [{"series": "a3afaa5b5267002c42b458087006c7a6"}],
                    "label_field": "finding",
                    "k": 20,
                }
            ]
        },
    )

    queries: list[SearchQuery] = Field(min_length=1)
    support: list[SupportItem] | None = Field(None, description="labelled references")
    label_field: str | None = Field(None, description="or: every entry with this stored label")
    k: int = Field(20, ge=1, le=1000)
    temperature: float = Field(0.07, gt=0)
    method: Literal["knn", "prototype"] = "knn"
    level: Literal["series", "slice"] = "series"
    space: str | None = None
    model: str | None = None
    exclude_same_study: bool = True

    @model_validator(mode="after")
    def _support(self) -> ClassifyRequest:
        if (self.support is None) == (self.label_field is None):
            raise ValueError("give either support or label_field")
        return self


class Prediction(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "query": {"entry": "ee8c540a05b9c3bc93ac845b79f86974"},
                    "space": "dinov2-base.1f2e3d4c.7cd06edd",
                    "label": "nodule",
                    "probabilities": {"nodule": 0.83, "normal": 0.17},
                    "support": 40,
                    "neighbours": [],
                }
            ]
        }
    )

    query: dict[str, Any]
    space: str
    label: str | None
    probabilities: dict[str, float]
    support: int = Field(description="support entries used (the query's study left out)")
    neighbours: list[dict[str, Any]] = []


class ClassifyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"predictions": []}]})

    predictions: list[Prediction]


class IndexOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "space": "dinov2-base.1f2e3d4c.7cd06edd",
                    "model": "dinov2-base",
                    "weights_hash": "1f2e3d4c5b6a79880f1e2d3c4b5a6978",
                    "recipe_hash": "7cd06edd2c1f0a43",
                    "dim": 768,
                    "entries": 1200,
                    "levels": {
                        "series": {"factory": "Flat", "kind": "exact", "vectors": 1200},
                        "slice": {
                            "factory": "IVF512,Flat",
                            "kind": "approximate",
                            "vectors": 180000,
                            "params": {"nprobe": 8},
                            "recall_at_10": 0.97,
                        },
                    },
                }
            ]
        }
    )

    space: str
    model: str | None
    weights_hash: str | None
    recipe_hash: str | None
    dim: int
    entries: int
    levels: dict[str, dict[str, Any]]
