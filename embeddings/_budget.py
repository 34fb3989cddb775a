"""Batch sizing by memory: how many slices one forward takes.

A batch holds as many slices as the memory budget allows, at most a cap. What one slice
costs is counted from the model's geometry (:func:`slice_bytes`), an upper bound checked
against measured peaks (``bench/bench_batch_memory.py`` on a CPU, ``tests/test_gpu.py``
on CUDA; bench/README.md):

* preprocessing: the raw slice as float32, its window channels, and the model input;
* twice the tensors of the forward and its outputs, for the kernels' own temporaries
  and the allocator's slack (on a CPU the peak was up to 1.6 times those tensors). The
  forward runs in inference mode with SDPA attention (no ``T²`` score matrix is held):
  the larger of the attention step (input, norm, q/k/v and their contiguous copies,
  attention output and projection: ``10·T·D``) and the MLP step (input, norm, two
  ``T·mlp`` activations: ``4·T·D + 2·T·mlp``), in the weights' dtype; the outputs kept
  while a batch is handed over are the tokens in the weights' dtype, their float32 mean
  and their float16 grid.

The budget, unless set: on CUDA half the device's free memory once the model is loaded
(the rest for the caching allocator's slack, CUDA graphs and a search-by-upload forward
beside the worker); on a CPU a quarter of the memory available (the kernel's
``MemAvailable``, within a container's cgroup limit), at most 4 GiB. The cap,
unless set: 32 slices on a CPU (larger batches gain nothing there, bench/README.md) and
512 on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .encode import Encoder
    from .models import ModelCfg
    from .preprocess import Prepared

__all__ = ["CPU_CAP", "CUDA_CAP", "BatchBudget", "auto_memory", "available_memory", "slice_bytes"]

CPU_CAP, CUDA_CAP = 32, 512
_CPU_MAX = 4 << 30


def slice_bytes(
    cfg: ModelCfg,
    size: tuple[int, int],
    weight_bytes: int,
    source: tuple[int, int] | None = None,
    channels: int = 3,
) -> int:
    """Peak bytes one slice adds to a batch: a ``size`` (rows, columns) model input to
    ``cfg`` with weights of ``weight_bytes`` per element; ``source``, the slice's
    size before it is resized, and its ``channels`` (windows) where preprocessing runs
    in the same memory."""
    rows, cols = size
    tokens = (rows // cfg.patch_size) * (cols // cfg.patch_size) + 1 + cfg.num_registers
    d = cfg.dim
    layer = tokens * max(10 * d, 4 * d + 2 * cfg.mlp_dim) * weight_bytes
    outputs = tokens * d * (weight_bytes + 4 + 2)
    model_input = 3 * rows * cols * (4 + weight_bytes)
    prep = 0 if source is None else source[0] * source[1] * 4 * (1 + channels)
    return 2 * (layer + outputs) + model_input + prep


def available_memory() -> int | None:
    """Bytes this process could still allocate without swapping: the kernel's
    ``MemAvailable`` (page cache counts as available), within the cgroup's
    ``memory.max`` where a container sets one; None where neither can be read."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(0, int(limit) - used))
    return min(found) if found else None


def auto_memory(device: torch.device) -> int:
    """The budget of ``device`` when none is set (module docstring)."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free) // 2
    available = available_memory()
    if available is None:  # not Linux: the free pages, where the system reports them
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return _CPU_MAX
    return min(available // 4, _CPU_MAX)


@dataclass
class BatchBudget:
    """At most ``cap`` slices a forward (None: :data:`CPU_CAP` or :data:`CUDA_CAP`), and
    no more than ``memory`` bytes hold (None: :func:`auto_memory`, measured once, when the
    first batch is sized: after the model is on its device)."""

    cap: int | None = None
    memory: int | None = None
    _auto: dict[str, int] = field(default_factory=dict, repr=False)

    def budget(self, device: torch.device) -> int:
        if self.memory is not None:
            return self.memory
        name = str(device)
        if name not in self._auto:
            self._auto[name] = auto_memory(device)
        return self._auto[name]

    def limit(self, device: torch.device) -> int:
        if self.cap is not None:
            return self.cap
        return CUDA_CAP if device.type == "cuda" else CPU_CAP

    def slices(
        self,
        cfg: ModelCfg,
        device: torch.device,
        weight_bytes: int,
        size: tuple[int, int],
        source: tuple[int, int] | None = None,
        channels: int = 3,
        per_slice: int = 1,
    ) -> int:
        """Slices (of ``per_slice`` images each: an MM-DINOv2 position holds one per
        sequence) in one forward at this input size: at least 1."""
        cost = per_slice * slice_bytes(cfg, size, weight_bytes, source, channels)
        return max(1, min(self.limit(device), self.budget(device) // cost))

    def for_prepared(self, enc: Encoder, prepared: Prepared, per_slice: int = 1) -> int:
        """Slices of ``prepared`` in one forward of ``enc`` (preprocessing included)."""
        from .recipe import CTWindows

        vox = prepared.volume.voxels
        policy = prepared.recipe.intensity
        channels = len(policy.windows) if isinstance(policy, CTWindows) else 3
        p = enc.cfg.patch_size
        size = (prepared.grid[0] * p, prepared.grid[1] * p)
        weight_bytes = enc.dtype.itemsize
        return self.slices(
            enc.cfg,
            enc.device,
            weight_bytes,
            size,
            (vox.shape[1], vox.shape[2]),
            channels,
            per_slice,
        )
