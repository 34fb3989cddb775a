"""Search: similar cases and few-shot classification over the indexes.

Entry point :class:`Searcher`. A :class:`Query` names a study, series, entry or slice
already indexed, or carries a raw vector; an upload is embedded by the pipeline without
being stored (:meth:`Searcher.search_upload`). References are resolved through the
index catalog; the query's own study is excluded by default (and, on request, every
study of the same patient pseudonym), so a case never finds itself; a query without hits
says why. Given a ``tenant``, every step stays inside it: queries resolve only to its
entries, and the FAISS search is confined to its ids (the id bitmap), so another tenant's
vectors are never returned, scored or counted.

Few-shot classification follows the protocol of the DINOv2-on-radiology study
(Baharoon et al. 2023): cosine similarity, the k nearest support vectors vote with
weight ``exp(similarity / T)`` (T = 0.07), votes normalised to probabilities; or the
prototype variant, a softmax over the similarity to each class mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import AmbiguousReferenceError, InputError, NotFoundError, SearchIndexError
from .index import Filters, Hit, IndexSet, Level, SpaceIndex, normalise
from .ingest import InputItem

__all__ = [
    "Classification",
    "Query",
    "QueryHits",
    "Searcher",
    "knn_vote",
    "prototype_probabilities",
]

TEMPERATURE = 0.07


@dataclass(frozen=True)
class Query:
    """What to search with: one of ``entry``, ``series`` (``series#part``), ``study`` or
    ``vector``; ``slice`` picks one volume slice of the entry or series."""

    entry: str | None = None
    series: str | None = None
    study: str | None = None
    slice: int | None = None
    vector: Sequence[float] | None = None

    def describe(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("entry", "series", "study", "slice")}
        return {k: v for k, v in d.items() if v is not None} or {"vector": True}


@dataclass
class QueryHits:
    """The hits of one query vector (a series, or one slice) in one space."""

    query: dict[str, Any]
    space: str
    hits: list[Hit]
    note: str | None = None  # why there are no hits

    def to_dict(self) -> dict[str, Any]:
        d = {"query": self.query, "space": self.space, "hits": [h.to_dict() for h in self.hits]}
        return d if self.note is None else {**d, "note": self.note}


@dataclass
class Classification:
    query: dict[str, Any]
    space: str
    probabilities: dict[str, float]
    label: str | None
    support: int
    neighbours: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "space": self.space,
            "label": self.label,
            "probabilities": self.probabilities,
            "support": self.support,
            "neighbours": self.neighbours,
        }


@dataclass
class _Resolved:
    """A query as vectors in one space, with what it must not find."""

    space: SpaceIndex
    vectors: np.ndarray
    names: list[dict[str, Any]]
    studies: set[str]
    patients: set[str]
    slices: np.ndarray | None = None  # an upload's slice CLS tokens


def knn_vote(
    sims: np.ndarray, labels: Sequence[str], classes: Sequence[str], *, k: int, temperature: float
) -> np.ndarray:
    """Class probabilities from the ``k`` most similar support items: each votes for its
    label with weight ``exp(sim / temperature)``; ``sims`` holds one row per query."""
    sims = np.atleast_2d(sims)
    k = min(k, sims.shape[1])
    out = np.zeros((sims.shape[0], len(classes)))
    if k == 0:
        return out
    col = {c: i for i, c in enumerate(classes)}
    lab = np.asarray([col[x] for x in labels])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    for r, idx in enumerate(top):
        s = sims[r, idx]
        w = np.exp((s - s.max()) / temperature)  # shifted: same ratios, no overflow
        np.add.at(out[r], lab[idx], w)
        out[r] /= out[r].sum()
    return out


def prototype_probabilities(
    queries: np.ndarray,
    support: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[str],
    *,
    temperature: float,
) -> np.ndarray:
    """Softmax over the cosine similarity to each class's mean (unit) support vector."""
    lab = np.asarray(labels)
    protos = normalise(np.stack([support[lab == c].mean(axis=0) for c in classes]))
    logits = normalise(queries) @ protos.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


class Searcher:
    """Answers similar-case and few-shot queries over an :class:`IndexSet`."""

    def __init__(self, indexes: IndexSet, pipeline: Any = None) -> None:
        self.indexes = indexes
        self.pipeline = pipeline  # embeds uploads; None: uploads refused

    def _spaces(
        self, space: str | None, model: str | None, tenant: str | None = None
    ) -> list[SpaceIndex]:
        """The spaces a query may look in (a tenant's: those holding its entries)."""
        spaces = [
            si
            for name, si in sorted(self.indexes.spaces.items())
            if (space is None or name == space)
            and (model is None or si.meta.get("model") == model)
            and (tenant is None or si.holds(tenant))
        ]
        if space is not None and not spaces:
            if tenant is not None:
                raise NotFoundError(f"no index for space {space!r}; GET /v1/indexes lists them.")
            self.indexes.get(space)  # not-found, listing what exists
        return spaces

    def resolve(
        self,
        query: Query,
        level: Level,
        *,
        space: str | None = None,
        model: str | None = None,
        tenant: str | None = None,
    ) -> list[_Resolved]:
        """The query's vectors, grouped by the space they live in (``tenant``: only its
        entries are found)."""
        spaces = self._spaces(space, model, tenant)
        if query.vector is not None:
            if len(spaces) != 1:
                names = ", ".join(si.space for si in spaces) or "none"
                raise AmbiguousReferenceError(
                    f"a raw vector needs one space; {len(spaces)} match ({names}). Pass `space` "
                    "(GET /v1/indexes lists them) or `model`."
                )
            vec = np.asarray(query.vector, dtype=np.float32).reshape(1, -1)
            if vec.shape[1] != spaces[0].dim:
                raise SearchIndexError(
                    f"the raw vector has {vec.shape[1]} values; space {spaces[0].space} has "
                    f"{spaces[0].dim} dimensions (GET /v1/indexes lists each space's)."
                )
            return [_Resolved(spaces[0], vec, [query.describe()], set(), set())]
        found: list[tuple[SpaceIndex, list[int]]] = []
        for si in spaces:
            cat = si.catalog
            if query.entry is not None:
                ords = [cat.by_key[query.entry]] if query.entry in cat.by_key else []
            elif query.series is not None:
                ords = cat.ordinals("series", query.series)
            elif query.study is not None:
                ords = cat.ordinals("study", query.study)
            else:
                raise InputError("a query needs one of entry, series, study or vector.")
            if tenant is not None:
                ords = [o for o in ords if cat.record(o).tenant == tenant]
            if ords:
                found.append((si, ords))
        if not found:
            what = query.describe()
            raise NotFoundError(
                f"nothing indexed matches {what}; GET /v1/studies lists cached studies "
                "(an entry just embedded is searchable after the next index refresh)."
            )
        if query.study is None and len(found) > 1:
            listing = "; ".join(si.space for si, _ in found)
            raise AmbiguousReferenceError(
                f"{query.describe()} is indexed in {len(found)} spaces ({listing}); pass `space`."
            )
        return [self._vectors(si, ords, query, level) for si, ords in found]

    def _vectors(self, si: SpaceIndex, ords: list[int], query: Query, level: Level) -> _Resolved:
        cat = si.catalog
        recs = [cat.record(o) for o in ords]
        studies = set().union(*(r.studies for r in recs))
        patients = {r.patient for r in recs if r.patient}
        if query.slice is not None:
            if len(ords) != 1:
                raise AmbiguousReferenceError(
                    f"{query.describe()} names {len(ords)} volumes; name one series#part or entry."
                )
            rec = recs[0]
            if query.slice not in rec.slice_index:
                raise NotFoundError(
                    f"slice {query.slice} of entry {rec.key} was not embedded; embedded slices "
                    f"run {min(rec.slice_index, default=0)}–{max(rec.slice_index, default=-1)}."
                )
            row = rec.slice_index.index(query.slice)
            vec = si.levels["slice"].reconstruct([cat.slice_start[ords[0]] + row])
            names = [{"entry": rec.key, "series": rec.series, "slice": query.slice}]
            return _Resolved(si, vec, names, studies, patients)
        vec = si.vectors(level, ords)
        if level == "series":
            names = [{"entry": r.key, "series": r.series, "part": r.part} for r in recs]
        else:
            names = [
                {"entry": r.key, "series": r.series, "slice": s}
                for r in recs
                for s in r.slice_index
            ]
        return _Resolved(si, vec, names, studies, patients)

    # -- search --
    def search(
        self,
        query: Query,
        *,
        k: int = 10,
        level: Level | None = None,
        group_by_series: bool = False,
        filters: Filters | None = None,
        space: str | None = None,
        model: str | None = None,
        exclude_same_study: bool = True,
        exclude_same_patient: bool = False,
        tenant: str | None = None,
    ) -> list[QueryHits]:
        """The ``k`` nearest live, matching entries (series level) or slices per query
        vector, among ``tenant``'s entries when given."""
        lv: Level = level or ("slice" if query.slice is not None else "series")
        filters = _confined(filters, tenant)
        with self.indexes.lock:
            resolved = self.resolve(query, lv, space=space, model=model, tenant=tenant)
            return [
                qh
                for r in resolved
                for qh in self._search(
                    r, lv, k, group_by_series, filters, exclude_same_study, exclude_same_patient
                )
            ]

    def _search(
        self,
        r: _Resolved,
        level: Level,
        k: int,
        group: bool,
        filters: Filters | None,
        same_study: bool,
        same_patient: bool,
    ) -> list[QueryHits]:
        f = filters or Filters()
        f = dataclasses.replace(
            f,
            exclude_studies=f.exclude_studies | (r.studies if same_study else set()),
            exclude_patients=f.exclude_patients | (r.patients if same_patient else set()),
        )
        hits = r.space.search(level, r.vectors, k, f, group_by_series=group)
        return [
            QueryHits(n, r.space.space, h, None if h else r.space.why_empty(level, f))
            for n, h in zip(r.names, hits, strict=True)
        ]

    def embed_upload(
        self,
        inputs: Iterable[InputItem],
        *,
        modality: str | None = None,
        tenant: str | None = None,
    ) -> list[_Resolved]:
        """Embed uploaded files (nothing stored) into query vectors, one per volume; named
        in ``tenant``'s pseudonym domain when given."""
        if self.pipeline is None:
            raise SearchIndexError("searching by upload needs a loaded model; none is.")
        pipe = self.pipeline if tenant is None else self.pipeline.variant(tenant=tenant)
        done, errors = pipe.embed_transient(inputs, modality=modality)
        if not done:
            if errors:
                raise errors[0]
            raise InputError("the upload holds no image volume to search with.")
        out = []
        for t in done:
            si = self.indexes.spaces.get(t.space)
            if si is None:
                raise NotFoundError(
                    f"the upload ({t.meta.get('modality') or 'unknown modality'}) maps to space "
                    f"{t.space}, which holds no indexed entries yet; embed some studies with the "
                    "same model and recipe first."
                )
            name = {"upload": t.meta.get("series"), "entry": t.key}
            patient = {t.meta["patient"]} if t.meta.get("patient") else set()
            out.append(
                _Resolved(si, t.pooled[None], [name], {str(t.meta["study"])}, patient, t.cls)
            )
        return out

    def search_upload(
        self,
        inputs: Iterable[InputItem],
        *,
        k: int = 10,
        level: Level = "series",
        group_by_series: bool = False,
        filters: Filters | None = None,
        modality: str | None = None,
        exclude_same_study: bool = True,
        exclude_same_patient: bool = False,
        tenant: str | None = None,
    ) -> list[QueryHits]:
        """Search with volumes embedded on the fly (series level: pooled; slice: every slice)."""
        resolved = self.embed_upload(inputs, modality=modality, tenant=tenant)
        filters = _confined(filters, tenant)
        out = []
        with self.indexes.lock:
            for one in resolved:
                r = one
                if level == "slice" and one.slices is not None:
                    r = _Resolved(
                        one.space,
                        one.slices,
                        [{**one.names[0], "slice": i} for i in range(len(one.slices))],
                        one.studies,
                        one.patients,
                    )
                out += self._search(
                    r, level, k, group_by_series, filters, exclude_same_study, exclude_same_patient
                )
        return out

    # -- few-shot classification --
    def classify(
        self,
        queries: Sequence[Query],
        *,
        support: Sequence[tuple[Query, Any]] | None = None,
        label_field: str | None = None,
        k: int = 20,
        temperature: float = TEMPERATURE,
        method: Literal["knn", "prototype"] = "knn",
        level: Level = "series",
        space: str | None = None,
        model: str | None = None,
        exclude_same_study: bool = True,
        tenant: str | None = None,
    ) -> list[Classification]:
        """Per-class probabilities for each query, from a labelled support set: explicit
        ``(query, label)`` pairs, or every indexed entry with ``labels[label_field]`` (all
        within ``tenant`` when given)."""
        if (support is None) == (label_field is None):
            raise InputError("give either a support set or a label_field, not both or neither.")
        with self.indexes.lock:
            out: list[Classification] = []
            for q in queries:
                for r in self.resolve(q, level, space=space, model=model, tenant=tenant):
                    out += self._classify(
                        r,
                        support,
                        label_field,
                        k,
                        temperature,
                        method,
                        level,
                        exclude_same_study,
                        tenant,
                    )
            return out

    def _support(
        self,
        si: SpaceIndex,
        support: Sequence[tuple[Query, Any]] | None,
        label_field: str | None,
        tenant: str | None,
    ) -> list[tuple[int, str]]:
        """(ordinal, label) of each support entry in this space (and ``tenant``)."""
        cat = si.catalog
        if label_field is not None:
            mask = cat.mask("series", Filters(has_label=label_field, tenant=tenant))
            return [
                (int(o), _label(cat.record(int(o)).labels[label_field]))
                for o in np.flatnonzero(mask)
            ]
        pairs: list[tuple[int, str]] = []
        for q, lab in support or ():
            try:
                found = self.resolve(q, "series", space=si.space, tenant=tenant)
            except NotFoundError:
                # unknown everywhere: not-found; else it lives in another space
                self.resolve(q, "series", tenant=tenant)
                continue
            for r in found:
                pairs += [(cat.by_key[n["entry"]], _label(lab)) for n in r.names]
        return pairs

    def _classify(
        self,
        r: _Resolved,
        support: Sequence[tuple[Query, Any]] | None,
        label_field: str | None,
        k: int,
        temperature: float,
        method: str,
        level: Level,
        same_study: bool,
        tenant: str | None,
    ) -> list[Classification]:
        si, cat = r.space, r.space.catalog
        pairs = [
            (o, lab)
            for o, lab in self._support(si, support, label_field, tenant)
            if not (same_study and cat.record(o).studies & r.studies)
        ]
        if not pairs:
            raise NotFoundError(
                f"no labelled support entries in space {si.space} outside the query's study; "
                "label some studies (submit with labels) or pass a support set."
            )
        classes = sorted({lab for _, lab in pairs})
        vecs = si.vectors(level, [o for o, _ in pairs])
        labels = [lab for o, lab in pairs for _ in si.ids_of(level, o)]
        owners = [o for o, _ in pairs for _ in si.ids_of(level, o)]
        q = normalise(r.vectors)
        sims_all = q @ vecs.T
        if method == "prototype":
            probs = prototype_probabilities(q, vecs, labels, classes, temperature=temperature)
        else:
            probs = knn_vote(sims_all, labels, classes, k=k, temperature=temperature)
        out = []
        for name, p, sims in zip(r.names, probs, sims_all, strict=True):
            top = np.argsort(-sims, kind="stable")[: min(k, 10)]
            neighbours = [
                {
                    "entry": cat.record(owners[i]).key,
                    "series": cat.record(owners[i]).series,
                    "label": labels[i],
                    "score": float(sims[i]),
                }
                for i in top
            ]
            out.append(
                Classification(
                    query=name,
                    space=si.space,
                    probabilities={c: float(x) for c, x in zip(classes, p, strict=True)},
                    label=classes[int(np.argmax(p))] if p.sum() > 0 else None,
                    support=len(pairs),
                    neighbours=neighbours,
                )
            )
        return out


def _confined(filters: Filters | None, tenant: str | None) -> Filters | None:
    """``filters``, confined to ``tenant`` when one is given."""
    if tenant is None:
        return filters
    return dataclasses.replace(filters or Filters(), tenant=tenant)


def _label(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
