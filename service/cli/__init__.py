"""The ``radcache`` command line: the :func:`main` group and the commands it gathers, a
module per command group.

- :mod:`.embed`: ``embed`` (files into the store), ``show`` (what a store holds), ``models``
- :mod:`.serve`: ``serve`` (the HTTP service)
- :mod:`.client`: ``submit``, ``jobs``, ``get`` (against a running service)
- :mod:`.search`: ``search``, ``classify`` (against a running service)
- :mod:`.index`: ``index info|rebuild`` (a store's FAISS indexes)
- :mod:`.check`: ``check`` (store, tables, indexes, catalog and jobs agree; ``--repair``)
- :mod:`.probe`: ``probe knn|fewshot|linear|seg``, ``export`` (a store's cached features)
- :mod:`.worker`: ``worker`` (scale-out: run queued jobs)
- :mod:`.backfill`: ``backfill`` (send a folder of studies, resumable)
- :mod:`.keys`: ``keys create|list|revoke`` (the service's API keys)
- :mod:`._common`: what they share: settings, error output, shared options

Settings come from :class:`radcache.service.settings.ServiceSettings` (``RADCACHE_*``
environment variables), built once per command; a flag given on the command line overrides
its variable. Heavy imports (torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import click

from radcache.embeddings.tuning import settle

from . import backfill, check, client, embed, index, keys, probe, search, serve, worker

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="radcache")
def main() -> None:
    """radcache: DINOv2-family embeddings of DICOM and NIfTI studies, cached in Zarr."""
    # Whatever is alive when the command ends is frozen, so that interpreter shutdown does
    # not walk it all (about 1 s once torch and a model are loaded).
    click.get_current_context().call_on_close(settle)


# Commands are registered from their modules; the modules keep their own names here (a
# module is not shadowed by the command it holds).
for _command in (
    embed.embed,
    embed.show,
    embed.models,
    serve.serve,
    client.submit,
    client.jobs,
    client.get,
    search.search,
    search.classify,
    index.index,
    check.check,
    probe.probe,
    probe.export,
    worker.worker,
    backfill.backfill,
    keys.keys,
):
    main.add_command(_command)
