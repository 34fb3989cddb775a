"""Wire models of similar-case search, few-shot classification and the index catalogue."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    JsonValue,
    StringConstraints,
    model_validator,
)

__all__ = [
    "ClassifyOut",
    "ClassifyRequest",
    "IndexOut",
    "Prediction",
    "QueryResult",
    "SearchFilters",
    "SearchHit",
    "SearchOut",
    "SearchQuery",
    "SearchRequest",
    "SupportItem",
]

LabelValue = str | int | float | bool
#: A filter value: an empty one, or one holding NUL, would match every entry.
FilterText = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\x00]*$")]
FilterLabelValue = FilterText | int | float | bool
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
    vector: list[FiniteFloat] | None = Field(
        None, min_length=1, description="a raw vector of the space's dimension"
    )

    @model_validator(mode="after")
    def _one(self) -> SearchQuery:
        given = [k for k in ("entry", "series", "study", "vector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of entry, series, study or vector (got {given})")
        return self


class SearchFilters(BaseModel):
    """Restrict results to entries whose non-identifying metadata matches (all must hold).
    Text values (and label names) are non-empty and hold no NUL character: either would
    match every entry."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"modality": ["CT"], "description": "chest"}]},
    )

    modality: list[FilterText] = Field([], description="any of these modalities")
    body_part: list[FilterText] = Field([], description="any of these BodyPartExamined values")
    description: FilterText | None = Field(
        None, description="case-insensitive series description match"
    )
    collection: FilterText | None = Field(
        None, description="only entries submitted to this collection"
    )
    labels: dict[FilterText, FilterLabelValue] = Field(
        {}, description="label values that must all match"
    )
    exclude_studies: list[str] = []
    exclude_patients: list[str] = Field([], description="patient pseudonyms to leave out")


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
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
    as_: Literal["json", "kos"] = Field(
        "json",
        alias="as",
        description="kos: a DICOM Key Object Selection document referencing the hits' "
        "original series (application/dicom; needs the UID vault)",
    )
    send: bool = Field(
        False,
        description="with as=kos: also send the document to the service's KOS destination "
        "(RADCACHE_KOS_DESTINATION: C-STORE or STOW-RS); the answer's Radcache-Sent-To "
        "header says how and where",
    )

    @model_validator(mode="after")
    def _send_needs_kos(self) -> SearchRequest:
        if self.send and self.as_ != "kos":
            raise ValueError('`send` sends a KOS answer: ask with "as": "kos" too')
        return self


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
    note: str | None = Field(None, description="why there are no hits, when there are none")


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
                    "modalities": ["CT"],
                    "recipe": "ct-windows 40/400, model size",
                    "description": "dinov2-base · CT · ct-windows 40/400, model size · 1200 "
                    "entries",
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
    modalities: list[str] = Field([], description="modalities of the space's entries")
    recipe: str = Field("", description="the recipe in short: intensity policy, input size")
    description: str = Field(
        "", description="model · modalities · recipe · entries, for telling spaces apart"
    )
    entries: int
    levels: dict[str, dict[str, Any]]
