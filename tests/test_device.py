"""Devices and precision: the ``auto`` rules, device names, the CPU copy path, the compiled
forward, and ``radcache worker --gpus`` (one process per GPU), all without a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from radcache.embeddings import _device
from radcache.embeddings._device import (
    CompiledForward,
    Placement,
    auto_precision,
    check_device,
    numerics,
    resolve_device,
    resolve_precision,
)
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import ConfigError
from radcache.embeddings.ingest._decode_pool import auto_workers
from radcache.embeddings.models import build_random
from radcache.embeddings.settings import Settings
from radcache.service.cli import _fanout, main


@pytest.mark.parametrize(
    ("device", "capability", "fast", "expected"),
    [
        ("cuda", (7, 5), False, "fp16"),  # T4: bf16 only emulated
        ("cuda", (7, 0), True, "fp16"),  # V100
        ("cuda", (8, 0), False, "bf16"),  # A100
        ("cuda", (8, 9), False, "bf16"),  # L4
        ("cuda", (9, 0), False, "bf16"),  # H100/H200
        ("cuda", None, False, "fp16"),
        ("cpu", None, True, "bf16"),
        ("cpu", None, False, "fp32"),
    ],
)
def test_auto_precision_rules(
    device: str, capability: tuple[int, int] | None, fast: bool, expected: str
) -> None:
    assert auto_precision(device, capability, fast) == expected


def test_resolve_precision_asks_the_gpu_its_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def capability(dev: torch.device) -> tuple[int, int]:
        asked.append(dev)
        return (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated
    assert resolve_precision("auto", torch.device("cuda:1")) == "fp16"
    assert asked == [torch.device("cuda:1")]
    assert resolve_precision("bf16", torch.device("cuda:1")) == "bf16"  # as asked
    with pytest.raises(ConfigError, match="expected auto, fp32"):
        resolve_precision("int8", torch.device("cpu"))


def test_how_each_precision_runs() -> None:
    fp16_cuda = numerics("fp16", "cuda")
    assert fp16_cuda.weights == torch.float32 and fp16_cuda.autocast == torch.float16
    assert numerics("bf16", "cuda").weights == torch.bfloat16
    assert numerics("bf16", "cuda").autocast is None
    assert numerics("bf16", "cpu").weights == torch.bfloat16
    assert numerics("fp16", "cpu").weights == torch.float16  # cast, as before
    assert numerics("fp32", "cuda").autocast is None


def test_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device(ok) == ok
        assert Settings(device=ok).device == ok
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", "cuda:0,1", "mps"):
        with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
            check_device(bad)
        with pytest.raises(ValidationError):
            Settings(device=bad)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"sees 2 CUDA device\(s\) \(cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_an_indexed_gpu_is_remembered(tmp_path: Path) -> None:
    place = Placement(tmp_path / "hashes.json", "auto", "auto")
    place.remember("cuda:1", "bf16")
    assert Placement(tmp_path / "hashes.json", "auto", "auto").recall() == ("cuda:1", "bf16")


def test_cpu_outputs_are_the_arrays_of_the_plain_copies(tiny_fp32: Encoder) -> None:
    """Each batch's outputs, handed over one batch late (the copy path's overlap), are
    bit for bit what the forward gives through ``.float().cpu().numpy()``, in order."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 112, 112, generator=g) for n in (3, 3, 2)]
    got: list[tuple[int, object]] = []
    rows: list[int] = []
    emb = tiny_fp32.encode(
        batches, last_n=2, on_batch=lambda s, p: got.append((s, p)), progress=rows.append
    )
    assert [s for s, _ in got] == [0, 3, 6] and rows == [3, 3, 2]
    for (_, part), x in zip(got, batches, strict=True):
        cls, grid, last = tiny_fp32.forward(x, last_n=2)
        plain = [
            cls.float().cpu().numpy(),
            grid.float().mean(dim=(1, 2)).cpu().numpy(),
            grid.to(torch.float16).cpu().numpy(),
            last.float().cpu().numpy(),
        ]
        mine = [part.cls, part.mean_patch, part.patch, part.cls_last]  # type: ignore[attr-defined]
        for a, b in zip(mine, plain, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    assert emb.patch is None and emb.cls.shape == (8, tiny_fp32.cfg.dim)
    np.testing.assert_array_equal(emb.cls, np.concatenate([p.cls for _, p in got]))  # type: ignore[attr-defined]


def test_the_cpu_transfer_copies_nothing() -> None:
    t = _device.Transfer(torch.device("cpu"))
    x = torch.rand(2, 3)
    assert t.upload(x, torch.float32) is x
    (a, none) = t.download([x, None]).wait()
    assert none is None and a is not None and np.shares_memory(a, x.numpy())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")  # torch.compile's own imports
def test_compiled_forward_matches_eager(tiny_fp32: Encoder) -> None:
    """torch.compile'd forward (one graph, padded to the largest batch seen) equals the
    eager one within fp32 tolerance, last-n CLS included; a shorter batch adds no shape.
    The graph is traced by dynamo and AOT autograd as with inductor, and run eagerly:
    inductor's C++ code generation alone costs 20 s on a cold cache here; the GPU tests
    run inductor with CUDA graphs (test_gpu.py)."""
    compiled = Encoder(
        tiny_fp32.cfg, build_random(tiny_fp32.cfg), torch.device("cpu"), "fp32", compile=True
    )
    assert compiled.compiled is not None and compiled.weights_hash == tiny_fp32.weights_hash
    compiled.compiled = CompiledForward(compiled.model, torch.device("cpu"), backend="aot_eager")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 112, 112, generator=g)
    a = compiled.encode([x[:3], x[3:]], last_n=2)
    b = tiny_fp32.encode([x[:3], x[3:]], last_n=2)
    for name in ("cls", "mean_patch", "cls_last"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-4)
    assert a.patch is not None and b.patch is not None
    np.testing.assert_allclose(a.patch.astype(np.float32), b.patch.astype(np.float32), atol=2e-3)
    assert compiled.compiled._largest == {(3, 112, 112): 3}


