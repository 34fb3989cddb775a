"""Spaces described for people: model, modalities, recipe summary and entry count, and a
space chosen by model or modality when the store holds several.

A space's table name (``model.weights.recipe`` hashes) identifies it; :class:`SpaceSummary`
says what it holds, and :func:`choose_space` picks one by ``--space``, ``--model`` or
``--modality`` (the error on an ambiguous choice lists the candidates that way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, NotFoundError

if TYPE_CHECKING:
    from .embedding_store import EmbeddingStore

__all__ = ["SpaceSummary", "choose_space", "describe_space", "recipe_summary", "space_summaries"]


def recipe_summary(recipe: Mapping[str, Any] | None) -> str:
    """A short reading of a resolved recipe: intensity policy and input size
    (``ct-windows 40/400, 224px``; ``percentile 0.5-99.5, model size``)."""
    if not recipe:
        return "recipe unknown"
    inten = recipe.get("intensity")
    parts: list[str] = []
    if isinstance(inten, Mapping):
        kind = str(inten.get("kind", "?"))
        if "windows" in inten:
            wins = "+".join(f"{c:g}/{w:g}" for c, w in inten["windows"])
            parts.append(f"{kind} {wins}")
        elif "low" in inten and "high" in inten:
            parts.append(f"{kind} {inten['low']:g}-{inten['high']:g}")
        else:
            parts.append(kind)
    else:
        parts.append(str(inten or "auto"))
    size = (recipe.get("resize") or {}).get("size")
    parts.append(f"{size}px" if size else "model size")
    axis = recipe.get("slice_axis")
    if axis and axis != "acquisition":
        parts.append(str(axis))
    return ", ".join(parts)


def describe_space(model: str, modalities: Iterable[str], recipe: str, entries: int) -> str:
    """One line naming what a space holds: ``dinov2-small · CT · ct-windows 40/400, 224px ·
    3 entries``."""
    mods = "/".join(sorted(set(modalities))) or "modality unknown"
    return f"{model} · {mods} · {recipe} · {entries} entr{'y' if entries == 1 else 'ies'}"


@dataclass(frozen=True)
class SpaceSummary:
    """What one space holds: its name, model, modalities, recipe summary, live entries."""

    space: str
    model: str
    modalities: tuple[str, ...]
    recipe: str
    entries: int

    def describe(self) -> str:
        return describe_space(self.model, self.modalities, self.recipe, self.entries)

    def as_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "model": self.model,
            "modalities": list(self.modalities),
            "recipe": self.recipe,
            "entries": self.entries,
            "description": self.describe(),
        }


def space_summaries(store: EmbeddingStore) -> list[SpaceSummary]:
    """Every space of ``store`` described from its table's metadata (live rows, the
    modalities it was given); tables written before they kept modalities are described from
    their entries' metadata, in one pass."""
    metas = {name: store.table_meta(name) for name in store.spaces()}
    mods: dict[str, set[str]] = defaultdict(set)
    for name, meta in metas.items():
        mods[name].update(meta.get("modalities", ()))
    if any("modalities" not in meta for meta in metas.values()):
        for e in store.iter_entries():
            if e.modality and "modalities" not in metas.get(e.space, {"modalities": ()}):
                mods[e.space].add(e.modality.upper())
    return [
        SpaceSummary(
            space=name,
            model=str(meta.get("model") or "?"),
            modalities=tuple(sorted(mods[name])),
            recipe=recipe_summary(meta.get("recipe")),
            entries=int(meta.get("count", 0)) - int(meta.get("deleted", 0)),
        )
        for name, meta in metas.items()
    ]


def choose_space(
    store: EmbeddingStore,
    space: str | None = None,
    *,
    model: str | None = None,
    modality: str | None = None,
) -> str:
    """The one space named by ``space``, or the one matching ``model`` and ``modality``
    (either may be None); errors list each candidate with its description."""
    names = store.spaces()
    if space is not None:
        if space not in names:
            raise NotFoundError(
                f"no space {space!r} in {store.url}; it has:\n{_listing(space_summaries(store))}"
            )
        return space
    if model is None and modality is None and len(names) == 1:
        return names[0]
    every = space_summaries(store)
    fits = [
        s
        for s in every
        if (model is None or s.model == model)
        and (modality is None or modality.upper() in s.modalities)
    ]
    if len(fits) == 1:
        return fits[0].space
    chosen = " ".join(
        f"--{k} {v}" for k, v in (("model", model), ("modality", modality)) if v is not None
    )
    what = f"{len(fits)} spaces match {chosen}" if chosen else f"it holds {len(every)} spaces"
    if not every:
        raise NotFoundError(f"{store.url} holds no embeddings yet; embed a volume first.")
    raise InputError(
        f"{store.url}: {what}; features of different models or recipes are not comparable. "
        f"Name one with --space (or pick by --model/--modality when that is unambiguous):\n"
        f"{_listing(fits or every)}"
    )


def _listing(spaces: Iterable[SpaceSummary]) -> str:
    return "\n".join(f"  {s.space}  ({s.describe()})" for s in spaces)
