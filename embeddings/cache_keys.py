"""Cache keys: what makes two embeddings the same entry, so nothing is computed twice."""

from __future__ import annotations

import xxhash

from .pseudonyms import DEFAULT_TENANT

__all__ = ["entry_key", "tenant_content"]


def entry_key(content_hash: str, weights_hash: str, recipe_hash: str, precision: str) -> str:
    """Cache key of one embedded volume: pixels+geometry, exact weights, recipe, precision."""
    msg = "|".join(("radcache-entry-v1", content_hash, weights_hash, recipe_hash, precision))
    return xxhash.xxh3_128_hexdigest(msg.encode())


def tenant_content(content_hash: str, tenant: str) -> str:
    """The content identity a tenant's entries are keyed by: the pixels' hash itself in the
    default tenant, a hash of it with the tenant's name elsewhere. Tenants never share an
    entry, so one tenant's cache answer cannot tell it what another tenant has stored."""
    if tenant == DEFAULT_TENANT:
        return content_hash
    return xxhash.xxh3_128_hexdigest(f"radcache-tenant-v1|{tenant}|{content_hash}".encode())
