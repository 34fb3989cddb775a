"""Wire models of the HTTP API, shared by the service and the clients (pydantic only, no
torch): separate request and response models; the service never answers internal objects.

``_studies`` holds submissions (:class:`SubmitOptions`), jobs, entries, studies, models and
problems; ``_search`` the search, classification and index models.
"""

from ._search import (
    ClassifyOut,
    ClassifyRequest,
    IndexOut,
    Prediction,
    QueryResult,
    SearchFilters,
    SearchHit,
    SearchOut,
    SearchQuery,
    SearchRequest,
    SupportItem,
)
from ._studies import (
    EntryOut,
    ErrorOut,
    Health,
    JobOut,
    ModelOut,
    Problem,
    Progress,
    SeriesOut,
    SkippedOut,
    StudyOut,
    StudyPage,
    SubmitOptions,
)

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
    "SkippedOut",
    "StudyOut",
    "StudyPage",
    "SubmitOptions",
    "SupportItem",
]
