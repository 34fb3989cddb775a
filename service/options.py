"""A submission's options, validated once into what its job stores and runs.

:class:`~radcache.clients.schemas.SubmitOptions` is what a client sends (form fields or
query parameters, every way in alike); :func:`job_options` checks it against the loaded
model, loads the recipe, and decides once whether the upload is one multi-sequence MR
study. The :class:`JobOptions` it returns is stored with the job, so a worker (in this
process or another) runs the job exactly as it was asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from radcache.clients.schemas import SubmitOptions
from radcache.embeddings import ModelCfg, Pipeline, Recipe, load_recipe
from radcache.embeddings.errors import InvalidFieldError, ModelNotLoadedError
from radcache.embeddings.models import get_cfg
from radcache.embeddings.pseudonyms import DEFAULT_TENANT

__all__ = ["JobOptions", "job_options", "parse_submit_options"]


class JobOptions(BaseModel):
    """The validated options a job runs with (JSON-ready, stored in the job row)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    modality: str | None = None
    patch_tokens: bool | None = None
    recipe: dict[str, Any] | None = None  # the loaded recipe, dumped
    labels: dict[str, Any] | None = None
    collection: str | None = None
    sequences: dict[str, str] | None = None
    fusion: Literal["mm", "concat", "mean"] | None = None
    multi_sequence: bool = False  # the whole upload is one multi-sequence MR study
    tenant: str = DEFAULT_TENANT  # who submitted it: what it stores belongs to them
    _recipe: Recipe | None = PrivateAttr(None)

    def stored(self) -> dict[str, Any]:
        """What the job row keeps."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def pipeline(self, base: Pipeline) -> Pipeline:
        """``base`` with the recipe and patch-token choice these options ask for, storing
        for the submitting tenant."""
        if self.recipe is not None and self._recipe is None:
            self._recipe = Recipe.model_validate(self.recipe)  # a stored job: parsed once
        return base.variant(recipe=self._recipe, patch_tokens=self.patch_tokens, tenant=self.tenant)


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


def job_options(
    options: SubmitOptions, loaded: ModelCfg, tenant: str = DEFAULT_TENANT
) -> JobOptions:
    """Check ``options`` against the ``loaded`` model and load its recipe, once; the job
    stores for ``tenant``."""
    if options.model and options.model != loaded.name:
        get_cfg(options.model)  # a name no registry knows: unknown-model (404)
        raise ModelNotLoadedError(
            f"this server runs {loaded.name!r}, not {options.model!r}; send it to a server "
            f"started with --model {options.model}, or leave model out."
        )
    recipe = load_recipe(options.recipe) if options.recipe else None
    out = JobOptions(
        modality=options.modality,
        patch_tokens=options.patch_tokens,
        recipe=recipe.model_dump(mode="json") if recipe is not None else None,
        labels=options.labels,
        collection=options.collection,
        sequences=options.sequences,
        fusion=options.fusion,
        multi_sequence=options.multi_sequence or loaded.multi_sequence,
        tenant=tenant,
    )
    out._recipe = recipe
    return out
