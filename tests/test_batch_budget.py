"""Batches sized by a memory budget: the count per slice, the caps, and that the slices a
forward takes change nothing but the number of forwards."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings._budget import CPU_CAP, BatchBudget, available_memory, slice_bytes
from radcache.embeddings.batching import BatchingEncoder
from radcache.embeddings.encode import Encoder
from radcache.embeddings.models import get_cfg
from radcache.embeddings.settings import Settings
from tests.dicomgen import phantom, write_series

CPU = torch.device("cpu")


def test_a_slice_costs_more_with_more_tokens_wider_models_and_wider_dtypes() -> None:
    small, large = get_cfg("dinov2-small"), get_cfg("dinov2-large")
    s224 = slice_bytes(small, (224, 224), 2)
    assert slice_bytes(small, (518, 518), 2) > 5 * s224  # 1,370 tokens against 257
    assert slice_bytes(large, (224, 224), 2) > 2 * s224  # D 1,024 against 384
    assert slice_bytes(small, (224, 224), 4) > 1.5 * s224
    # A 512² CT slice with three windows is preprocessed in the same memory.
    assert slice_bytes(small, (224, 224), 2, (512, 512), 3) - s224 == 512 * 512 * 4 * 4
    # ViT-S/14 at 224 in bf16: about 7 MB a slice (twice the MLP step, 257 tokens ×
    # 4,608 × 2 bytes, is the largest part), so the CPU's cap of 32 takes about 230 MB.
    assert 6e6 < s224 < 8e6


def test_a_budget_bounds_the_batch_under_the_cap() -> None:
    cfg = get_cfg("dinov2-small")
    one = slice_bytes(cfg, (224, 224), 2)
    assert BatchBudget(memory=10 * one).slices(cfg, CPU, 2, (224, 224)) == 10
    assert BatchBudget(memory=10 * one + one - 1).slices(cfg, CPU, 2, (224, 224)) == 10
    assert BatchBudget(memory=1).slices(cfg, CPU, 2, (224, 224)) == 1  # never none
    assert BatchBudget(memory=1 << 40).slices(cfg, CPU, 2, (224, 224)) == CPU_CAP
    assert BatchBudget(cap=7, memory=1 << 40).slices(cfg, CPU, 2, (224, 224)) == 7
    # Larger inputs take fewer slices; an MM-DINOv2 position holds every sequence.
    budget = BatchBudget(cap=4096, memory=1 << 30)
    assert budget.slices(cfg, CPU, 2, (518, 518)) < budget.slices(cfg, CPU, 2, (224, 224)) / 5
    four = budget.slices(cfg, CPU, 2, (224, 224), per_slice=4)
    assert four == budget.slices(cfg, CPU, 2, (224, 224)) // 4
    # Unset, the CPU budget is a quarter of the available memory, at most 4 GiB.
    available = available_memory()
    assert available is not None and available > 0  # Linux: /proc/meminfo
    assert 0 < BatchBudget().budget(CPU) <= min(4 << 30, int(available * 0.3))


def test_settings_take_the_budget_in_mib_and_leave_the_cap_to_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RADCACHE_BATCH_MEMORY_MB", "256")
    s = Settings()
    assert s.batch_size is None and s.batch_memory_bytes == 256 << 20
    monkeypatch.setenv("RADCACHE_BATCH_MEMORY_MB", "1")
    with pytest.raises(ValueError, match="greater than or equal to 16"):
        Settings()


def test_a_tight_budget_runs_more_forwards_and_stores_the_same_embeddings(
    tmp_path: Path, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> None:
    series = write_series(tmp_path / "s", phantom(10, 64, 64, seed=3)).directory
    prepared_cost = slice_bytes(tiny_fp32.cfg, (112, 112), 4, (64, 64), 3)
    wide = Pipeline(tiny_fp32, EmbeddingStore(tmp_path / "wide.zarr"), pseudo)
    tight = Pipeline(
        tiny_fp32, EmbeddingStore(tmp_path / "tight.zarr"), pseudo, batch_memory=3 * prepared_cost
    )
    counts, keys = [], []
    for pipe in (wide, tight):
        before = tiny_fp32.forward_count
        report = pipe.embed([series])
        assert report.ok, report.errors
        counts.append(tiny_fp32.forward_count - before)
        keys.append(report.series[0].entry)
    assert counts == [1, 4]  # 10 slices at once; 3 + 3 + 3 + 1
    a, b = keys
    assert a == b  # the batch size is not part of what names an entry
    for name in ("cls", "cls_last", "mean_patch"):
        np.testing.assert_allclose(wide.store.read(a, name), tight.store.read(b, name), atol=1e-5)


def test_concurrent_callers_are_merged_up_to_what_the_budget_holds(tiny_fp32: Encoder) -> None:
    one = slice_bytes(tiny_fp32.cfg, (112, 112), 4)
    batcher = BatchingEncoder(tiny_fp32, BatchBudget(memory=6 * one))
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 3, 112, 112, generator=gen) for _ in range(6)]
    sizes: list[int] = []
    real = Encoder.forward

    def counting(
        self: Encoder, pixels: torch.Tensor, *, last_n: int = 0
    ) -> tuple[torch.Tensor, ...]:
        sizes.append(int(pixels.shape[0]))
        return real(self, pixels, last_n=last_n)

    start = threading.Barrier(len(inputs))
    got: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        start.wait()
        got[i] = batcher.forward(inputs[i])[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Encoder, "forward", counting)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert max(sizes) <= 6 and sum(sizes) == 18
    for i, x in enumerate(inputs):
        torch.testing.assert_close(got[i], real(tiny_fp32, x)[0], atol=1e-5, rtol=0)
