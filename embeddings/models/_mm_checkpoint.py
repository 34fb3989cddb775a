"""MM-DINOv2 checkpoints: training checkpoints (read and written) and converted directories.

A training checkpoint is what the DINOv2/MM-DINOv2 training code saves (``TRAINING_TO_HF``
maps its names); a converted directory is the Hugging Face-style ``config.json`` +
``model.safetensors`` that radcache keeps. Loading is strict: every tensor, nothing more.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ._config import _hf_config, read_config
from ._mm_model import _MODEL_TYPES, SEQUENCES, MMDinov2
from ._registry import ModelCfg

__all__ = [
    "CHECKPOINT_PREFIXES",
    "CHECKPOINT_WRAPPERS",
    "SEQUENCE_EMBEDDING",
    "TRAINING_TO_HF",
    "convert",
    "load_converted",
    "load_training_checkpoint",
    "save_converted",
    "save_training_checkpoint",
]

log = logging.getLogger(__name__)

# --- Training-checkpoint layout -------------------------------------------------------------
# Names follow the DINOv2 training code (facebookresearch/dinov2, ``DinoVisionTransformer``);
# the sequence embedding is MM-DINOv2's ``mri_seq_embed`` (an ``nn.Embedding`` of 4 rows in
# SEQUENCES order, whatever order the training config lists its ``mri_sequences`` in), as its
# public code names it (dinov2/models/vision_transformer.py of daniel-scholz/mm-dinov2). No
# released MM-DINOv2 checkpoint was at hand to check these names against: if a checkpoint
# differs, correct them here.
# Values are the tensor names of Hugging Face DINOv2 checkpoints (``model.safetensors`` of
# facebook/dinov2-*); a 3-tuple splits a fused qkv tensor into query, key and value (rows in
# that order). ``{i}`` is the block index.

#: Where the teacher backbone sits in a state dict, tried in this order.
CHECKPOINT_PREFIXES: tuple[str, ...] = ("teacher.backbone.", "backbone.", "")
#: Top-level keys a state dict may be wrapped in (``teacher_checkpoint.pth``: ``teacher``).
CHECKPOINT_WRAPPERS: tuple[str, ...] = ("teacher", "model")
#: The sequence embedding's name in a converted directory's ``model.safetensors``.
SEQUENCE_EMBEDDING = "sequence_embedding"
TRAINING_TO_HF: dict[str, str | tuple[str, str, str]] = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "blocks.{i}.norm1.weight": "encoder.layer.{i}.norm1.weight",
    "blocks.{i}.norm1.bias": "encoder.layer.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight": (
        "encoder.layer.{i}.attention.attention.query.weight",
        "encoder.layer.{i}.attention.attention.key.weight",
        "encoder.layer.{i}.attention.attention.value.weight",
    ),
    "blocks.{i}.attn.qkv.bias": (
        "encoder.layer.{i}.attention.attention.query.bias",
        "encoder.layer.{i}.attention.attention.key.bias",
        "encoder.layer.{i}.attention.attention.value.bias",
    ),
    "blocks.{i}.attn.proj.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "blocks.{i}.attn.proj.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "blocks.{i}.ls1.gamma": "encoder.layer.{i}.layer_scale1.lambda1",
    "blocks.{i}.norm2.weight": "encoder.layer.{i}.norm2.weight",
    "blocks.{i}.norm2.bias": "encoder.layer.{i}.norm2.bias",
    "blocks.{i}.mlp.fc1.weight": "encoder.layer.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.fc1.bias": "encoder.layer.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight": "encoder.layer.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias": "encoder.layer.{i}.mlp.fc2.bias",
    "blocks.{i}.ls2.gamma": "encoder.layer.{i}.layer_scale2.lambda1",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "mri_seq_embed.weight": SEQUENCE_EMBEDDING,
}
# --------------------------------------------------------------------------------------------

# FSDP block chunks (``block_chunks > 0`` in the training config) name block i of chunk c
# ``blocks.{c}.{i}``, i counted over all blocks: read as ``blocks.{i}``.
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# transformers >= 5 names the attention projections q/k/v/o_proj inside the module and
# renames them on loading and saving; checkpoints keep the names of TRAINING_TO_HF.
_HF_TO_MODULE = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_SHOW = 8  # offending names listed per kind in an error message


def _name_table(depth: int) -> dict[str, str | tuple[str, str, str]]:
    """TRAINING_TO_HF with the block entries written out for ``depth`` blocks."""
    out: dict[str, str | tuple[str, str, str]] = {}
    for train, hf in TRAINING_TO_HF.items():
        for i in range(depth) if "{i}" in train else [None]:
            key = train.format(i=i) if i is not None else train
            if isinstance(hf, tuple):
                out[key] = (hf[0].format(i=i), hf[1].format(i=i), hf[2].format(i=i))
            else:
                out[key] = hf.format(i=i) if i is not None else hf
    return out


def _lookup(name: str) -> str | tuple[str, str, str] | None:
    """The HF name(s) of one training name (prefix already removed), or None if unknown."""
    name = _CHUNKED.sub(r"blocks.\1.", name)
    if "{" not in name and name in TRAINING_TO_HF:
        return TRAINING_TO_HF[name]
    m = _BLOCK.match(name)
    hf = TRAINING_TO_HF.get(f"blocks.{{i}}.{m[2]}") if m else None
    if m is None or hf is None:
        return None
    i = int(m[1])
    if isinstance(hf, tuple):
        return (hf[0].format(i=i), hf[1].format(i=i), hf[2].format(i=i))
    return hf.format(i=i)


def _uses_proj_names(backbone: nn.Module) -> bool:
    return any(".attention.q_proj." in k for k in backbone.state_dict())


def _hf_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors under their Hugging Face checkpoint names."""
    state = backbone.state_dict()
    if not _uses_proj_names(backbone):
        return dict(state)
    out = {}
    for name, t in state.items():
        hf_name = name
        for hf, mod in _HF_TO_MODULE:
            hf_name = hf_name.replace(mod, hf)
        out[hf_name] = t
    return out