def test_gpus_are_parsed_against_what_torch_sees() -> None:
    assert _fanout.parse_gpus("0,1", 2) == [0, 1]
    assert _fanout.parse_gpus(" 1 ", 2) == [1]
    for text, visible, why in [
        ("0,2", 2, "names GPU 2, and torch sees GPUs 0 to 1"),
        ("0", 0, "torch sees no GPU"),
        ("0,0", 2, "names a GPU twice"),
        ("a,1", 2, "not a list of GPU indices"),
        ("", 2, "not a list of GPU indices"),
    ]:
        with pytest.raises(ConfigError, match=why):
            _fanout.parse_gpus(text, visible)


def test_each_gpu_gets_a_worker_that_sees_only_it() -> None:
    cmds = _fanout.child_commands([0, 1], ["--queue=redis://q"], {"PATH": "/bin"})
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in cmds] == ["0", "1"]
    for argv, env in cmds:
        assert argv[:4] == [sys.executable, "-m", "radcache.service.cli", "worker"]
        assert argv[4:] == ["--queue=redis://q", "--device", "cuda:0"] and env["PATH"] == "/bin"
    mapped = _fanout.child_commands([1], [], {"CUDA_VISIBLE_DEVICES": "4,6"})
    assert mapped[0][1]["CUDA_VISIBLE_DEVICES"] == "6"  # index 1 of what the parent sees
    # The cores are shared out among the children's decode pools unless set.
    share = str(max(1, auto_workers() // 2))
    assert [env["RADCACHE_DECODE_WORKERS"] for _, env in cmds] == [share, share]
    given = _fanout.child_commands([0, 1], [], {"RADCACHE_DECODE_WORKERS": "3"})
    assert [env["RADCACHE_DECODE_WORKERS"] for _, env in given] == ["3", "3"]


def test_supervise_runs_each_child_and_stops_the_rest_when_one_fails(tmp_path: Path) -> None:
    report = (
        "import json, os, sys; "
        "json.dump([os.environ['CUDA_VISIBLE_DEVICES'], sys.argv[1:]], open(sys.argv[1], 'w'))"
    )
    cmds = [
        ([sys.executable, "-c", report, str(tmp_path / f"{g}.json")], {"CUDA_VISIBLE_DEVICES": g})
        for g in ("0", "1")
    ]
    assert _fanout.supervise(cmds, poll_s=0.05) == 0
    for g in ("0", "1"):
        assert json.loads((tmp_path / f"{g}.json").read_text())[0] == g
    stuck = [sys.executable, "-c", "import time; time.sleep(60)"]
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert _fanout.supervise([(stuck, {}), (failing, {})], poll_s=0.05) == 3


def test_worker_gpus_flag_starts_one_child_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(_fanout, "visible_gpus", lambda: 2)
    monkeypatch.setattr(_fanout, "supervise", lambda cmds: started.extend(cmds) or 0)
    args = ["worker", "--gpus", "1,0", "--queue", "redis://q", "--threads", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["1", "0"]
    assert all(a[-2:] == ["--device", "cuda:0"] for a, _ in started)
    assert all("--queue=redis://q" in a and "--threads=3" in a for a, _ in started)
    wrong = CliRunner().invoke(main, ["worker", "--gpus", "0,2", "--queue", "redis://q"])
    assert wrong.exit_code == 2 and "torch sees GPUs 0 to 1" in wrong.output
    both = CliRunner().invoke(main, ["worker", "--gpus", "0", "--device", "cuda:1"])
    assert both.exit_code == 2 and "cannot go with it" in both.output


def test_the_gpu_benchmark_parses_and_counts_flops() -> None:
    """bench/bench_gpu.py imports without a GPU, and its FLOP count is the stated formula."""
    import importlib.util

    from radcache.embeddings.models import get_cfg

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    quick = bench.parse(["--device", "cpu", "--quick", "--no-tests"])
    assert quick.precision == "auto" and quick.models == ["S"] and quick.e2e_model == "S"
    full = bench.parse([])
    assert full.precision == "bf16" and full.slices == 300 and full.models == ["S", "B", "L"]
    large = get_cfg("dinov2-large")  # N = 257 tokens, D = 1024, M = 4096, 24 blocks
    per_block = 2 * 257 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 257**2 * 1024
    assert bench.vit_flops(large, 224) == 24 * per_block + 2 * 256 * (3 * 14 * 14) * 1024
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert bench.peak_tflops("NVIDIA A10", None) == 125.0
    assert bench.peak_tflops("Tesla T4", None) is None
    assert bench.peak_tflops("Tesla T4", 65.0) == 65.0
