"""Cache keys: what makes two embeddings the same entry, so nothing is computed twice."""

from __future__ import annotations

import xxhash

__all__ = ["entry_key"]


def entry_key(content_hash: str, weights_hash: str, recipe_hash: str, precision: str) -> str:
    """Cache key of one embedded volume: pixels+geometry, exact weights, recipe, precision."""
    msg = "|".join(("radcache-entry-v1", content_hash, weights_hash, recipe_hash, precision))
    return xxhash.xxh3_128_hexdigest(msg.encode())
