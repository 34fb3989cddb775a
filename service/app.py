"""The FastAPI application: resources loaded once in the lifespan, reached via dependencies.

Entry point :func:`create_app`. The model, store, pipeline, job database and worker are
made at start-up by :func:`build_resources` (or handed in, as ``radcache serve`` does
after checking the model can be loaded) and live in ``app.state``; routes
(:mod:`.routes`) get them through :data:`.deps.ResourcesDep`. With ``dicom_port`` set, the
DICOM receiver (:mod:`.dicom`) starts and stops with the app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radcache.clients.schemas import SearchRequest
from radcache.embeddings import (
    Encoder,
    Pipeline,
    Searcher,
    __version__,
    open_index,
)

from . import problems
from .deps import Resources
from .entry_catalog import EntryCatalog
from .jobs import JobStore
from .keys import KeyStore
from .limits import BodyIdleTimeout, JsonBodyLimit
from .metrics import Metrics
from .queue import RedisQueue
from .routes import ROUTERS
from .settings import ServiceSettings, get_settings
from .worker import IndexKeeper, Worker

__all__ = ["build_resources", "create_app"]

#: The access log, written by :class:`_CountRequests` (uvicorn's format: see .cli.serve).
_access = logging.getLogger("radcache.access")


def build_resources(
    settings: ServiceSettings, encoder: Encoder | None = None, *, background_model: bool = False
) -> Resources:
    """Load (or take) the model and open everything the service needs. With
    ``background_model`` the weights load on a thread of their own while the rest opens
    (what `radcache serve` does: reads and search by name need no model; see
    :meth:`.deps.Resources.ready`)."""
    pipeline = Pipeline.from_settings(settings, encoder=encoder, background=background_model)
    enc, store = pipeline.encoder, pipeline.store
    jobs = JobStore(settings.db)
    vault = settings.uid_vault(jobs)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    worker: Worker | RedisQueue
    if settings.queue:  # scale-out: `radcache worker` processes run the jobs
        worker = RedisQueue(settings, jobs)
    else:
        worker = Worker(
            pipeline,
            jobs,
            limit=settings.queue_size,
            quarantine=settings.quarantine_dir,
            vault=vault,
        )
    metrics = Metrics(lambda: worker.depth, stages=pipeline.profile)
    indexes = open_index(store, **settings.index_options())
    catalog = EntryCatalog(jobs)
    if catalog.needs_rebuild(store):  # a new or upgraded job database, a filled store
        catalog.rebuild(store, only_if_empty=True)
    catalog.sync(store)  # what other processes stored or deleted while this one was down
    keeper = IndexKeeper(
        indexes,
        settings.index_refresh_s,
        settings.index_save_s,
        catalog=catalog,
        compact_after=settings.compact_after_s,
        compact_share=settings.compact_share,
        erase_after=settings.erase_after_s,
        retention=settings.job_retention_days * 86400,
        quarantine=settings.quarantine_dir,
    )
    searcher = Searcher(indexes, pipeline)
    res = Resources(
        settings,
        enc,
        store,
        pipeline,
        jobs,
        worker,
        metrics,
        indexes,
        searcher,
        keeper,
        KeyStore(jobs),
        vault,
    )
    # Jobs this process ran or queued are counted (and made searchable) as they finish:
    # the embedded worker calls back, the Redis queue watches the job database.
    worker.on_done = res.job_done
    return res


def _start(res: Resources) -> None:
    res.worker.start()
    res.keeper.start()


def _stop(res: Resources) -> None:
    res.worker.stop()
    res.keeper.stop()


def _document_models(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put models that routes read by hand (JSON or multipart) into the OpenAPI schemas,
    and the problems every operation can answer into its responses."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[m.__name__] = js
            problems.document(schema)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _operation_id(route: APIRoute) -> str:
    return route.name  # stable, readable operation ids: submit_study, get_job, …


def create_app(
    settings: ServiceSettings | None = None, *, resources: Resources | None = None
) -> FastAPI:
    """The radcache HTTP app. Without ``resources`` the lifespan loads them from settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading, starting and stopping (joins, the last index save) block: worker thread.
        res = resources
        if res is None:
            res = await run_in_threadpool(build_resources, settings or get_settings())
        await run_in_threadpool(_start, res)
        app.state.resources = res
        receiver = None
        try:
            if res.settings.dicom_port is not None:  # the DICOM receiver, on its own threads
                from .dicom import start_receiver

                receiver = await run_in_threadpool(start_receiver, res)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                if receiver is not None:
                    await run_in_threadpool(receiver.stop)
                await run_in_threadpool(_stop, res)

    app = FastAPI(
        title="radcache",
        version=__version__,
        summary="DINOv2-family embeddings of radiology studies, cached.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        docs_url=None,  # served from the package's own assets: _self_hosted_docs
        redoc_url=None,
    )
    _self_hosted_docs(app)
    problems.install(app)
    _document_models(app, SearchRequest)
    for router in ROUTERS:
        app.include_router(router)

    s = settings or (resources.settings if resources is not None else get_settings())
    app.add_middleware(JsonBodyLimit, max_bytes=s.max_json_bytes)  # inside CORS: its headers
    if s.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=s.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Link", "Location"],
        )
    app.add_middleware(_CountRequests)
    # outermost: a body that stalls is cut off whatever the route does with it
    app.add_middleware(BodyIdleTimeout, idle_s=s.body_idle_timeout_s)
    return app


DOCS_ASSETS = "/docs-assets"


def _self_hosted_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icon served by
    this app from the ``fastapi-offline`` package's copies (no CDN: they work on a network
    without internet), by FastAPI's self-hosting recipe (``docs_url=None``,
    ``get_swagger_ui_html`` with local URLs, ``StaticFiles``)."""
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def local(request: Request, name: str) -> str:  # behind a proxy's root path too
        return f"{request.scope.get('root_path', '')}{name}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=local(request, str(app.openapi_url)),
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=local(request, redirect),
            swagger_js_url=local(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=local(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            swagger_favicon_url=local(request, f"{DOCS_ASSETS}/favicon.png"),
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=local(request, str(app.openapi_url)),
            title=f"{app.title} - ReDoc",
            redoc_js_url=local(request, f"{DOCS_ASSETS}/redoc.standalone.js"),
            redoc_favicon_url=local(request, f"{DOCS_ASSETS}/favicon.png"),
            with_google_fonts=False,
        )


class _CountRequests:
    """Counts answered requests by method, route and status (plain ASGI: no body copies),
    and writes the access log line (uvicorn's own is off: see :mod:`.cli.serve`).

    The line names the route's template (``DELETE /v1/studies/{study}``), never the path
    or query string: paths carry pseudonyms, job ids and DICOM UIDs, query strings carry
    filters, and a log outlives a consent deletion."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            res: Resources | None = getattr(scope["app"].state, "resources", None)
            if res is not None:
                res.metrics.requests.labels(scope["method"], path, str(status[0])).inc()
            peer = scope.get("client")
            client = f"{peer[0]}:{peer[1]}" if peer else "-"
            version = scope.get("http_version", "1.1")
            line = '%s - "%s %s HTTP/%s" %d'
            _access.info(line, client, scope["method"], path, version, status[0])
