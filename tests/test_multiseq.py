"""Multi-sequence studies end to end: four co-registered MNI152-derived volumes (T1 and
derived contrasts on two grids), a sequence dropped, embedded by MM-DINOv2 (random test
weights) and by the fusion baselines; cached by content and present sequences."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.recipe import Recipe

MAPPING = {"t1.nii.gz": "t1", "t1c.nii.gz": "t1c", "t2.nii.gz": "t2", "flair.nii.gz": "flair"}


def mni_study(root: Path, stride: int = 6) -> dict[str, Path]:
    """T1 (1 mm), T1c (T1 with enhancing spots), T2 (inverted T1, on a 2 mm grid) and
    FLAIR (T2 with CSF dark), cut to every ``stride``-th axial slab to stay small."""
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(img.get_fdata(), np.float32)[:, :, ::stride]
    affine = img.affine.copy()
    affine[:3, 2] *= stride
    brain = t1 > 0
    rng = np.random.default_rng(0)
    t1c = t1.copy()
    for _ in range(5):  # bright, enhancing blobs
        c = [rng.integers(40, s - 40) for s in t1.shape[:2]]
        yy, xx = np.ogrid[: t1.shape[0], : t1.shape[1]]
        t1c[((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 36)[..., None] & brain] *= 1.8
    t2 = np.where(brain, t1.max() - t1, 0).astype(np.float32)
    flair = np.where(t2 > np.percentile(t2[brain], 90), t2 * 0.2, t2).astype(np.float32)
    paths = {}
    for name, vol, aff in (
        ("t1", t1, affine),
        ("t1c", t1c, affine),
        ("flair", flair, affine),
    ):
        paths[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(vol, aff), paths[name])
    coarse = affine.copy()
    coarse[:3, :2] *= 2
    paths["t2"] = root / "t2.nii.gz"
    nib.save(nib.Nifti1Image(t2[::2, ::2], coarse), paths["t2"])
    return paths


@pytest.fixture(scope="module")
def mm() -> Encoder:
    return load_encoder("mm-dinov2-tiny-random", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return mni_study(tmp_path_factory.mktemp("mni"))


def test_mm_dinov2_embeds_a_study_with_a_missing_sequence(
    mm: Encoder, study: dict[str, Path], pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    store = EmbeddingStore(tmp_path / "s.zarr")
    pipe = Pipeline(mm, store, pseudo, batch_size=16)
    three = [study["t1"], study["t2"], study["flair"]]  # T1c dropped
    report = pipe.embed_study(three, mapping=MAPPING)
    assert report.ok, [e.to_dict() for e in report.errors]
    (res,) = report.series
    info = store.get(res.entry)
    assert info is not None
    n = info.n_slices
    assert store.read(res.entry, "cls").shape == (n, 64)
    assert store.read(res.entry, "patch").shape == (n, 4, 8, 8, 64)  # every sequence's grid
    meta = info.attrs["study"]
    assert meta["present"] == ["t1", "t2", "flair"] and meta["reference"] == "t1"
    assert meta["vocabulary"] == ["t1", "t1c", "t2", "flair"]
    assert info.attrs["model"]["name"] == "mm-dinov2-tiny-random"
    assert info.attrs["recipe"]["intensity"] == {
        "kind": "percentile", "low": 1.0, "high": 99.0, "foreground": True
    }  # fmt: skip
    assert tuple(info.attrs["recipe"]["mean"]) == (0.45, 0.45, 0.45)
    # The same study again: a cache hit, no forward.
    before = mm.forward_count
    (again,) = pipe.embed_study(three, mapping=MAPPING).series
    assert again.cache == "hit" and again.entry == res.entry and mm.forward_count == before
    # All four sequences: another entry, in the same space (searchable together).
    (full,) = pipe.embed_study(list(study.values()), mapping=MAPPING).series
    assert full.entry != res.entry and full.cache == "miss"
    assert len(store.spaces()) == 1 and len(store.table(store.spaces()[0]).keys) == 2
    assert not np.allclose(store.read(full.entry, "cls"), store.read(res.entry, "cls"))


def test_fusion_baselines_with_plain_dinov2(
    tiny_fp32: Encoder, study: dict[str, Path], pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    store = EmbeddingStore(tmp_path / "s.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, recipe=Recipe())
    three = [study["t1"], study["t2"], study["flair"]]
    (cat,) = pipe.embed_study(three, mapping=MAPPING, fusion="concat").series
    (avg,) = pipe.embed_study(three, mapping=MAPPING, fusion="mean").series
    c, a = store.read(cat.entry, "cls"), store.read(avg.entry, "cls")
    assert c.shape[1] == 4 * 64 and a.shape[1] == 64
    assert np.all(c[:, 64:128] == 0)  # T1c is missing: its block is zeros
    np.testing.assert_allclose(a, (c[:, :64] + c[:, 128:192] + c[:, 192:]) / 3, atol=1e-5)
    assert len(store.spaces()) == 2  # concat and mean are different spaces
    with pytest.raises(InputError, match="single-sequence model"):
        pipe.embed_study(three, mapping=MAPPING)


def test_a_study_without_nameable_sequences_is_reported(
    mm: Encoder, study: dict[str, Path], pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    pipe = Pipeline(mm, EmbeddingStore(tmp_path / "s.zarr"), pseudo)
    report = pipe.embed_study([study["t1"], study["t2"]])  # NIfTI: no description, no timing
    assert not report.series and "no volume could be named" in str(report.errors[0])


def test_a_study_through_the_api_with_a_sequence_mapping(
    study: dict[str, Path], tmp_path: Path
) -> None:
    import json

    import httpx

    from tests.servers import running_server

    three = ("t1", "t2", "flair")
    files = [("files", (f"{s}.nii.gz", study[s].read_bytes(), "application/gzip")) for s in three]
    with (
        running_server(tmp_path, "--model", "mm-dinov2-tiny-random") as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        r = http.post(
            "/v1/studies",
            files=files,
            data={"sequences": json.dumps(MAPPING), "labels": json.dumps({"tumour": "no"})},
        )
        assert r.status_code == 202, r.text
        for _ in range(600):
            job = http.get(r.headers["location"]).json()
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert job["state"] == "done", job
        (series,) = job["series"]
        entry = http.get(f"/v1/series/{series['entry']}").json()
        # Searchable like any entry: the index of its space holds it within a refresh.
        for _ in range(100):
            spaces = http.get("/v1/indexes").json()
            if spaces and spaces[0]["entries"] == 1:
                break
            time.sleep(0.1)
        assert spaces[0]["model"] == "mm-dinov2-tiny-random", spaces
        bad = http.post("/v1/studies", files=files, data={"fusion": "median"})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid-request"
    assert entry["slices"] == series["slices"] > 0


def test_embed_command_takes_a_study_with_named_sequences(
    study: dict[str, Path], tmp_path: Path
) -> None:
    import json

    from tests.test_cli import run

    args = [str(study[s]) for s in ("t1", "t2", "flair")]
    named = [f"--sequence={s}.nii.gz={s}" for s in ("t1", "t2", "flair")]
    p = run("embed", *args, *named, "--model", "dinov2-tiny-random", "--fusion", "mean",
            "--store", str(tmp_path / "s.zarr"), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    (series,) = json.loads(p.stdout)["series"]
    assert series["cache"] == "miss"
    bad = run("embed", *args, "--sequence", "t1.nii.gz", "--store", str(tmp_path / "b.zarr"))
    assert bad.returncode == 2 and "expected NAME=TYPE" in bad.stderr


def test_a_converted_mm_dinov2_directory_loads_as_a_multi_sequence_encoder(
    mm: Encoder, tmp_path: Path
) -> None:
    import torch

    from radcache.embeddings.encode import MMEncoder
    from radcache.embeddings.models import save_converted

    save_converted(mm.model, tmp_path / "mm-ckpt")  # type: ignore[arg-type]
    enc = load_encoder(str(tmp_path / "mm-ckpt"), device="cpu", precision="fp32")
    assert isinstance(enc, MMEncoder) and enc.cfg.multi_sequence
    assert enc.cfg.sequences == ("t1", "t1c", "t2", "flair") and enc.weights_hash == mm.weights_hash
    x = torch.randn(2, 4, 3, 112, 112)
    present = torch.tensor([[True, False, True, True]] * 2)
    torch.testing.assert_close(enc.forward_study(x, present), mm.forward_study(x, present))


def test_a_model_listing_its_sequences_in_another_order_stores_the_same_study(
    mm: Encoder, study: dict[str, Path], pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    """The training config's order (t2, t1, t1c, flair): each sequence still takes the
    sequence-embedding row of its name, so the vectors are those of the default order and
    the patch grids come in the listed order, as the entry records."""
    from radcache.embeddings.models import MMDinov2, save_converted

    order = ("t2", "t1", "t1c", "flair")
    model: MMDinov2 = mm.model  # type: ignore[assignment]
    encoders = []
    for name, seqs in (("a", model.sequences), ("b", order)):
        save_converted(MMDinov2(model.backbone, model.sequence_embedding, seqs), tmp_path / name)
        encoders.append(load_encoder(str(tmp_path / name), device="cpu", precision="fp32"))
    assert encoders[1].cfg.sequences == order
    assert encoders[1].weights_hash == encoders[0].weights_hash
    three = [study["t1"], study["t2"], study["flair"]]
    entries = []
    for enc, name in zip(encoders, "ab", strict=True):
        store = EmbeddingStore(tmp_path / f"{name}.zarr")
        pipe = Pipeline(enc, store, pseudo, patch_storage="fp16")  # grids compared to 2e-3
        (res,) = pipe.embed_study(three, mapping=MAPPING).series
        info = store.get(res.entry)
        assert info is not None
        entries.append((store.read(res.entry, "cls"), store.read(res.entry, "patch"), info))
    (cls_a, patch_a, a), (cls_b, patch_b, b) = entries
    np.testing.assert_allclose(cls_b, cls_a, rtol=0, atol=1e-5)
    assert b.attrs["study"]["vocabulary"] == list(order)
    assert b.attrs["study"]["present"] == ["t2", "t1", "flair"]  # in the model's order
    idx = [a.attrs["study"]["vocabulary"].index(s) for s in order]
    np.testing.assert_allclose(patch_b.astype(np.float32), patch_a[:, idx], rtol=0, atol=2e-3)


def test_a_dicom_study_is_sorted_into_sequences_by_its_headers(
    mm: Encoder, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    from tests.dicomgen import phantom, write_series

    study, frame = "1.2.826.0.1.3680043.8.498.51", "1.2.826.0.1.3680043.8.498.52"
    common = {"modality": "MR", "intercept": 0.0, "study_uid": study,
              "frame_of_reference_uid": frame}  # fmt: skip
    write_series(tmp_path / "in" / "a", phantom(6, 32, 32, seed=1), **common,
                 extra={"SeriesDescription": "t1_mprage_sag", "RepetitionTime": 2300,
                        "EchoTime": 2.3, "InversionTime": 900})  # fmt: skip
    write_series(tmp_path / "in" / "b", phantom(6, 32, 32, seed=2), **common,
                 extra={"SeriesDescription": "AX FLAIR", "RepetitionTime": 9000,
                        "EchoTime": 85, "InversionTime": 2500})  # fmt: skip
    loc = {"SeriesDescription": "Ax 3-plane loc"}
    write_series(tmp_path / "in" / "c", phantom(3, 16, 16, seed=3), **common,
                 spacing=(5.0, 1.5, 1.0), extra=loc)  # fmt: skip
    pipe = Pipeline(mm, EmbeddingStore(tmp_path / "s.zarr"), pseudo)
    report = pipe.embed_study([tmp_path / "in"])
    assert report.ok, [e.to_dict() for e in report.errors]
    info = pipe.store.get(report.series[0].entry)
    assert info is not None
    decided = {d["sequence"]: d["reason"] for d in info.attrs["study"]["decisions"]}
    assert set(decided) == {"t1", "flair", None}  # the localizer-like series is left out
    assert decided["t1"] == "SeriesDescription matched the T1 pattern"  # never the text itself
    assert info.attrs["study"]["present"] == ["t1", "flair"]
    assert pipe.store.read(info.key, "patch").shape[:2] == (6, 4)


def test_a_segmentation_probe_runs_on_a_multi_sequence_entry(
    mm: Encoder, study: dict[str, Path], pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    from radcache.embeddings.probes import seg, seg_data, split_slices

    store = EmbeddingStore(tmp_path / "s.zarr")
    pipe = Pipeline(mm, store, pseudo)
    (res,) = pipe.embed_study([study["t1"], study["flair"]], mapping=MAPPING).series
    t1 = nib.load(study["t1"])
    mask = tmp_path / "brain.nii.gz"  # on the reference (T1) grid
    nib.save(nib.Nifti1Image((np.asarray(t1.get_fdata()) > 0).astype(np.int16), t1.affine), mask)
    data = seg_data(store, {res.entry: mask}, classes=["background", "brain"])
    assert data.volumes[0].tokens.shape[1:] == (8, 8, 64)
    flair_only = seg_data(store, {res.entry: mask}, sequence="flair")
    assert not np.array_equal(flair_only.volumes[0].tokens, data.volumes[0].tokens)
    with pytest.raises(InputError, match="not among them"):
        seg_data(store, {res.entry: mask}, sequence="t2")
    result, _ = seg(data, split_slices(data, "blocks", blocks=4), epochs=20, bootstrap=50)
    assert result["dice_3d"]["brain"]["value"] > 0.5
    from tests.test_cli import run

    csv = tmp_path / "masks.csv"
    csv.write_text(f"entry,mask\n{res.entry},{mask}\n")
    p = run("probe", "seg", "--store", store.url, "--masks", str(csv), "--sequence", "t2",
            "-o", str(tmp_path / "r"))  # fmt: skip
    assert p.returncode == 2 and "not among them" in p.stderr
