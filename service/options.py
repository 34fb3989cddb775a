"""A submission's options, validated once into what its job stores and runs.

:class:`~radcache.clients.schemas.SubmitOptions` is what a client sends (form fields or
query parameters, every way in alike); :func:`job_options` checks it against the loaded
model, loads the recipe (given, or a preset's by ``protocol``; never both), and decides
once whether the upload is one multi-sequence MR study. The :class:`JobOptions` it returns
is stored with the job, so a worker (in this process or another) runs the job exactly as
it was asked for.

A patient or study reference (for NIfTI, NRRD and MetaImage uploads) is pseudonymised here,
before anything is stored: the job row holds the names (until the job ends), never the
sender's identifiers.
References come as multipart form fields only (:func:`refuse_query_refs`): a URL's query
string ends up in proxy and browser logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from radcache.clients.schemas import SubmitOptions
from radcache.embeddings import ModelCfg, Pipeline, Recipe
from radcache.embeddings.errors import InvalidFieldError, ModelNotLoadedError
from radcache.embeddings.models import get_cfg
from radcache.embeddings.presets import recipe_for
from radcache.embeddings.pseudonyms import DEFAULT_TENANT, InputRefs, Pseudonymizer
from radcache.embeddings.recipe import load_roi

__all__ = ["JobOptions", "job_options", "parse_submit_options", "refuse_query_refs"]


class JobOptions(BaseModel):
    """The validated options a job runs with (JSON-ready, stored in the job row)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    modality: str | None = None
    patch_storage: str | None = None  # fp16 | int8 | pooled:N | none; over patch_tokens
    patch_tokens: bool | None = None
    recipe: dict[str, Any] | None = None  # the loaded recipe (or protocol's), dumped
    roi: dict[str, Any] | None = None  # the box every volume is cut to, on any recipe
    labels: dict[str, Any] | None = None
    collection: str | None = None
    sequences: dict[str, str] | None = None
    fusion: Literal["mm", "concat", "mean"] | None = None
    multi_sequence: bool = False  # the whole upload is one multi-sequence MR study
    tenant: str = DEFAULT_TENANT  # who submitted it: what it stores belongs to them
    patient: str | None = None  # pseudonym of the sender's patient reference (non-DICOM)
    study: str | None = None  # pseudonym of the sender's study reference (non-DICOM)
    # series (names) the DICOM receiver re-sent whole: their earlier entries in their study go
    supersede: list[str] | None = None
    _recipe: Recipe | None = PrivateAttr(None)

    @property
    def refs(self) -> InputRefs | None:
        """The names the sender gave its non-DICOM volumes, or None."""
        refs = InputRefs(patient=self.patient, study=self.study)
        return refs if refs else None

    def stored(self) -> dict[str, Any]:
        """What the job row keeps."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def pipeline(self, base: Pipeline) -> Pipeline:
        """``base`` with the recipe (cut to the roi) and patch-token choice these options ask
        for, storing for the submitting tenant."""
        if self.recipe is not None and self._recipe is None:
            self._recipe = Recipe.model_validate(self.recipe)  # a stored job: parsed once
        recipe = self._recipe
        if self.roi is not None:
            recipe = (recipe or base.recipe).with_roi(load_roi(self.roi))
        patches = self.patch_tokens if self.patch_storage is None else self.patch_storage
        return base.variant(recipe=recipe, patch_storage=patches, tenant=self.tenant)


def parse_submit_options(raw: dict[str, Any]) -> SubmitOptions:
    """Form fields or query parameters → :class:`SubmitOptions` (422 ``invalid-request``)."""
    try:
        return SubmitOptions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "options"
        raise InvalidFieldError(
            f"{where}: {first.get('msg', 'invalid value')}; see the SubmitOptions schema "
            "in the OpenAPI document for the expected shape."
        ) from None


def refuse_query_refs(query: Mapping[str, Any]) -> None:
    """Refuse a patient or study reference given as a query parameter (422
    ``invalid-request``): a URL's query string ends up in proxy and browser logs, so
    references travel as multipart form fields of ``POST /v1/studies`` only."""
    given = sorted(k for k in ("patient", "study") if k in query)
    if given:
        raise InvalidFieldError(
            f"{' and '.join(given)} given as a query parameter; a URL's query string ends up "
            "in proxy and browser logs, so patient and study references are taken only as "
            "multipart form fields of POST /v1/studies, with NIfTI, NRRD or MetaImage files "
            "(DICOM files are named by their own headers)."
        )


def job_options(
    options: SubmitOptions,
    loaded: ModelCfg,
    tenant: str = DEFAULT_TENANT,
    pseudonymizer: Pseudonymizer | None = None,
) -> JobOptions:
    """Check ``options`` against the ``loaded`` model and load its recipe, once; the job
    stores for ``tenant``. Patient and study references are pseudonymised with
    ``pseudonymizer`` in ``tenant``'s domain (needed when they are given)."""
    if options.model and options.model != loaded.name:
        get_cfg(options.model)  # a name no registry knows: unknown-model (404)
        raise ModelNotLoadedError(
            f"this server runs {loaded.name!r}, not {options.model!r}; send it to a server "
            f"started with --model {options.model}, or leave model out."
        )
    recipe = recipe_for(options.recipe, options.protocol)
    roi = load_roi(options.roi).model_dump(mode="json") if options.roi else None
    refs = InputRefs()
    if options.refs:
        if pseudonymizer is None:  # a caller's mistake, never the sender's
            raise ValueError("job_options needs the pseudonymizer to name patient/study")
        refs = pseudonymizer.for_tenant(tenant).refs(**options.refs)
    out = JobOptions(
        modality=options.modality,
        patch_storage=options.patch_storage,
        patch_tokens=options.patch_tokens,
        recipe=recipe.model_dump(mode="json") if recipe is not None else None,
        roi=roi,
        labels=options.labels,
        collection=options.collection,
        sequences=options.sequences,
        fusion=options.fusion,
        multi_sequence=options.multi_sequence or loaded.multi_sequence,
        tenant=tenant,
        patient=refs.patient,
        study=refs.study,
    )
    out._recipe = recipe
    return out
