"""Wire models of studies, jobs, entries and the service: what is submitted and answered."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from radcache.embeddings.patch_forms import PATCH_STORAGE_PATTERN

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
    "StudyPage",
    "SubmitOptions",
]

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


class SkippedOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"path": "plan/RP1.dcm", "reason": "RT plan object, no image"}]
        }
    )

    path: str = Field(description="the uploaded file that was left out")
    reason: str = Field(description="why: a valid object that holds no image to embed")


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
    kind: Literal["embed", "erase"] = Field(
        "embed", description="embed: a submitted upload; erase: the rest of a study's deletion"
    )
    state: Literal["queued", "running", "done", "partially_failed", "failed", "dead"] = Field(
        description="dead: failed on every delivery the scale-out queue allowed"
    )
    created: dt.datetime
    started: dt.datetime | None = None
    finished: dt.datetime | None = None
    progress: Progress
    series: list[SeriesOut] = []
    errors: list[ErrorOut] = []
    skipped: list[SkippedOut] = Field(
        [], description="valid objects left out (SR, RT plan, localizer…), with the reason"
    )
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


class StudyPage(BaseModel):
    """One page of ``GET /v1/studies``: its studies and the cursor of the next page (from
    the answer's ``Link`` header; None on the last page)."""

    studies: list[StudyOut]
    next: str | None = Field(None, description="pass as cursor= to get the next page")


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
    model_loaded: bool | None = Field(
        None, description="false while the weights still load (submissions wait for them)"
    )
    queue_depth: int | None = None
    dicom: str | None = Field(
        None, description="with a DICOM receiver: its state, e.g. 'listening on HOST:PORT as AE'"
    )


# What a patient or study reference may be (a PatientID or UID could be): no control
# character or backslash, 1–64 characters.
_REFERENCE = re.compile(r"[^\x00-\x1f\x7f\\]{1,64}")


def _json_field(value: Any) -> Any:
    """A form or query field carries JSON as text; a client may pass the object itself."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value) if value else None
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
    return value


class SubmitOptions(BaseModel):
    """How a study is to be embedded: the options of ``POST /v1/studies`` (form fields or
    query parameters) and of STOW-RS (query parameters). Every field is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str | None = Field(None, description="modality of NIfTI inputs", examples=["CT"])
    model: str | None = Field(None, description="must name the loaded model")
    patch_storage: str | None = Field(
        None,
        pattern=PATCH_STORAGE_PATTERN,
        description="how patch-token grids are kept: fp16, int8 (per-token scale), pooled:N "
        "(area-pooled to N×N) or none [default: the server's]",
        examples=["int8"],
    )
    patch_tokens: bool | None = Field(
        None, description="older flag, when patch_storage is not given: true is fp16, false none"
    )
    recipe: dict[str, Any] | None = Field(
        None, description="a preprocessing recipe (JSON object) instead of the server's"
    )
    protocol: str | None = Field(
        None,
        description="a paper's preprocessing by name instead of a recipe (not with recipe): "
        "baharoon2023-knn, baharoon2023-linear, baharoon2023-fewshot, baharoon2023-seg, "
        "scholz2025",
        examples=["baharoon2023-knn"],
    )
    roi: dict[str, Any] | None = Field(
        None,
        description='a box every volume is cut to first: {"voxels": [z0, z1, y0, y1, x0, x1]} '
        '(slice, row, column; half-open) or {"mm": [l0, l1, p0, p1, s0, s1]} (patient LPS)',
        examples=[{"voxels": [40, 41, 80, 176, 60, 156]}],
    )
    labels: dict[str, Any] | None = Field(
        None, description='labels recorded with every series, e.g. {"diagnosis": "normal"}'
    )
    collection: str | None = Field(
        None, description="a named collection searches can be restricted to"
    )
    sequences: dict[str, str] | None = Field(
        None,
        description="multi-sequence MR: series or file name → t1, t1c, t2 or flair",
        examples=[{"t1.nii.gz": "t1", "flair.nii.gz": "flair"}],
    )
    fusion: Literal["mm", "concat", "mean"] | None = Field(
        None, description="multi-sequence MR: MM-DINOv2 (mm) or a fusion of DINOv2 CLS tokens"
    )
    patient: str | None = Field(
        None,
        description="patient of NIfTI/NRRD/MHA inputs (a PatientID; stored as its keyed "
        "pseudonym); a multipart form field only, never with DICOM files",
    )
    study: str | None = Field(
        None,
        description="study of NIfTI/NRRD/MHA inputs (a StudyInstanceUID or a data set's study "
        "id; stored as its keyed pseudonym); a multipart form field only, never with DICOM files",
    )

    @field_validator("modality", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return str(v).upper() if v else None

    @field_validator("model", "collection", "protocol", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return v or None

    @field_validator("patient", "study", mode="before")
    @classmethod
    def _reference(cls, v: Any) -> Any:
        """A PatientID or study UID: 1–64 characters without control characters or
        backslashes. The message never quotes it."""
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str) or not _REFERENCE.fullmatch(v.strip()):
            raise ValueError(
                "expected 1–64 characters without control characters or backslashes "
                "(a PatientID or a StudyInstanceUID)"
            )
        return v.strip()

    @field_validator("patch_tokens", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        if v is None or v == "" or isinstance(v, bool):
            return v if v != "" else None
        return str(v).lower() in ("1", "true", "yes")

    @field_validator("recipe", "labels", "sequences", "roi", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        return _json_field(v) or None

    @field_validator("collection")
    @classmethod
    def _collection(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v):
            raise ValueError(f"collection {v!r}: expected 1–64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("sequences")
    @classmethod
    def _sequence_names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return {k: t.lower() for k, t in v.items()} if v else None

    @field_validator("fusion", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return str(v).lower() if v else None

    @property
    def refs(self) -> dict[str, str]:
        """The patient and study references given (multipart form fields only)."""
        return {k: v for k, v in (("patient", self.patient), ("study", self.study)) if v}

    @property
    def multi_sequence(self) -> bool:
        """The options name sequences or a fusion: the upload is one multi-sequence study."""
        return self.sequences is not None or self.fusion is not None

    def fields(self) -> dict[str, str]:
        """The options as form fields or query parameters (JSON text for objects)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, dict):
                out[name] = json.dumps(value)
            elif isinstance(value, bool):
                out[name] = "true" if value else "false"
            else:
                out[name] = str(value)
        return out
