"""CUDA-only checks: every fast path on the GPU equals the plain path. Marked ``gpu``:
skipped (saying why) where torch sees no CUDA device; ``pytest -m gpu tests/test_gpu.py``
runs them (bench/bench_gpu.py does, and records the result in its JSON)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radcache.embeddings import Pseudonymizer, Recipe, Volume, VolumeMeta, prepare
from radcache.embeddings._device import Transfer, auto_precision, resolve_precision
from radcache.embeddings.batching import BatchingEncoder
from radcache.embeddings.encode import Encoder
from radcache.embeddings.models import build_random, get_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),  # torch.compile's imports
]

TINY = get_cfg("dinov2-tiny-random")


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda:0")


def _encoder(device: torch.device, precision: str, *, compile: bool = False) -> Encoder:
    return Encoder(TINY, build_random(TINY), device, precision, compile=compile)


def _pixels(n: int = 6, size: int = 112, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_auto_precision_follows_the_capability(cuda: torch.device) -> None:
    expected = auto_precision("cuda", torch.cuda.get_device_capability(cuda), False)
    assert resolve_precision("auto", cuda) == expected


def test_cuda_fp32_matches_the_cpu(cuda: torch.device) -> None:
    x = _pixels()
    gpu = _encoder(cuda, "fp32").encode([x[:4], x[4:]], last_n=2)
    cpu = _encoder(torch.device("cpu"), "fp32").encode([x[:4], x[4:]], last_n=2)
    for name in ("cls", "mean_patch", "cls_last"):
        assert _cos(getattr(gpu, name), getattr(cpu, name)) > 0.9999  # TF32 convolutions
    assert gpu.patch is not None and gpu.patch.dtype == np.float16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_close_to_fp32(cuda: torch.device, precision: str) -> None:
    x = _pixels()
    enc = _encoder(cuda, precision)
    if precision == "fp16":  # autocast: the weights stay fp32
        assert next(enc.model.parameters()).dtype == torch.float32
    low = enc.encode([x], last_n=2)
    ref = _encoder(cuda, "fp32").encode([x], last_n=2)
    assert _cos(low.cls, ref.cls) > 0.99 and _cos(low.cls_last, ref.cls_last) > 0.99


def test_pinned_uploads_and_downloads_equal_plain_copies(cuda: torch.device) -> None:
    t = Transfer(cuda)
    x = _pixels(3)
    for host in (x, x.pin_memory()):
        up = t.upload(host, torch.float32)
        assert up.device.type == "cuda"
        torch.testing.assert_close(up.cpu(), x, rtol=0, atol=0)
    on_device = x.to(cuda)
    a, none, b = t.download([on_device, None, on_device.half()]).wait()
    assert none is None and a is not None and b is not None
    np.testing.assert_array_equal(a, x.numpy())
    np.testing.assert_array_equal(b, x.half().numpy())


def test_batches_prepared_on_the_device_embed_as_cpu_ones(cuda: torch.device) -> None:
    enc = _encoder(cuda, "fp32")
    on_cpu = enc.encode([_pixels(4), _pixels(2, seed=1)], last_n=0)
    on_gpu = enc.encode([_pixels(4).to(cuda), _pixels(2, seed=1).to(cuda)], last_n=0)
    np.testing.assert_array_equal(on_cpu.cls, on_gpu.cls)


def test_device_preprocessing_matches_the_cpu_recipe(cuda: torch.device) -> None:
    rng = np.random.default_rng(0)
    vox = rng.normal(40, 300, size=(9, 60, 50)).astype(np.float32)
    meta = VolumeMeta(source_format="nifti", study="s", series="s", modality="CT")
    volume = Volume.from_array(vox, np.eye(3)[::-1], np.ones(3), np.zeros(3), meta)
    prepared = prepare(volume, Recipe().resolve("CT", TINY), TINY)
    cpu = prepared.batch(0, prepared.n)
    gpu = prepared.batch(0, prepared.n, device=cuda)
    assert gpu.device.type == cuda.type
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_forward_with_cuda_graphs_matches_eager(
    cuda: torch.device, precision: str
) -> None:
    x = _pixels(7)
    batches = [x[:4], x[4:]]  # the second is padded to the first's shape
    compiled = _encoder(cuda, precision, compile=True)
    a = compiled.encode(batches, last_n=2)
    a_again = compiled.encode(batches, last_n=2)  # replayed graphs, outputs not overwritten
    b = _encoder(cuda, precision).encode(batches, last_n=2)
    np.testing.assert_array_equal(a.cls, a_again.cls)
    floor = 0.9999 if precision == "fp32" else 0.99
    for name in ("cls", "mean_patch", "cls_last", "patch"):
        assert _cos(getattr(a, name), getattr(b, name)) > floor, name


def test_batched_forwards_on_cuda_give_each_caller_its_rows(cuda: torch.device) -> None:
    enc = _encoder(cuda, "fp32")
    x = _pixels(5)
    alone = enc.encode([x], last_n=2)
    merged = BatchingEncoder(enc, max_batch=8).encode([x[:2], x[2:]], last_n=2)
    assert _cos(merged.cls, alone.cls) > 0.9999 and _cos(merged.cls_last, alone.cls_last) > 0.9999


def test_overlapped_pipeline_equals_sequential_on_cuda(
    cuda: torch.device, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    from radcache.embeddings import EmbeddingStore, Pipeline
    from tests.dicomgen import phantom, write_series

    series = [write_series(tmp_path / f"s{i}", phantom(12, 40, 40, seed=i)) for i in range(2)]
    enc = _encoder(cuda, "fp32")
    got = {}
    for overlap in (False, True):
        pipe = Pipeline(
            enc, EmbeddingStore(tmp_path / f"{overlap}.zarr"), pseudo, batch_size=5, overlap=overlap
        )
        report = pipe.embed([s.directory for s in series])
        assert report.ok, report.errors
        got[overlap] = {r.entry: pipe.store.read(r.entry, "cls") for r in report.series if r.entry}
    assert got[False].keys() == got[True].keys() and got[False]
    for key, cls in got[False].items():
        np.testing.assert_array_equal(cls, got[True][key])


@pytest.mark.parametrize("size", [224, 518])
def test_a_budget_sized_batch_stays_within_its_budget(cuda: torch.device, size: int) -> None:
    """The per-slice count (_budget.slice_bytes) bounds what a forward and its outputs
    allocate on the device: a batch sized for 1 GiB peaks under 1 GiB above the model."""
    from radcache.embeddings._budget import BatchBudget, slice_bytes

    cfg = get_cfg("dinov2-small-random")
    enc = Encoder(cfg, build_random(cfg), cuda, "bf16")
    budget = BatchBudget(cap=4096, memory=1 << 30)
    n = budget.slices(cfg, cuda, 2, (size, size))
    x = torch.randn(n, 3, size, size)
    enc.encode([x[:1]], last_n=4)  # kernels chosen, workspaces allocated
    torch.cuda.synchronize(cuda)
    base = torch.cuda.memory_allocated(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    enc.encode([x], last_n=4)
    peak = torch.cuda.max_memory_allocated(cuda) - base
    assert peak <= 1 << 30, (n, peak, n * slice_bytes(cfg, (size, size), 2))
