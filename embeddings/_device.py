"""Where and how the encoder runs: device names, the precision rules, host↔device copies,
and the compiled forward.

Rules (docs/DEPLOY.md, "Devices and precision"):

* A device is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``auto`` is CUDA where torch
  sees it. A CUDA device torch does not see is a :class:`ConfigError` at load.
* Precision ``auto`` (:func:`auto_precision`): on CUDA, bf16 where the compute capability
  is at least 8.0 (Ampere and later run it natively; ``torch.cuda.is_bf16_supported``
  also says yes for emulated bf16) and fp16 below; on a CPU, bf16 where oneDNN runs it
  natively (AVX-512 BF16 or AMX), else fp32.
* bf16 casts the weights (every device; LayerNorm kernels and SDPA accumulate in fp32).
  fp16 on CUDA is autocast with fp32 weights (LayerNorm and softmax run in fp32); on a
  CPU it casts the weights, as before.
* On CUDA a batch goes up from pinned memory on a copy stream, and its outputs come back
  into pinned memory on another: one synchronisation per batch (:class:`Transfer`). On a
  CPU both are no-ops.

What ``auto`` resolved to on this host is remembered (:class:`Placement`) in the
weights-hash file (:class:`HashMemo`), so a cached re-run names its entries without torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_PATTERN",
    "PRECISIONS",
    "CompiledForward",
    "HashMemo",
    "Numerics",
    "Pending",
    "Placement",
    "Transfer",
    "auto_precision",
    "check_device",
    "cpu_has_fast_bf16",
    "numerics",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "fp16")
#: A device name: auto, cpu, cuda or cuda:N (the settings' pattern; torch checks N at load).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,3})?)$"
_DEVICE = re.compile(DEVICE_PATTERN)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_device(name: str) -> str:
    """``name`` if it is a device name radcache takes (``auto|cpu|cuda|cuda:N``), without
    importing torch; else :class:`ConfigError`."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(
            f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N (N a GPU index, "
            "e.g. cuda:0)."
        )
    return name


def resolve_device(device: str) -> torch.device:
    """The torch device ``device`` names on this machine; :class:`ConfigError` where torch
    sees no CUDA device, or no device of that index."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"device {device!r} was asked for but torch sees no CUDA device (torch "
            f"{torch.__version__}, {build}); use --device cpu or auto, or install a CUDA "
            "build of torch on a machine with a visible GPU."
        )
    dev = torch.device(device)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"device {device!r} was asked for but torch sees {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1}, after CUDA_VISIBLE_DEVICES); pick one of those."
        )
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(
    device_type: str, capability: tuple[int, int] | None, cpu_fast_bf16: bool
) -> str:
    """What precision ``auto`` means: on CUDA bf16 at compute capability ≥ 8.0 and fp16
    below (``capability`` as ``torch.cuda.get_device_capability`` gives it); on a CPU bf16
    with native bf16 (``cpu_fast_bf16``), else fp32."""
    if device_type == "cuda":
        return "bf16" if capability is not None and capability >= (8, 0) else "fp16"
    return "bf16" if cpu_fast_bf16 else "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` (``auto|fp32|bf16|fp16``) resolved for ``device`` (:func:`auto_precision`)."""
    if precision not in ("auto", *PRECISIONS):
        raise ConfigError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return auto_precision("cuda", torch.cuda.get_device_capability(device), False)
    return auto_precision(device.type, None, cpu_has_fast_bf16())


@dataclass(frozen=True)
class Numerics:
    """How a precision runs on a device: the dtype the weights are held in (and the input
    is given in), and the autocast dtype, if any."""

    weights: torch.dtype
    autocast: torch.dtype | None

    def context(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        """The autocast region of a forward (nothing where the weights are cast)."""
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)


def numerics(precision: str, device_type: str) -> Numerics:
    """fp16 on CUDA is autocast over fp32 weights; every other precision casts the weights."""
    import torch

    dtype: torch.dtype = getattr(torch, _DTYPES[precision])
    if precision == "fp16" and device_type == "cuda":
        return Numerics(weights=torch.float32, autocast=dtype)
    return Numerics(weights=dtype, autocast=None)


class Pending:
    """Outputs of one batch on their way to host memory: :meth:`wait` synchronises once
    (on CUDA, the copy stream's event) and gives the numpy arrays (None stays None)."""

    def __init__(self, hosts: Sequence[torch.Tensor | None], event: Any = None) -> None:
        self._hosts = hosts
        self._event = event

    def wait(self) -> list[np.ndarray | None]:
        if self._event is not None:
            self._event.synchronize()
        return [None if h is None else h.numpy() for h in self._hosts]