def _load_hf_state(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint-named tensors into ``backbone`` (every name checked beforehand)."""
    renamed = _uses_proj_names(backbone)
    own = {}
    for name, t in state.items():
        own_name = name
        for hf, mod in _HF_TO_MODULE if renamed else ():
            own_name = own_name.replace(hf, mod)
        own[own_name] = t
    backbone.load_state_dict(own, strict=True)


def _skeleton(config: Any) -> nn.Module:
    """An HF backbone for ``config`` (SDPA), its weights to be overwritten; global RNG untouched."""
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        model: nn.Module = AutoModel.from_config(config, attn_implementation="sdpa")
    return model


def _mismatch(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    name_of: Mapping[str, str] | None = None,
    unexpected: Sequence[str] = (),
) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors, as message parts (empty when it fits)."""

    def show(names: Sequence[str]) -> str:
        more = f", … {len(names) - _SHOW} more" if len(names) > _SHOW else ""
        return ", ".join(names[:_SHOW]) + more

    rename = name_of or {}
    missing = sorted({rename.get(k, k) for k in expected if k not in got})
    extra = [*unexpected, *(rename.get(k, k) for k in got if k not in expected)]
    shapes = [
        f"{rename.get(k, k)} {tuple(t.shape)} (expected {tuple(expected[k])})"
        for k, t in got.items()
        if k in expected and t.shape != expected[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected: {show(sorted(extra))}")
    if shapes:
        parts.append(f"{len(shapes)} of another shape: {show(shapes)}")
    return parts


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The flat tensor dict inside a checkpoint and the prefix its backbone sits under."""
    while isinstance(obj, Mapping) and not any(
        isinstance(k, str) and k.startswith(CHECKPOINT_PREFIXES[:-1]) for k in obj
    ):
        inner = next((obj[w] for w in CHECKPOINT_WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"{source} holds a {type(obj).__name__}; expected a state dict (name → tensor), "
            f"possibly wrapped under one of the keys {list(CHECKPOINT_WRAPPERS)}."
        )
    odd = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ModelError(
            f"{source}: entries {odd[:_SHOW]} are not tensors; expected a state dict of the "
            f"teacher backbone (wrapped under {list(CHECKPOINT_WRAPPERS)} at most)."
        )
    state: dict[str, torch.Tensor] = dict(obj)
    prefix = next((p for p in CHECKPOINT_PREFIXES if any(k.startswith(p) for k in state)), "")
    return state, prefix


def load_training_checkpoint(
    path_or_state: str | Path | Mapping[str, Any],
    *,
    arch_cfg: ModelCfg,
    sequences: Sequence[str] = SEQUENCES,
    use_sequence_embedding: bool = True,
) -> MMDinov2:
    """Load a DINOv2/MM-DINOv2 training checkpoint strictly into an :class:`MMDinov2`.

    Accepts ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.…": …}}``), a trainer
    checkpoint (``{"model": {"teacher.backbone.…": …}}``) or a bare backbone state dict.
    Outside the backbone prefix (heads, student) tensors are ignored; inside it every tensor
    must map through :data:`TRAINING_TO_HF` and every weight of ``arch_cfg``'s architecture
    must be there, else :class:`ModelError` names the offending keys. The positional-embedding
    grid is taken from the checkpoint. ``mri_seq_embed`` has 4 rows, one per name of
    :data:`SEQUENCES`; ``sequences`` is the order the inputs come in (the training config's
    ``mri_sequences``, e.g. ``("t2", "t1", "t1c", "flair")``), each taking its row by name.
    ``use_sequence_embedding=False`` (a run trained with ``use_mri_seq_embed: False``)
    zeroes the sequence embedding, which then adds nothing.
    """
    source = str(path_or_state) if isinstance(path_or_state, str | Path) else "state dict"
    if isinstance(path_or_state, str | Path):
        try:
            obj: Any = torch.load(Path(path_or_state), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise ModelError(
                f"cannot read training checkpoint {source} ({exc}); expected a file written by "
                "torch.save holding tensors only, such as eval/training_N/teacher_checkpoint.pth. "
                "If it also holds other objects, load it yourself and pass its state dict."
            ) from exc
    else:
        obj = path_or_state
    state, prefix = _unwrap(obj, source)
    hf: dict[str, torch.Tensor] = {}
    name_of: dict[str, str] = {}
    unexpected: list[str] = []
    ignored = 0
    for key, tensor in state.items():
        if not key.startswith(prefix):
            ignored += 1
            continue
        target = _lookup(key[len(prefix) :])
        if target is None:
            unexpected.append(key)
        elif isinstance(target, tuple):
            if tensor.shape[0] % 3:
                unexpected.append(f"{key} {tuple(tensor.shape)} (not a fused q, k, v)")
                continue
            for name, part in zip(target, tensor.chunk(3, dim=0), strict=True):
                hf[name], name_of[name] = part, key
        else:
            hf[target], name_of[target] = tensor, key
    if ignored:
        log.info("%s: ignoring %d tensors outside %r (heads, student)", source, ignored, prefix)

    config = _hf_config(arch_cfg)
    pos = hf.get("embeddings.position_embeddings")
    if pos is not None and pos.dim() == 3:
        grid = math.isqrt(pos.shape[1] - 1)
        if grid * grid == pos.shape[1] - 1:
            config.image_size = grid * arch_cfg.patch_size
    backbone = _skeleton(config)
    expected = {k: t.shape for k, t in _hf_state(backbone).items()}
    expected[SEQUENCE_EMBEDDING] = torch.Size((len(SEQUENCES), arch_cfg.dim))
    for train, target in _name_table(arch_cfg.depth).items():  # name missing keys as trained
        for name in target if isinstance(target, tuple) else (target,):
            name_of.setdefault(name, prefix + train)
    problems = _mismatch(hf, expected, name_of, unexpected)
    if problems:
        raise ModelError(
            f"training checkpoint {source} does not match {arch_cfg.name} ({arch_cfg.depth} "
            f"blocks, width {arch_cfg.dim}, {arch_cfg.num_registers} registers, a sequence "
            f"embedding of {len(SEQUENCES)} rows {SEQUENCES}) under prefix {prefix!r}: "
            + "; ".join(problems)
            + ". Pass the arch_cfg the checkpoint was trained with; if its tensor names "
            "differ, correct TRAINING_TO_HF in radcache/embeddings/models/_mm_checkpoint.py."
        )
    seq = hf.pop(SEQUENCE_EMBEDDING)
    _load_hf_state(backbone, hf)
    if not use_sequence_embedding:
        seq = torch.zeros_like(seq)
    return MMDinov2(backbone, seq.float(), sequences, untrained=False)


def save_training_checkpoint(
    model: MMDinov2,
    path: str | Path,
    *,
    prefix: str = "backbone.",
    wrapper: str | None = "teacher",
) -> Path:
    """Write ``model`` as the training code does (default: ``teacher_checkpoint.pth`` layout)."""
    hf = _hf_state(model.backbone)
    hf[SEQUENCE_EMBEDDING] = model.sequence_embedding
    depth = int(model._config.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for train, target in _name_table(depth).items():
        names = target if isinstance(target, tuple) else (target,)
        if all(n in hf for n in names):
            out[prefix + train] = torch.cat([hf[n].detach() for n in names]).clone()
            used.update(names)
    left = sorted(set(hf) - used)
    if left:
        raise ModelError(
            f"no training-checkpoint name for {left[:_SHOW]}; expected a plain-MLP DINOv2 "
            "backbone (TRAINING_TO_HF covers no SwiGLU MLP)."
        )
    target_path = Path(path)
    torch.save({wrapper: out} if wrapper else out, target_path)
    return target_path


def save_converted(model: MMDinov2, out_dir: str | Path) -> Path:
    """Write ``model`` as a Hugging Face-style directory: config.json + model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = model._config.to_dict()
    config["architectures"] = [type(model.backbone).__name__]
    config["mm_dinov2"] = {
        "sequences": list(model.sequences),
        "untrained_sequence_embedding": model.untrained,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().contiguous() for k, t in _hf_state(model.backbone).items()}
    tensors[SEQUENCE_EMBEDDING] = model.sequence_embedding.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def convert(
    path: str | Path,
    out_dir: str | Path,
    *,
    arch_cfg: ModelCfg,
    sequences: Sequence[str] = SEQUENCES,
    use_sequence_embedding: bool = True,
) -> Path:
    """Training checkpoint → the directory :func:`load_converted` reads; returns ``out_dir``."""
    model = load_training_checkpoint(
        path, arch_cfg=arch_cfg, sequences=sequences, use_sequence_embedding=use_sequence_embedding
    )
    return save_converted(model, out_dir)


def load_converted(out_dir: str | Path) -> MMDinov2:
    """Load a directory written by :func:`convert` strictly (every tensor, nothing more)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(out_dir)
    config = read_config(
        path,
        "a directory written by radcache.embeddings.models.convert "
        "(config.json + model.safetensors)",
    )
    mm = config.pop("mm_dinov2", None)
    model_type = config.pop("model_type", None)
    if not isinstance(mm, dict) or model_type not in _MODEL_TYPES:
        raise ModelError(
            f"{path} is not an MM-DINOv2 directory (model_type {model_type!r}, "
            f"{'no' if not isinstance(mm, dict) else 'an'} mm_dinov2 section); expected the "
            "output of radcache.embeddings.models.convert. Convert the training checkpoint "
            "first."
        )
    sequences = tuple(str(s) for s in mm.get("sequences", ()))
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise ModelError(
            f"cannot read {path / 'model.safetensors'} ({exc}); convert the training "
            "checkpoint again."
        ) from exc
    backbone = _skeleton(AutoConfig.for_model(model_type, **config))
    expected = {k: t.shape for k, t in _hf_state(backbone).items()}
    expected[SEQUENCE_EMBEDDING] = torch.Size((len(SEQUENCES), int(config["hidden_size"])))
    problems = _mismatch(weights, expected)
    if problems:
        raise ModelError(
            f"{path / 'model.safetensors'} does not match its config.json: "
            + "; ".join(problems)
            + ". Refusing to run with missing or stray weights; convert the training "
            "checkpoint again."
        )
    seq = weights.pop(SEQUENCE_EMBEDDING)
    _load_hf_state(backbone, weights)
    return MMDinov2(
        backbone, seq, sequences, untrained=bool(mm.get("untrained_sequence_embedding", False))
    )
