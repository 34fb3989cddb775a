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
        value = field.get_default(call_default_factory=True)
        default = value if value is not None else "-"
        lines.append(
            f"  RADCACHE_{name.upper():<20} {field.description or ''} [default: {default}]"
        )
    return "\n".join(lines)


def guard_open_service(s: ServiceSettings) -> None:
    """Refuse to serve a non-loopback address without keys (unless ``insecure_open``,
    which is warned about at every start): the HTTP host, and the DICOM receiver's."""
    from radcache.embeddings.errors import ConfigError

    from ..auth import is_loopback
    from ..dicom import dicom_host
    from ..jobs import JobStore
    from ..keys import KeyStore

    hosts = [s.host] + ([dicom_host(s)] if s.dicom_port is not None else [])
    exposed = [h for h in hosts if not is_loopback(h)]
    if not exposed:
        return
    jobs = JobStore(s.db)
    try:
        if KeyStore(jobs).any_active():
            return
    finally:
        jobs.close()
    if s.insecure_open:
        err.print(
            f"[bold yellow]warning[/] radcache serves {exposed[0]} WITHOUT AUTHENTICATION while "
            "no API key exists (--insecure-open): anyone who reaches the port can read and "
            "delete everything."
        )
        return
    raise ConfigError(
        f"refusing to serve {exposed[0]} without API keys: anyone reaching the port could read "
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
@click.option(
    "--dicom-port",
    type=click.IntRange(1, 65535),
    help="Also receive DICOM (C-STORE SCP, C-ECHO) on this port. [env RADCACHE_DICOM_PORT]",
)
@click.option(
    "--ae-title", help="The DICOM receiver's AE title. [env RADCACHE_AE_TITLE; default RADCACHE]"
)
@click.option(
    "--calling-ae",
    "calling_aes",
    multiple=True,
    metavar="AE=KEY_PREFIX|TENANT",
    help="Allow a calling AE to send, as an API key (its 8-digit prefix) or, with no key, "
    "for a tenant; repeat for more. [env RADCACHE_DICOM_CALLING_AES, a JSON object]",
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
    dicom_port: int | None,
    ae_title: str | None,
    calling_aes: tuple[str, ...],
    device: str | None,
    precision: str | None,
) -> None:
    """Run the HTTP service: uploads in, embeddings out (OpenAPI at /docs).

    Every setting is also a RADCACHE_* environment variable (see `radcache embed --help`
    and embeddings/settings.py); flags override them.
    """
    need_server("serve")
    import uvicorn

    from radcache.embeddings.ingest import use_decode_workers

    from ..app import build_resources, create_app
    from ..dicom import check_dicom_settings, dicom_host
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
            dicom_port=dicom_port,
            ae_title=ae_title,
            dicom_calling_aes=_calling_aes(calling_aes) if calling_aes else None,
        )
        check_dicom_settings(s)
        guard_open_service(s)  # before the model loads: a refusal is quick
        # The weights are found and the config read here (fail with one clear message);
        # they load on a thread of their own while the store and the indexes open.
        resources = build_resources(s, background_model=True)
        use_decode_workers(s.decode_workers)  # started with the first compressed file
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
    if s.dicom_port is not None:
        err.print(
            f"DICOM receiver {s.ae_title.strip()} on {dicom_host(s)}:{s.dicom_port} "
            + (
                f"({len(s.dicom_calling_aes)} calling AEs allowed)"
                if s.dicom_calling_aes
                else "(no calling-AE list: any AE while no API key exists, else none)"
            )
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


def _calling_aes(given: tuple[str, ...]) -> dict[str, str]:
    """``AE=TARGET`` flags as the allow-list (:class:`ConfigError` for one without ``=``)."""
    from radcache.embeddings.errors import ConfigError

    out: dict[str, str] = {}
    for item in given:
        ae, sep, target = item.partition("=")
        if not sep or not ae.strip() or not target.strip():
            raise ConfigError(
                f"--calling-ae {item!r}: expected AE=KEY_PREFIX (or AE=TENANT on a service "
                "without keys), e.g. --calling-ae PACS1=0123abcd"
            )
        out[ae.strip()] = target.strip()
    return out


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
