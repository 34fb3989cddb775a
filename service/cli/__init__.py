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
its variable. A command's module is imported when the command runs (or help lists it), and
heavy imports (torch, transformers, pydicom) happen inside the code that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from radcache.embeddings.tuning import settle

__all__ = ["main"]

# Each command and the module that holds it (a module keeps its own name; it is not
# shadowed by the command it holds). A module is imported only when its command runs or
# help lists it, so `radcache embed` pays for no other command's imports.
_COMMANDS = {
    "embed": "embed",
    "show": "embed",
    "models": "embed",
    "serve": "serve",
    "submit": "client",
    "jobs": "client",
    "get": "client",
    "search": "search",
    "classify": "search",
    "index": "index",
    "check": "check",
    "probe": "probe",
    "export": "probe",
    "worker": "worker",
    "backfill": "backfill",
    "keys": "keys",
}


class _LazyGroup(click.Group):
    """A group whose commands are imported from their modules on first use (click's
    documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            module = importlib.import_module(f".{_COMMANDS[cmd_name]}", __name__)
            command: Any = getattr(module, cmd_name)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="radcache")
def main() -> None:
    """radcache: DINOv2-family embeddings of DICOM and NIfTI studies, cached in Zarr."""
    # Whatever is alive when the command ends is frozen, so that interpreter shutdown does
    # not walk it all (about 1 s once torch and a model are loaded).
    click.get_current_context().call_on_close(settle)
