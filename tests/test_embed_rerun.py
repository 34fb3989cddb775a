"""A fully cached re-run of `radcache embed` answers from the store without loading the
model: the weights hash is remembered by the checkpoint's identity."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from radcache.embeddings.encode import Encoder, LoadingEncoder, load_encoder
from radcache.service.cli import main
from tests.dicomgen import phantom, write_nifti, write_series


def _args(store: Path, *inputs: Path) -> list[str]:
    return ["embed", *map(str, inputs), "--model", "dinov2-tiny-random", "--store", str(store)]


def _embed(store: Path, hashes: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    env = {"RADCACHE_WEIGHTS_HASH_FILE": str(hashes)}
    r = CliRunner().invoke(main, [*_args(store, *inputs), *extra, "--json"], env=env)
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout))


# The CLI in a fresh interpreter, once per argument list: what cached re-runs import. The
# model (torch, transformers) is not loaded; re-sent DICOM and NIfTI files are recognised by
# their digests (no pydicom, no nibabel); only the command run is imported.
_RERUN = """import json, sys
from radcache.service.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as exit:
        assert exit.code == 0, exit.code
unwanted = {"torch", "transformers", "pydicom", "nibabel", "radcache.service.cli.serve"}
heavy = sorted(unwanted & set(sys.modules))
assert not heavy, f"cached re-runs imported {heavy}"
"""


def test_a_cached_rerun_loads_no_model_and_a_miss_still_does(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", phantom(3, 16, 16))
    write_nifti(tmp_path / "mr.nii.gz", phantom(3, 16, 16, seed=4))
    store, hashes = tmp_path / "s.zarr", tmp_path / "hashes.json"
    nifti = (tmp_path / "mr.nii.gz", ("--modality", "MR"))

    built = Encoder.built
    first = _embed(store, hashes, tmp_path / "ct")
    assert Encoder.built == built + 1 and {s["cache"] for s in first["series"]} == {"miss"}
    remembered = json.loads(hashes.read_text()).values()  # once loaded: and where auto runs
    assert len([v for v in remembered if re.fullmatch("[0-9a-f]{32}", v)]) == 1

    again = _embed(store, hashes, tmp_path / "ct")  # recognised by file digests
    assert Encoder.built == built + 1, "a fully cached re-run loaded the model"
    assert [s["cache"] for s in again["series"]] == ["hit"]
    assert again["series"][0]["entry"] == first["series"][0]["entry"]

    new = _embed(store, hashes, nifti[0], extra=nifti[1])  # a miss: the model loads now
    assert Encoder.built == built + 2 and [s["cache"] for s in new["series"]] == ["miss"]
    nifti_again = _embed(store, hashes, nifti[0], extra=nifti[1])  # by its digest
    assert Encoder.built == built + 2 and [s["cache"] for s in nifti_again["series"]] == ["hit"]
    as_ct = _embed(store, hashes, nifti[0], extra=("--modality", "CT"))  # another recipe
    assert [(s["cache"], s["modality"]) for s in as_ct["series"]] == [("miss", "CT")]

    env = {**os.environ, "RADCACHE_WEIGHTS_HASH_FILE": str(hashes)}
    runs = [[*_args(store, tmp_path / "ct")], [*_args(store, nifti[0]), *nifti[1]]]
    cmd = [sys.executable, "-c", _RERUN, json.dumps([[*a, "--json"] for a in runs])]
    fresh = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert fresh.returncode == 0, fresh.stderr
    answers = [json.loads(line)["series"] for line in fresh.stdout.splitlines()]
    assert [[s["cache"] for s in a] for a in answers] == [["hit"], ["hit"]]


def test_a_lazy_encoder_knows_its_cache_key_and_loads_on_first_use(tmp_path: Path) -> None:
    hashes = tmp_path / "h.json"
    spec = {"device": "cpu", "precision": "fp32", "hashes": hashes, "lazy": True}
    eager = load_encoder("dinov2-tiny-random", **spec)  # type: ignore[arg-type]
    assert not isinstance(eager, LoadingEncoder)  # nothing remembered yet: loaded now
    built = Encoder.built
    lazy = cast(Any, load_encoder("dinov2-tiny-random", **spec))  # type: ignore[arg-type]
    assert isinstance(lazy, LoadingEncoder) and not lazy.loaded
    assert (lazy.weights_hash, lazy.precision) == (eager.weights_hash, "fp32")
    assert Encoder.built == built
    assert lazy.cfg.dim == eager.cfg.dim and Encoder.built == built
    assert lazy.dtype is not None and Encoder.built == built + 1  # built by this first use


@pytest.mark.parametrize("content", ["", "[1, 2]", "{not json"])
def test_an_unreadable_hash_file_only_costs_a_load(tmp_path: Path, content: str) -> None:
    hashes = tmp_path / "h.json"
    hashes.write_text(content)
    enc = load_encoder("dinov2-tiny-random", device="cpu", hashes=hashes, lazy=True)
    assert not isinstance(enc, LoadingEncoder)
    assert json.loads(hashes.read_text()) != {}