class Transfer:
    """Host↔device copies of one device. On CUDA: a batch is staged in pinned memory
    (torch's caching host allocator reuses the blocks once their copies are done) and
    copied on an upload stream that the compute stream waits for; outputs are copied into
    pinned memory on a download stream, one event per batch. On a CPU nothing is copied."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._streams: tuple[Any, Any] | None = None

    def _side(self) -> tuple[Any, Any]:
        if self._streams is None:  # made on first use, in the thread that runs the model
            self._streams = (_stream(self.device), _stream(self.device))
        return self._streams

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def upload(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``pixels`` on the device in ``dtype``; on CUDA asynchronous from pinned memory."""
        import torch

        if not self.cuda or pixels.device.type == "cuda":
            return pixels.to(self.device, dtype=dtype)
        with self._on_device():
            up, _ = self._side()
            compute = torch.cuda.current_stream(self.device)
            host = pixels if pixels.is_pinned() else _pinned_copy(pixels)
            with torch.cuda.stream(up):
                x = host.to(self.device, non_blocking=True)
            compute.wait_stream(up)
            x.record_stream(compute)  # allocated on the upload stream, used on compute
            return x.to(dtype)

    def download(self, tensors: Sequence[torch.Tensor | None]) -> Pending:
        """Start copying ``tensors`` (device tensors, or None) to host memory; the
        :class:`Pending` it returns waits for them. On a CPU they are the arrays."""
        import torch

        if not self.cuda:
            return Pending(tensors)
        with self._on_device():
            _, down = self._side()
            down.wait_stream(torch.cuda.current_stream(self.device))
            hosts: list[torch.Tensor | None] = []
            with torch.cuda.stream(down):
                for t in tensors:
                    if t is None:
                        hosts.append(None)
                        continue
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    t.record_stream(down)
                    hosts.append(h)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(down)
        return Pending(hosts, event)


def _stream(device: torch.device) -> Any:
    import torch

    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _pinned_copy(pixels: torch.Tensor) -> torch.Tensor:
    import torch

    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    return host.copy_(pixels)


Core = Callable[["torch.Tensor", int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


class CompiledForward:
    """``torch.compile`` of the whole forward (tokens and last-``n`` CLS in one graph, no
    hooks), for fixed batch shapes: a batch is padded with zeros to the largest batch seen
    at its input size, so a series' last, shorter batch compiles nothing new. On CUDA the
    graph is captured as CUDA graphs (``reduce-overhead``) and the outputs are cloned out
    of the graphs' memory before the next replay can overwrite them. ``backend`` is
    ``torch.compile``'s (inductor generates the kernels; ``aot_eager`` traces the same graph
    and runs it eagerly, for checks that need no code generation)."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, backend: str = "inductor"
    ) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._largest: dict[tuple[int, ...], int] = {}
        mode = "reduce-overhead" if self.cuda and backend == "inductor" else None
        self._fn: Core = torch.compile(_core(model), backend=backend, mode=mode, dynamic=False)

    def __call__(
        self, x: torch.Tensor, last_n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        n, shape = int(x.shape[0]), tuple(x.shape[1:])
        size = self._largest[shape] = max(self._largest.get(shape, 0), n)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *shape))])
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        cls, tokens, last = self._fn(x, last_n)
        outs = (cls[:n], tokens[:n], last[:n] if last_n > 0 else last)
        if self.cuda:
            return (outs[0].clone(), outs[1].clone(), outs[2].clone())
        return outs


def _core(model: torch.nn.Module) -> Core:
    """The forward as one function: CLS, all tokens, and the CLS of the last ``n`` blocks
    after the final norm (from the hidden states: inside one graph only what is returned
    is kept)."""
    import torch

    norm: torch.nn.Module = model.layernorm  # type: ignore[assignment]

    def core(x: torch.Tensor, last_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = model(pixel_values=x, output_hidden_states=last_n > 0)
        tokens: torch.Tensor = out.last_hidden_state
        if last_n > 0:
            last = norm(torch.stack([h[:, 0] for h in out.hidden_states[-last_n:]], dim=1))
        else:
            last = tokens.new_empty(0)
        return tokens[:, 0], tokens, last

    return core


class HashMemo:
    """One checkpoint's entry in the remembered weights hashes (a small JSON file)."""

    def __init__(self, path: Path, identity: str) -> None:
        import xxhash  # the server extra's: the settings import this module without it

        self.path = path.expanduser()
        self.key = xxhash.xxh3_128_hexdigest(identity.encode())

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the hash is computed again
        return data if isinstance(data, dict) else {}

    def recall(self) -> str | None:
        value = self._read().get(self.key)
        return value if isinstance(value, str) else None

    def remember(self, weights_hash: str) -> None:
        data = self._read()
        if data.get(self.key) == weights_hash:
            return
        data[self.key] = weights_hash
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home: the next run loads the model again
            log.warning("could not remember the weights hash in %s: %s", self.path, exc)


class Placement:
    """The device and precision ``device``/``precision`` resolve to on this machine, as
    remembered in the weights-hash file: what ``auto`` gives depends on the host, the
    torch build and the GPUs visible, so those name the entry. Explicit ``cpu`` with an
    explicit precision needs no memory."""

    def __init__(self, hashes: Path, device: str, precision: str) -> None:
        self.asked = (device, precision)
        gpus = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        host = f"{platform.node()} torch {version('torch')} gpus {gpus} visible {visible}"
        self.memo = HashMemo(hashes, f"placement {device} {precision} on {host}")

    def recall(self) -> tuple[str, str] | None:
        device, precision = self.asked
        if device == "cpu" and precision in PRECISIONS:
            return device, precision
        dev, _, prec = (self.memo.recall() or "").partition(" ")
        known = dev == "cpu" or dev.startswith("cuda")
        return (dev, prec) if known and prec in PRECISIONS else None

    def remember(self, device: str, precision: str) -> None:
        if self.asked != ("cpu", precision):
            self.memo.remember(f"{device} {precision}")
