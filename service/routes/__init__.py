"""The HTTP routes, a module per resource; each imports :mod:`radcache.service.deps` for
what it needs, never the app.

``studies`` (submit, list, read, delete), ``jobs``, ``series`` (entries and their
embeddings), ``search`` (search, classify, indexes), ``dicomweb`` (STOW-RS, QIDO-RS) and
``health`` (probes, metrics, the model registry).
"""

from __future__ import annotations

from fastapi import APIRouter

from . import dicomweb, health, jobs, search, series, studies

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    studies.router,
    jobs.router,
    series.router,
    health.router,
    search.router,
    dicomweb.router,
)
