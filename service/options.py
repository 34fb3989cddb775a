"""Options of one submission (modality, model, patch tokens, recipe, labels, and for
multi-sequence MR studies a sequence mapping and a fusion), validated once.

They are stored with the job, so the worker (in this process or, later, another one)
runs the job exactly as it was asked for.
"""

from __future__ import annotations

import json
import re
from typing import Any

from radcache.embeddings import Pipeline, load_recipe
from radcache.embeddings.errors import InputError, RadcacheError
from radcache.embeddings.models import get_cfg

__all__ = ["FIELDS", "InvalidFieldError", "ModelNotLoadedError", "job_options", "job_pipeline"]

FIELDS = (
    "modality",
    "model",
    "patch_tokens",
    "recipe",
    "labels",
    "collection",
    "sequences",
    "fusion",
)


class ModelNotLoadedError(RadcacheError):
    code = "model-not-loaded"
    status = 409
    title = "Another model is loaded"


def job_options(
    raw: dict[str, Any], *, loaded_model: str, multi_sequence: bool = False
) -> dict[str, Any]:
    """Validate a submission's options into what the job stores (JSON-ready).
    ``multi_sequence``: the loaded model is MM-DINOv2, so every upload is one study."""
    out: dict[str, Any] = {}
    if raw.get("modality"):
        out["modality"] = str(raw["modality"]).upper()
    if raw.get("model") and raw["model"] != loaded_model:
        get_cfg(str(raw["model"]))  # a name no registry knows: unknown-model (404)
        raise ModelNotLoadedError(
            f"this server runs {loaded_model!r}, not {raw['model']!r}; send it to a "
            "server started with --model " + str(raw["model"]) + ", or leave model out."
        )
    if raw.get("collection"):
        name = str(raw["collection"])
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise InvalidFieldError(
                f"collection {name!r}: expected 1–64 letters, digits, '.', '_' or '-'."
            )
        out["collection"] = name
    if raw.get("patch_tokens") is not None:
        value = raw["patch_tokens"]
        out["patch_tokens"] = (
            value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        )
    try:
        if raw.get("recipe"):
            recipe = raw["recipe"] if isinstance(raw["recipe"], dict) else json.loads(raw["recipe"])
            out["recipe"] = load_recipe(recipe).model_dump(mode="json")
        if raw.get("labels"):
            labels = raw["labels"] if isinstance(raw["labels"], dict) else json.loads(raw["labels"])
            if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
                raise ValueError("labels must be a JSON object")
            out["labels"] = labels
        if raw.get("sequences"):
            seqs = raw["sequences"]
            seqs = seqs if isinstance(seqs, dict) else json.loads(seqs)
            if not isinstance(seqs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in seqs.items()
            ):
                raise ValueError('sequences must map names to types, e.g. {"t1.nii.gz": "t1"}')
            out["sequences"] = {k: v.lower() for k, v in seqs.items()}
    except ValueError as exc:
        raise InvalidFieldError(
            f"a form field is not valid JSON of the expected shape ({exc})."
        ) from exc
    if raw.get("fusion"):
        fusion = str(raw["fusion"]).lower()
        if fusion not in ("mm", "concat", "mean"):
            raise InvalidFieldError(f"fusion {fusion!r}: expected mm, concat or mean.")
        out["fusion"] = fusion
    if multi_sequence or "sequences" in out or "fusion" in out:
        out["multi_sequence"] = True  # the whole upload is one multi-sequence MR study
    return out


def job_pipeline(pipeline: Pipeline, options: dict[str, Any]) -> Pipeline:
    """The pipeline a job's options ask for (recipe, patch tokens)."""
    recipe = load_recipe(options["recipe"]) if "recipe" in options else None
    return pipeline.variant(recipe=recipe, patch_tokens=options.get("patch_tokens"))


class InvalidFieldError(InputError):
    code = "invalid-request"
    status = 422
    title = "Invalid request field"
