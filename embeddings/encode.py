"""Encode: model-ready tensors → CLS, patch-token and last-block CLS embeddings.

Entry point :func:`load_encoder` (registry name or checkpoint directory) returning an
:class:`Encoder`. Devices, the precision rules (``auto``: bf16 on CUDA at compute
capability ≥ 8.0, fp16 autocast below, bf16 on CPUs with native bf16, else fp32; the
choice is recorded), host↔device copies and the compiled forward are ``_device``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import xxhash

from ._device import (
    CompiledForward,
    HashMemo,
    Pending,
    Placement,
    Transfer,
    auto_precision,
    cpu_has_fast_bf16,
    numerics,
    resolve_device,
    resolve_precision,
)
from .errors import ModelError
from .models import ModelCfg, plain_cfg, weights_identity

if TYPE_CHECKING:  # torch loads with the first model (a cached re-run imports none)
    import torch

__all__ = [
    "Device",
    "Encoder",
    "LoadingEncoder",
    "Precision",
    "SliceEmbeddings",
    "auto_precision",
    "cpu_has_fast_bf16",
    "load_encoder",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)
Device = str  # auto | cpu | cuda | cuda:N (checked by _device.check_device)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class SliceEmbeddings:
    """Per-slice outputs, as numpy arrays ready for the store."""

    cls: np.ndarray  # (n, D) float32
    mean_patch: np.ndarray  # (n, D) float32
    patch: np.ndarray | None  # (n, h, w, D) float16, registers dropped
    cls_last: np.ndarray | None  # (n, k, D) float32: CLS after the final norm, last k blocks

    @property
    def pooled(self) -> np.ndarray:
        """Series vector: the mean of slice CLS tokens."""
        return np.asarray(self.cls.mean(axis=0), dtype=np.float32)


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of every weight tensor (name order, fp32 bytes): identifies the exact weights.

    A model whose outputs changed for the same weights declares an ``output_version``
    (MM-DINOv2 does); it is hashed too, so its cache keys and spaces change with it."""
    import torch

    h = xxhash.xxh3_128()
    version = getattr(model, "output_version", None)
    if version is not None:
        h.update(f"output-version:{version}|".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _first(output: object) -> torch.Tensor:
    """A block's output tensor, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


class Encoder:
    """A frozen DINOv2-family backbone on one device, at one precision.

    :meth:`forward` may be called from several threads at once (a search by upload beside
    the worker): what a call returns comes from that call's forward alone.
    """

    built = 0  # encoders built in this process, models loaded (tests use it)

    def __init__(
        self,
        cfg: ModelCfg,
        model: torch.nn.Module,
        device: torch.device,
        precision: str,
        *,
        compile: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.numerics = numerics(precision, device.type)
        self.dtype = self.numerics.weights  # of the weights and of the input
        self.weights_hash = weights_hash(model)  # of the weights as loaded, before any cast
        Encoder.built += 1
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=self.dtype)
        self.forward_count = 0  # number of model forward passes run (tests use it)
        self.transfer = Transfer(device)
        self.compiled = (
            CompiledForward(self.model, device) if compile and not cfg.multi_sequence else None
        )
        # The last blocks' CLS tokens are caught by hooks as the blocks run, rather than
        # asking for every hidden state (all tokens of every block, kept per batch). The
        # hooks stay registered and write into the calling thread's own capture: a hook
        # fires in the thread whose forward runs the block. The compiled forward has none.
        self._capture = threading.local()
        if not cfg.multi_sequence and self.compiled is None:
            depth = len(self._blocks())
            for i, block in enumerate(self._blocks()):
                block.register_forward_hook(self._catcher(depth - i))

    def _catcher(self, from_end: int) -> Callable[..., None]:
        def catch(_m: object, _i: object, output: object) -> None:
            caught: list[torch.Tensor] | None = getattr(self._capture, "caught", None)
            if caught is not None and from_end <= self._capture.last_n:
                caught.append(_first(output)[:, 0])

        return catch

    def forward(self, pixels: torch.Tensor, *, last_n: int = 0) -> tuple[torch.Tensor, ...]:
        """One batch → ``(cls, patch_grid, cls_last or empty)`` on the model's device."""
        import torch

        x = self.transfer.upload(pixels, self.dtype)
        kind = self.device.type
        if self.compiled is not None:
            with torch.inference_mode(), self.numerics.context(kind):
                cls, tokens, last = self.compiled(x, last_n)
        else:
            caught: list[torch.Tensor] = []
            self._capture.caught = caught if last_n > 0 else None
            self._capture.last_n = last_n
            try:
                with torch.inference_mode(), self.numerics.context(kind):
                    tokens = self.model(pixel_values=x).last_hidden_state
            finally:
                self._capture.caught = None
            cls = tokens[:, 0]
            if last_n > 0:
                norm: torch.nn.Module = self.model.layernorm  # type: ignore[assignment]
                with torch.inference_mode(), self.numerics.context(kind):
                    last = norm(torch.stack(caught, dim=1))
            else:
                last = torch.empty(0)
        self.forward_count += 1
        patches = tokens[:, 1 + self.cfg.num_registers :]
        n, _, s_h, s_w = x.shape
        h, w = s_h // self.cfg.patch_size, s_w // self.cfg.patch_size
        return cls, patches.reshape(n, h, w, -1), last

    def _blocks(self) -> list[torch.nn.Module]:
        return list(self.model.encoder.layer)  # type: ignore[union-attr, arg-type]

    def encode(
        self,
        batches: Iterable[torch.Tensor],
        *,
        patch_tokens: bool = True,
        last_n: int = 4,
        progress: Callable[[int], None] | None = None,
        on_batch: Callable[[int, SliceEmbeddings], None] | None = None,
    ) -> SliceEmbeddings:
        """Run every batch; collect CLS, mean patch token, patch grid (fp16) and last-``n`` CLS.

        With ``on_batch``, each batch's outputs are handed over as they come (row offset,
        outputs) and patch grids are not kept in memory: a consumer streams them away.

        On CUDA a batch's outputs come back on a copy stream while the next batch is
        prepared and its forward queued: a batch is handed over (and its one wait made)
        after the next one has started. On a CPU the outputs are the same arrays as ever.
        """
        import torch

        cls_l, mean_l, patch_l, last_l = [], [], [], []
        start = 0
        waiting: tuple[int, Pending] | None = None

        def hand_over(rows: int, pending: Pending) -> None:
            nonlocal start
            cls, mean, patch, last = pending.wait()
            assert cls is not None and mean is not None
            part = SliceEmbeddings(cls=cls, mean_patch=mean, patch=patch, cls_last=last)
            cls_l.append(part.cls)
            mean_l.append(part.mean_patch)
            if part.patch is not None and on_batch is None:
                patch_l.append(part.patch)
            if part.cls_last is not None:
                last_l.append(part.cls_last)
            if on_batch is not None:
                on_batch(start, part)
            start += rows
            if progress is not None:
                progress(rows)

        for pixels in batches:
            cls, grid, last = self.forward(pixels, last_n=last_n)
            with torch.inference_mode():
                outputs = [
                    cls.float(),
                    grid.float().mean(dim=(1, 2)),
                    grid.to(torch.float16) if patch_tokens else None,
                    last.float() if last_n > 0 else None,
                ]
            pending = self.transfer.download(outputs)
            if waiting is not None:
                hand_over(*waiting)
            waiting = (int(pixels.shape[0]), pending)
        if waiting is not None:
            hand_over(*waiting)
        d = self.cfg.dim
        return SliceEmbeddings(
            cls=np.concatenate(cls_l) if cls_l else np.zeros((0, d), np.float32),
            mean_patch=np.concatenate(mean_l) if mean_l else np.zeros((0, d), np.float32),
            patch=np.concatenate(patch_l) if patch_l else None,
            cls_last=np.concatenate(last_l) if last_l else None,
        )


class MMEncoder(Encoder):
    """MM-DINOv2 on one device and precision: one forward per batch of slice positions,
    every sequence of the vocabulary at once (missing ones masked)."""

    def forward_study(
        self, pixels: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, S, 3, H, W)`` pixels and ``(B, S)`` presence → CLS ``(B, D)`` and patch
        grids ``(B, S, h, w, D)``."""
        import torch

        x = self.transfer.upload(pixels, self.dtype)
        with torch.inference_mode(), self.numerics.context(self.device.type):
            out = self.model(x, present.to(self.device))
        self.forward_count += 1
        return out.cls, out.patch

    def forward(self, pixels: torch.Tensor, *, last_n: int = 0) -> tuple[torch.Tensor, ...]:
        raise ModelError(
            f"{self.cfg.name} embeds multi-sequence studies (Pipeline.embed_study), not single "
            "series; use a DINOv2 model for those."
        )


def load_encoder(
    spec: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    offline: bool | None = None,
    background: bool = False,
    hashes: Path | None = None,
    lazy: bool = False,
    compile: bool = False,
) -> Encoder:
    """Load ``spec`` (registry name or HF checkpoint directory) for inference.

    ``background``: find the weights and read the config here (so a model that cannot be
    had fails at once), and build the module on a thread of its own: the encoder returned
    (a :class:`LoadingEncoder`) knows its ``cfg`` at once, anything else waits for the
    weights. Kinds whose config needs the module (MM-DINOv2) load here as usual.

    ``hashes``: a JSON file remembering weights hashes by :func:`.models.weights_identity`
    (files' path, size, mtime); a loaded model's hash is written there. With ``lazy`` and
    the hash remembered, the encoder returned knows ``cfg``, ``weights_hash``,
    ``precision`` and ``device`` (all a cache key needs) and loads the weights only when
    something else is asked of it: answering cache hits costs no model load. Where the
    device and precision this machine resolves ``auto`` to are remembered too (they are,
    once a model has loaded here), it is returned without importing torch.

    ``compile``: the forward is ``torch.compile``d for fixed batch shapes (CUDA graphs on
    CUDA; ``_device.CompiledForward``); the first batch of each input size compiles."""
    if hashes is not None and lazy and not background:
        recalled = _recall(spec, device, precision, hashes, cache_dir, offline, compile)
        if recalled is not None:
            return recalled
    from .models import load_backbone, resolve_backbone

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if hashes is not None:
        Placement(hashes, device, precision).remember(str(dev), prec)
    if background or hashes is not None:
        resolved = resolve_backbone(spec, cache_dir=cache_dir, offline=offline)
        if resolved is not None and not resolved[0].multi_sequence:
            cfg, build = resolved
            memo = (
                HashMemo(hashes, weights_identity(spec, cfg, cache_dir=cache_dir, offline=offline))
                if hashes
                else None
            )

            def make() -> Encoder:
                enc = _ready(Encoder(cfg, build(), dev, prec, compile=compile))
                if memo is not None:
                    memo.remember(enc.weights_hash)
                return enc

            known = memo.recall() if memo is not None and (lazy or background) else None
            if background or known is not None:
                key = None if known is None else (known, prec, str(dev))
                return cast(Encoder, LoadingEncoder(cfg, make, start=background, key=key))
            return make()
    cfg, model = load_backbone(spec, cache_dir=cache_dir, offline=offline)
    kind = MMEncoder if cfg.multi_sequence else Encoder
    return _ready(kind(cfg, model, dev, prec, compile=compile))


def _recall(
    spec: str,
    device: str,
    precision: str,
    hashes: Path,
    cache_dir: str | None,
    offline: bool | None,
    compile: bool,
) -> Encoder | None:
    """A :class:`LoadingEncoder` of ``spec`` not started, from what ``hashes`` remembers
    (weights hash; device and precision for ``auto``), without importing torch or
    transformers; None where something is not remembered (or ``spec`` is MM-DINOv2)."""
    cfg = plain_cfg(spec, cache_dir=cache_dir, offline=offline)
    if cfg is None:
        return None
    placed = Placement(hashes, device, precision).recall()
    identity = weights_identity(spec, cfg, cache_dir=cache_dir, offline=offline)
    known = HashMemo(hashes, identity).recall()
    if placed is None or known is None:
        return None
    dev, prec = placed

    def build() -> Encoder:
        return load_encoder(
            spec,
            device=dev,
            precision=prec,
            cache_dir=cache_dir,
            offline=offline,
            hashes=hashes,
            compile=compile,
        )

    return cast(Encoder, LoadingEncoder(cfg, build, start=False, key=(known, prec, dev)))


def _ready(enc: Encoder) -> Encoder:
    log.info("loaded %s on %s at %s", enc.cfg.label, enc.device, enc.precision)
    return enc


class LoadingEncoder:
    """An :class:`Encoder` whose weights are being built on a thread of its own: ``cfg``
    at once, every other attribute once they are (an error of the build is raised by each
    use, and named by :attr:`failure`). With ``start=False`` the build starts on the first
    use that needs the weights; ``key`` (weights hash, precision, device: what a cache key
    needs) is known at once where given."""

    weights_hash: str
    precision: str

    def __init__(
        self,
        cfg: ModelCfg,
        build: Callable[[], Encoder],
        *,
        start: bool = True,
        key: tuple[str, str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._device: str | None = None
        if key is not None:
            self.weights_hash, self.precision, self._device = key
        self._built: Encoder | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._build, args=(build,), name="radcache-model", daemon=True
        )
        self._start = threading.Lock()
        self._started = False
        if start:
            self._begin()

    def _begin(self) -> None:
        with self._start:
            if not self._started:
                self._started = True
                self._thread.start()

    def _build(self, build: Callable[[], Encoder]) -> None:
        try:
            self._built = build()
        except BaseException as exc:  # reported by every use and by `failure`
            self._error = exc
            log.error("the model %s could not be loaded: %s", self.cfg.label, exc)
        finally:
            self._done.set()

    @property
    def device(self) -> torch.device:
        """Where the model runs (known at once with ``key``; torch is imported to say it)."""
        if self._device is None:
            return self.wait().device
        import torch

        return torch.device(self._device)

    @property
    def loaded(self) -> bool:
        """Whether the weights are in (False while building, or if the build failed)."""
        return self._built is not None

    @property
    def failure(self) -> str | None:
        """Why the build failed, if it did (None while building, or once loaded)."""
        return None if self._error is None else str(self._error) or type(self._error).__name__

    def wait(self) -> Encoder:
        """The loaded encoder (starts the build if need be, waits for it; raises what it
        raised)."""
        self._begin()
        self._done.wait()
        if self._built is None:
            if isinstance(self._error, ModelError):
                raise self._error
            raise ModelError(f"the model {self.cfg.label} could not be loaded: {self.failure}")
        return self._built

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wait(), name)
