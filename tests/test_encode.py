"""Encoder: parity with a plain transformers forward, strict loading, clear failures."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, Dinov2Model

from radcache.embeddings import Pseudonymizer
from radcache.embeddings.encode import (
    Encoder,
    LoadingEncoder,
    cpu_has_fast_bf16,
    load_encoder,
    resolve_precision,
)
from radcache.embeddings.errors import ModelError, ModelUnavailableError, UnknownModelError
from radcache.embeddings.models import REGISTRY, build_random, get_cfg


def _pixels(n: int = 5, size: int = 112, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_fp32_parity_with_plain_transformers_forward(tiny_fp32: Encoder) -> None:
    """On the model's native grid (112 px here) the outputs are transformers' own; off it
    the positional grid is interpolated as the official DINOv2 release does, not as
    transformers does (tests/test_pos_interp.py checks both on the released 37×37 grid)."""
    x = _pixels()
    emb = tiny_fp32.encode([x[:2], x[2:]], patch_tokens=True, last_n=2)
    plain = Dinov2Model(tiny_fp32.model.config).eval()
    plain.load_state_dict(tiny_fp32.model.state_dict())
    with torch.inference_mode():
        ref = plain(pixel_values=x, output_hidden_states=True)
    tokens = ref.last_hidden_state
    g = tiny_fp32.cfg.grid
    np.testing.assert_allclose(emb.cls, tokens[:, 0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        emb.patch, tokens[:, 1:].reshape(5, g, g, -1).half().numpy(), rtol=0, atol=0
    )
    np.testing.assert_allclose(emb.mean_patch, tokens[:, 1:].mean(1).numpy(), rtol=0, atol=1e-5)
    # last-block CLS after the final norm is the CLS itself; the block before it matches too
    np.testing.assert_allclose(emb.cls_last[:, -1], emb.cls, atol=1e-6)
    with torch.inference_mode():
        before_last = plain.layernorm(ref.hidden_states[-2][:, 0]).numpy()
    np.testing.assert_allclose(emb.cls_last[:, 0], before_last, atol=1e-5)
    off = _pixels(2, size=224)  # a 16×16 grid from the stored 8×8 one
    with torch.inference_mode():
        theirs = plain(pixel_values=off).last_hidden_state[:, 0]
    assert (tiny_fp32.forward(off)[0] - theirs).abs().max() > 1e-4  # fp32 noise: ~1e-6


def test_local_checkpoint_parity_and_register_tokens_dropped(tmp_path: Path) -> None:
    cfg = dataclasses.replace(REGISTRY["dinov2-tiny-random"], arch="dinov2-reg", num_registers=4)
    model = build_random(cfg)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
                "crop_size": {"height": 112},
            }
        )
    )
    enc = load_encoder(str(tmp_path / "ckpt"), device="cpu", precision="fp32")
    assert enc.cfg.num_registers == 4 and enc.cfg.arch == "dinov2-reg"
    assert enc.cfg.mean == (0.5, 0.5, 0.5) and enc.cfg.image_size == 112
    ref_model = AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    x = _pixels(3)
    emb = enc.encode([x], last_n=0)
    with torch.inference_mode():
        tokens = ref_model(pixel_values=x).last_hidden_state
    np.testing.assert_allclose(emb.cls, tokens[:, 0].numpy(), atol=1e-5)
    g = enc.cfg.grid
    assert emb.patch is not None and emb.patch.shape == (3, g, g, cfg.dim)
    np.testing.assert_allclose(emb.patch, tokens[:, 5:].reshape(3, g, g, -1).half().numpy(), atol=0)


def test_checkpoint_with_missing_weights_is_refused(tmp_path: Path) -> None:
    model = build_random(get_cfg("dinov2-tiny-random"))
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if "encoder.layer.1.mlp" in k)
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing"):
        load_encoder(str(tmp_path / "ckpt"), device="cpu")


def test_not_a_dinov2_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="DINOv2-family"):
        load_encoder(str(tmp_path))


def test_unknown_model_lists_the_registry() -> None:
    with pytest.raises(UnknownModelError, match="dinov2-base") as exc:
        load_encoder("dinov3-huge")
    assert exc.value.code == "unknown-model"


def test_unavailable_weights_name_both_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailableError) as exc:
        load_encoder("dinov2-small", offline=True, cache_dir=str(tmp_path / "hf"))
    msg = str(exc.value)
    assert "facebook/dinov2-small" in msg and "--model /path/to/checkpoint" in msg
    assert "dinov2-tiny-random" in msg and exc.value.code == "model-unavailable"


def test_random_model_is_deterministic_and_labelled() -> None:
    a = load_encoder("dinov2-tiny-random", device="cpu", precision="fp32")
    b = load_encoder("dinov2-tiny-random", device="cpu", precision="fp32")
    assert a.weights_hash == b.weights_hash
    assert "RANDOM WEIGHTS" in a.cfg.label
    assert not any(c.random_weights for name, c in REGISTRY.items() if "random" not in name)


def test_auto_precision_follows_the_hardware() -> None:
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bf16_stays_close_to_fp32(tiny_fp32: Encoder) -> None:
    bf = Encoder(tiny_fp32.cfg, build_random(tiny_fp32.cfg), torch.device("cpu"), "bf16")
    x = _pixels(4)
    a = tiny_fp32.encode([x], last_n=0).cls
    b = bf.encode([x], last_n=0).cls
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99
    assert bf.weights_hash == tiny_fp32.weights_hash  # same weights, whatever the precision


def test_registry_geometry() -> None:
    for name in ("dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant"):
        c = get_cfg(name)
        reg = get_cfg(f"{name}-reg")
        assert c.patch_size == 14 and c.image_size % 14 == 0 and reg.num_registers == 4
        assert reg.dim == c.dim and reg.hf_id and "with-registers" in reg.hf_id
    assert get_cfg("rad-dino").image_size == 518 and get_cfg("rad-dino").dim == 768


def test_an_embedding_and_searches_by_upload_in_parallel_get_their_own_outputs(
    tiny_fp32: Encoder, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    """One encoder, two threads: a long embedding with last-4 CLS (the worker) and repeated
    queries by upload (a search). Every result equals the same work run alone."""
    from radcache.embeddings import EmbeddingStore, Pipeline
    from tests.dicomgen import phantom, write_series

    long = write_series(tmp_path / "long", phantom(40, 28, 28, seed=5))
    query = write_series(tmp_path / "query", phantom(3, 42, 42, seed=6))

    def pipe(name: str) -> Pipeline:
        return Pipeline(tiny_fp32, EmbeddingStore(tmp_path / name), pseudo, batch_size=4)

    alone = pipe("alone.zarr")
    expected = alone.store.read(alone.embed([long.directory]).series[0].entry, "cls_last")
    (query_alone,), _ = alone.embed_transient([query.directory])

    together = pipe("together.zarr")
    failures: list[BaseException] = []
    done = threading.Event()

    def worker() -> None:
        try:
            report = together.embed([long.directory])
            assert report.ok, report.errors
            got = together.store.read(report.series[0].entry, "cls_last")
            np.testing.assert_array_equal(got, expected)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    searches = 0
    while not done.is_set() or searches < 3:
        (q,), errors = together.embed_transient([query.directory])
        assert not errors
        np.testing.assert_array_equal(q.cls, query_alone.cls)
        searches += 1
    thread.join()
    assert not failures, failures[0]
    assert searches >= 3


def test_weights_loaded_in_the_background_give_the_same_encoder(tiny_fp32: Encoder) -> None:
    x = torch.rand(2, 3, 56, 56)  # not while the weights build: they draw from torch's RNG
    loading = load_encoder("dinov2-tiny-random", device="cpu", precision="fp32", background=True)
    assert isinstance(loading, LoadingEncoder)
    assert loading.cfg == tiny_fp32.cfg  # known before the weights
    got = loading.forward(x)  # waits for the weights
    assert loading.loaded and loading.failure is None
    assert loading.weights_hash == tiny_fp32.weights_hash
    for a, b in zip(got, tiny_fp32.forward(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_background_load_that_fails_says_why_at_every_use() -> None:
    def broken() -> Encoder:
        raise ModelError("model.safetensors is truncated; download it again.")

    loading = LoadingEncoder(get_cfg("dinov2-tiny-random"), broken)
    with pytest.raises(ModelError, match="truncated"):
        loading.wait()
    assert not loading.loaded and loading.failure is not None and "truncated" in loading.failure
    with pytest.raises(ModelError, match="truncated"):
        loading.forward(torch.rand(1, 3, 56, 56))


def test_a_model_that_cannot_be_had_fails_before_the_background_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError):
        load_encoder("dinov2-small", offline=True, cache_dir=str(tmp_path), background=True)
