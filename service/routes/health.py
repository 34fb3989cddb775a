"""About the service: health and readiness probes, Prometheus metrics, the model registry.

``/readyz`` and ``/metrics`` ask the queue (Redis in scale-out), so they are plain ``def``
routes run in worker threads; ``/healthz`` touches nothing and runs on the loop."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from radcache.clients.schemas import Health, ModelOut
from radcache.embeddings import REGISTRY

from ..auth import Metrics, Read
from ..deps import ResourcesDep, model_loaded
from ..problems import problem
from ._common import ERRORS

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models", response_model=list[ModelOut], summary="The model registry")
def list_models(res: ResourcesDep, who: Read) -> list[ModelOut]:
    loaded = res.encoder.cfg.name
    return [
        ModelOut(
            name=c.name,
            hf_id=c.hf_id,
            dim=c.dim,
            patch_size=c.patch_size,
            image_size=c.image_size,
            num_registers=c.num_registers,
            random_weights=c.random_weights,
            loaded=c.name == loaded,
        )
        for c in REGISTRY.values()
    ]


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {}}}},
    summary="Prometheus metrics",
)
def metrics(res: ResourcesDep, who: Metrics) -> Response:
    """The whole service's counters (every tenant's): for a ``metrics`` key (a scraper's,
    which reads nothing else) or an ``admin`` one."""
    return Response(res.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    """Answered on the event loop itself, needing no worker thread: slow only when the
    loop is blocked."""
    return Health()


@router.get(
    "/readyz",
    response_model=Health,
    responses=ERRORS,
    summary="Store, indexes, worker (and DICOM receiver) up; the model found (its weights "
    "may still load)",
)
def readyz(res: ResourcesDep) -> Response:
    ok, why = res.ready()
    if not ok:
        return problem(503, "not-ready", "Not ready", why, "/readyz")
    health = Health(
        model=res.encoder.cfg.label,
        model_loaded=model_loaded(res),
        queue_depth=res.worker.depth,
        dicom=res.dicom_state()[1] if res.settings.dicom_port is not None else None,
    )
    return JSONResponse(health.model_dump())
