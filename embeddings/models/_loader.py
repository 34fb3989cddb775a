"""Load a DINOv2-family backbone: registry name, local checkpoint, HF cache, or download.

Loading is strict: a checkpoint whose weights do not cover the architecture raises
instead of leaving layers randomly initialised (which would give plausible-looking,
wrong embeddings). Other architectures built on DINOv2 (MM-DINOv2) register their loaders
here (:func:`register_dir_loader`, :func:`register_arch_loader`); this module imports no
model file.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, cast

if TYPE_CHECKING:
    import torch

from ..errors import ModelError, ModelUnavailableError
from ._config import _SUPPORTED_TYPES, _cfg_from_checkpoint, _hf_config, is_mm_checkpoint
from ._registry import REGISTRY, ModelCfg, get_cfg

__all__ = [
    "build_random",
    "load_backbone",
    "plain_cfg",
    "quiet_progress",
    "register_arch_loader",
    "register_dir_loader",
    "resolve_backbone",
    "weights_identity",
]

log = logging.getLogger(__name__)
RANDOM_SEED = 20231101

#: ``load(path)`` for a checkpoint directory; ``load(cfg, cache_dir, offline)`` for a registry
#: entry of a registered arch. Both return the config and the module.
DirLoader: TypeAlias = "Callable[[Path], tuple[ModelCfg, torch.nn.Module]]"
ArchLoader: TypeAlias = "Callable[[ModelCfg, str | None, bool], tuple[ModelCfg, torch.nn.Module]]"
_DIR_LOADERS: dict[str, tuple[Callable[[Path], bool], DirLoader]] = {}
_ARCH_LOADERS: dict[str, ArchLoader] = {}


def register_dir_loader(is_mine: Callable[[Path], bool], load: DirLoader) -> None:
    """Load checkpoint directories that ``is_mine`` claims with ``load`` (before plain DINOv2).

    Registering the same function again (a reloaded module) replaces the earlier entry.
    """
    _DIR_LOADERS[f"{load.__module__}.{load.__qualname__}"] = (is_mine, load)


def register_arch_loader(arch: str, load: ArchLoader) -> None:
    """Build registry entries whose ``arch`` is ``arch`` with ``load(cfg, cache_dir, offline)``."""
    _ARCH_LOADERS[arch] = load


def build_random(cfg: ModelCfg) -> torch.nn.Module:
    """The labelled random-weight model: same seed, same weights, on every run, as long
    as no other thread draws from torch's global generator while it is built (a
    background load in `radcache serve`: nothing else does). It interpolates its positional
    embedding as the released model it stands in for (``_pos_embed``)."""
    import torch
    from transformers import AutoModel

    config = _hf_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model: torch.nn.Module = AutoModel.from_config(config, attn_implementation="sdpa")
    return _as_released(cfg, model)


def _as_released(cfg: ModelCfg, model: torch.nn.Module) -> torch.nn.Module:
    """``model``, interpolating its positional embedding as the official DINOv2 release
    does where ``cfg`` is a released DINOv2 (or a random model standing in for one)."""
    from ._pos_embed import uses_official_interpolation, with_official_interpolation

    return with_official_interpolation(model) if uses_official_interpolation(cfg) else model


def _strict_load(path: Path) -> torch.nn.Module:
    import torch
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        str(path), attn_implementation="sdpa", output_loading_info=True, dtype=torch.float32
    )
    missing = [k for k in info.get("missing_keys", []) if "mask_token" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelError(
            f"checkpoint {path} does not match its architecture: {len(missing)} missing and "
            f"{len(mismatched)} mismatched weight tensors (first: "
            f"{(missing or [str(m) for m in mismatched])[:3]}). Refusing to run with randomly "
            "initialised layers; use the checkpoint's original files."
        )
    if info.get("unexpected_keys"):
        log.info("ignoring %d unused tensors in %s", len(info["unexpected_keys"]), path)
    return cast(torch.nn.Module, model)


def _resolve_hub(hf_id: str, cache_dir: str | None, offline: bool) -> Path:
    """Local snapshot directory of ``hf_id``: from the HF cache, else downloaded."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(
            snapshot_download(
                hf_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
            )
        )
    except Exception as cached_exc:
        if offline:
            raise _unavailable(
                hf_id,
                f"not in the local cache ({type(cached_exc).__name__}), "
                "and downloads are off (offline mode)",
            ) from cached_exc
    quiet_progress()  # before a download
    try:
        return Path(snapshot_download(hf_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _unavailable(
            hf_id, f"not in the local cache and the download failed: {reason}"
        ) from exc


def _unavailable(hf_id: str, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"model weights for {hf_id!r} are not available: {why}. Either (a) download them where "
        f"there is internet (`hf download {hf_id}`) and copy the Hugging Face cache here "
        "(or set HF_HOME), or (b) pass --model /path/to/checkpoint, a directory with config.json "
        "and model.safetensors. For a smoke run without weights use --model dinov2-tiny-random "
        "(random weights, not for real use)."
    )


def weights_identity(
    spec: str, cfg: ModelCfg, *, cache_dir: str | None = None, offline: bool | None = None
) -> str:
    """What the weights of ``spec`` (resolved to ``cfg``) are made from, cheaply, without
    loading them: a checkpoint's directory and each of its files' name, size and mtime; for
    a random-weight model its config, seed and the torch and transformers versions that
    draw it. Equal identities give equal :func:`radcache.embeddings.encode.weights_hash`."""
    from importlib.metadata import version

    path = Path(spec).expanduser()
    if spec not in REGISTRY and path.is_dir():
        folder = path.resolve()
    elif cfg.random_weights:
        libs = f"torch {version('torch')}, transformers {version('transformers')}"
        return f"random {cfg!r} seed {RANDOM_SEED} {libs}"
    else:
        assert cfg.hf_id is not None
        folder = _resolve_hub(cfg.hf_id, cache_dir, _offline(offline)).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stats = [(p.relative_to(folder).as_posix(), p.stat()) for p in files]
    return "\n".join([str(folder), *(f"{n} {st.st_size} {st.st_mtime_ns}" for n, st in stats)])


def load_backbone(
    spec: str, *, cache_dir: str | None = None, offline: bool | None = None
) -> tuple[ModelCfg, torch.nn.Module]:
    """Resolve ``spec`` (registry name or checkpoint directory) to its config and HF module."""
    resolved = resolve_backbone(spec, cache_dir=cache_dir, offline=offline)
    if resolved is not None:
        cfg, build = resolved
        return cfg, build()
    path = Path(spec).expanduser()  # a kind a registered loader builds (see resolve_backbone)
    if spec not in REGISTRY and path.is_dir():
        load = next(load for is_mine, load in _DIR_LOADERS.values() if is_mine(path))
        return load(path)
    cfg = get_cfg(spec)
    return _ARCH_LOADERS[cfg.arch](cfg, cache_dir, _offline(offline))


def _offline(offline: bool | None) -> bool:
    """``offline``, else what ``HF_HUB_OFFLINE`` says."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


@functools.cache
def quiet_progress() -> None:
    """Third-party progress bars off, once per process, before radcache first finds or
    loads a model: transformers' (its weight-loading bar, on stderr even when that is a
    log file) always, Hugging Face Hub's download bars unless stderr is a terminal. Set by
    the libraries' documented switches (``transformers.utils.logging.disable_progress_bar``,
    which turns the Hub's off too, and ``huggingface_hub.utils.enable_progress_bars``); an
    ``HF_HUB_DISABLE_PROGRESS_BARS`` the user sets still decides the Hub's."""
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    with warnings.catch_warnings():  # the Hub warns where its variable overrides a call
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
        if hub_bars and sys.stderr.isatty():
            enable_progress_bars()


def plain_cfg(
    spec: str, *, cache_dir: str | None = None, offline: bool | None = None
) -> ModelCfg | None:
    """The config of ``spec`` where it is a plain DINOv2 (registry entry, checkpoint
    directory), read without torch or transformers (Hugging Face weights are found in the
    cache, or downloaded, here). None for the kinds registered loaders build (MM-DINOv2)."""
    path = Path(spec).expanduser()
    if spec not in REGISTRY and path.is_dir():
        claimed = any(is_mine(path) for is_mine, _ in _DIR_LOADERS.values())
        return None if claimed or is_mm_checkpoint(path) else _cfg_from_checkpoint(path, None)
    cfg = get_cfg(spec)
    if cfg.multi_sequence or cfg.arch in _ARCH_LOADERS:
        return None
    if cfg.arch not in _SUPPORTED_TYPES.values():
        raise ModelError(
            f"no loader is registered for {cfg.name} (arch {cfg.arch!r}); load models through "
            "radcache.embeddings.models.load_backbone, which registers every architecture."
        )
    if cfg.random_weights:
        return cfg
    assert cfg.hf_id is not None
    return _cfg_from_checkpoint(_resolve_hub(cfg.hf_id, cache_dir, _offline(offline)), cfg)


def resolve_backbone(
    spec: str, *, cache_dir: str | None = None, offline: bool | None = None
) -> tuple[ModelCfg, Callable[[], torch.nn.Module]] | None:
    """The config of ``spec`` and how to build its module, where the config is known
    without building it (:func:`plain_cfg`). None for the kinds registered loaders build
    (MM-DINOv2): :func:`load_backbone` loads those. Third-party progress bars go first
    (:func:`quiet_progress`)."""
    quiet_progress()
    cfg = plain_cfg(spec, cache_dir=cache_dir, offline=offline)
    if cfg is None:
        return None
    path = Path(spec).expanduser()
    if spec not in REGISTRY and path.is_dir():
        return cfg, lambda: _strict_load(path)
    if cfg.random_weights:
        return cfg, lambda: build_random(cfg)
    assert cfg.hf_id is not None
    local = _resolve_hub(cfg.hf_id, cache_dir, _offline(offline))  # found in the cache now
    return cfg, lambda: _as_released(cfg, _strict_load(local))
