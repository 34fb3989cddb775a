"""``radcache serve``: the HTTP service in this process (jobs run here, or by `radcache
worker` processes with --queue). Its --help lists every setting and its variable."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import click

from radcache.embeddings.errors import RadcacheError
from radcache.embeddings.tuning import settle

from ..settings import ServiceSettings
from ._common import STORE, encoder_options, err, fail, need_server, settings

__all__ = ["guard_open_service", "serve"]


def _settings_help() -> str:
    """Every setting, its environment variable and its default, for --help."""
    lines = ["\b", "Settings (environment variables; flags above override them):"]
    for name, field in ServiceSettings.model_fields.items():
        default = field.default if field.default is not None else "-"
        lines.append(
            f"  RADCACHE_{name.upper():<20} {field.description or ''} [default: {default}]"
        )
    return "\n".join(lines)


def guard_open_service(s: ServiceSettings) -> None:
    """Refuse to serve a non-loopback address without keys (unless ``insecure_open``,
    which is warned about at every start)."""
    from radcache.embeddings.errors import ConfigError

    from ..auth import is_loopback
    from ..jobs import JobStore
    from ..keys import KeyStore

    if is_loopback(s.host):
        return
    jobs = JobStore(s.db)
    try:
        if KeyStore(jobs).any_active():
            return
    finally:
        jobs.close()
    if s.insecure_open:
        err.print(
            f"[bold yellow]warning[/] radcache serves {s.host} WITHOUT AUTHENTICATION while "
            "no API key exists (--insecure-open): anyone who reaches the port can read and "
            "delete everything."
        )
        return
    raise ConfigError(
        f"refusing to serve {s.host} without API keys: anyone reaching the port could read "
        "and delete every study. Create a key first (`radcache keys create --tenant NAME "
        "--scopes submit,read,search,admin --db …`), bind 127.0.0.1, or pass --insecure-open "
        "for a lab network."
    )


@click.command(epilog=_settings_help())
@click.option("--host", help="Listen address. [env RADCACHE_HOST; default 127.0.0.1]")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Port. [env RADCACHE_PORT; default 8000]"
)
@click.option("--model", help="Registry name or checkpoint directory. [env RADCACHE_MODEL]")
@STORE
@click.option("--db", help="Job database URL. [env RADCACHE_DB; default sqlite:///./radcache.db]")
@click.option(
    "--queue",
    help="Redis URL: only enqueue jobs, `radcache worker` runs them. [env RADCACHE_QUEUE]",
)
@click.option(
    "--insecure-open",
    is_flag=True,
    default=None,
    help="Serve without API keys on a non-loopback address (lab use only). "
    "[env RADCACHE_INSECURE_OPEN]",
)
@encoder_options
def serve(
    host: str | None,
    port: int | None,
    model: str | None,
    store: str | None,
    db: str | None,
    queue: str | None,
    insecure_open: bool | None,
    device: str | None,
    precision: str | None,
) -> None:
    """Run the HTTP service: uploads in, embeddings out (OpenAPI at /docs).

    Every setting is also a RADCACHE_* environment variable (see `radcache embed --help`
    and embeddings/settings.py); flags override them.
    """
    need_server("serve")
    import uvicorn

    from ..app import build_resources, create_app
    from ..limits import uvicorn_limits

    try:
        s = settings(
            host=host,
            port=port,
            model=model,
            store=store,
            db=db,
            queue=queue,
            device=device,
            precision=precision,
            insecure_open=insecure_open,
        )
        guard_open_service(s)  # before the model loads: a refusal is quick
        # The weights are found and the config read here (fail with one clear message);
        # they load on a thread of their own while the store and the indexes open.
        resources = build_resources(s, background_model=True)
    except RadcacheError as exc:
        fail(exc, False)
        return
    settle()  # out of the collector's walks: what is loaded now, and the model once it is in
    threading.Thread(target=_settle_when_loaded, args=(resources.encoder,), daemon=True).start()
    if resources.encoder.cfg.random_weights:
        err.print(f"[yellow]warning[/] {resources.encoder.cfg.label}: embeddings are meaningless.")
    label = resources.encoder.cfg.label
    jobs_by = f"workers on {s.queue}" if s.queue else "this process"
    err.print(
        f"radcache serving {label} on http://{s.host}:{s.port} (store {s.store}; jobs run by "
        f"{jobs_by})"
    )
    uvicorn.run(
        create_app(s, resources=resources),
        host=s.host,
        port=s.port,
        log_level="info",
        access_log=False,  # the app writes it, naming routes rather than paths (app.py)
        log_config=log_config(),
        **uvicorn_limits(s),  # request head size and time, keep-alive, connections
    )


def log_config() -> dict[str, Any]:
    """uvicorn's logging set-up, plus radcache's loggers: its own lines (INFO and up) as
    uvicorn's, and the app's access log (:mod:`..app`) in uvicorn's access format."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["radcache"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    cfg["loggers"]["radcache.access"] = {
        "handlers": ["access"],
        "level": "INFO",
        "propagate": False,
    }
    return cfg


def _settle_when_loaded(encoder: object) -> None:
    """Freeze the model's objects too once its weights are in (a collector walking them
    took ~100 ms pauses: p99 of the reads)."""
    with contextlib.suppress(Exception):  # a failed load is reported by /readyz
        getattr(encoder, "wait", lambda: None)()
    settle()
