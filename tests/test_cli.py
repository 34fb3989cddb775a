"""The ``radcache`` console script, run as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import TEST_SECRET
from tests.dicomgen import phantom, write_series

_SCRIPT = Path(sys.executable).with_name("radcache")
RADCACHE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "radcache.service.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "RADCACHE_PSEUDONYM_KEY": TEST_SECRET, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*RADCACHE, *args], capture_output=True, text=True, env=e, timeout=240, check=False
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    write_series(root / "ct", phantom(5, 20, 20), shuffle=True, random_names=True)
    write_series(root / "mr", phantom(4, 16, 16, seed=3), modality="MR", intercept=0.0)
    return root


def test_embed_json_then_cache_hit(study: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    first = run("embed", str(study), "--model", "dinov2-tiny-random", "--store", store, "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert sorted(s["modality"] for s in out["series"]) == ["CT", "MR"]
    assert {s["cache"] for s in out["series"]} == {"miss"} and out["errors"] == []
    assert set(out["series"][0]) >= {"study", "series", "modality", "slices", "cache", "seconds"}
    again = json.loads(
        run("embed", str(study), "--model", "dinov2-tiny-random", "--store", store, "--json").stdout
    )
    assert {s["cache"] for s in again["series"]} == {"hit"}
    shown = json.loads(run("show", store, "--json").stdout)
    assert sorted(e["slices"] for e in shown) == [4, 5]


def test_bad_input_exit_code_and_messages(study: Path, tmp_path: Path) -> None:
    junk = tmp_path / "readme.txt"
    junk.write_text("hello")
    p = run(
        "embed",
        str(study / "ct"),
        str(junk),
        get_testdata_file("MR_truncated.dcm"),
        "--model",
        "dinov2-tiny-random",
        "--store",
        str(tmp_path / "s.zarr"),
    )
    assert p.returncode == 1
    assert "[not-dicom]" in p.stderr and "readme.txt" in p.stderr
    assert "[truncated-file]" in p.stderr and "MR_truncated.dcm" in p.stderr
    assert "1 series (0 cached), 2 error(s)" in p.stdout
    assert "RANDOM WEIGHTS" in p.stderr


def test_unavailable_model_is_one_clear_message(study: Path, tmp_path: Path) -> None:
    p = run(
        "embed",
        str(study),
        "--model",
        "dinov2-base",
        "--store",
        str(tmp_path / "s.zarr"),
        env={"HF_HOME": str(tmp_path / "hf")},
    )
    assert p.returncode == 2
    assert "[model-unavailable]" in p.stderr and "--model /path/to/checkpoint" in p.stderr
    assert "Traceback" not in p.stderr


def test_env_settings_and_models_listing(study: Path, tmp_path: Path) -> None:
    store = tmp_path / "env.zarr"
    p = run(
        "embed",
        str(study / "mr"),
        "--json",
        env={
            "RADCACHE_MODEL": "dinov2-tiny-random",
            "RADCACHE_STORE": str(store),
            "RADCACHE_PRECISION": "fp32",
        },
    )
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(run("show", str(store), "--json").stdout)
    assert entry["precision"] == "fp32"
    models = json.loads(run("models", "--json").stdout)
    names = {m["name"] for m in models}
    assert {"dinov2-small", "dinov2-giant-reg", "rad-dino", "dinov2-tiny-random"} <= names
    serve_help = run("serve", "--help").stdout
    from radcache.service.settings import ServiceSettings

    for name in ServiceSettings.model_fields:  # every setting is documented
        assert f"RADCACHE_{name.upper()}" in serve_help, name
    help_text = run("embed", "--help").stdout
    for flag in (
        "--model",
        "--store",
        "--recipe",
        "--patch-tokens",
        "--patch-storage",
        "--device",
        "--precision",
        "--batch-size",
        "--json",
    ):
        assert flag in help_text


def test_progress_bar_on_a_terminal(study: Path, tmp_path: Path) -> None:
    """On a terminal (a pseudo-terminal here) embed draws a progress bar on stderr."""
    import pty

    cmd = [
        *RADCACHE,
        "embed",
        str(study / "ct"),
        "--model",
        "dinov2-tiny-random",
        "--store",
        str(tmp_path / "s.zarr"),
    ]
    env = {
        **os.environ,
        "RADCACHE_PSEUDONYM_KEY": TEST_SECRET,
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "100",
    }
    out = bytearray()

    def read(fd: int) -> bytes:
        data = os.read(fd, 65536)
        out.extend(data)
        return data

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        status = pty.spawn(cmd, read)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))  # drop colours
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "embedding" in text  # the bar's label, drawn while the series runs
    assert "5/5" in text  # slices done / total
    assert "1 series (0 cached), 0 error(s)" in text


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    """Two `radcache embed` processes at once, one series in common: nothing lost or doubled."""
    x = write_series(tmp_path / "x", phantom(4, 16, 16, seed=31))
    y = write_series(tmp_path / "y", phantom(4, 16, 16, seed=32))
    z = write_series(tmp_path / "z", phantom(4, 16, 16, seed=33))
    store = tmp_path / "shared.zarr"
    env = {**os.environ, "RADCACHE_PSEUDONYM_KEY": TEST_SECRET, "HF_HUB_OFFLINE": "1"}
    args = ["--model", "dinov2-tiny-random", "--store", str(store), "--json"]
    procs = [
        subprocess.Popen(
            [*RADCACHE, "embed", str(a.directory), str(b.directory), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a, b in ((x, y), (y, z))
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from radcache.embeddings import open_store

    st = open_store(store)
    entries = st.series()
    assert len(entries) == 3
    (space,) = st.spaces()
    keys = st.table(space).keys
    assert sorted(keys) == sorted(e.key for e in entries)  # each once in the bulk table
    for e in entries:
        assert st.read(e.key, "patch").shape[0] == 4
    staging = store / "staging"
    assert not [p for p in staging.iterdir() if p.is_dir()] if staging.exists() else True


def test_index_info_and_rebuild_from_the_store_alone(study: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    assert (
        run("embed", str(study), "--model", "dinov2-tiny-random", "--store", store).returncode == 0
    )
    info = run("index", "info", "--store", store, "--json")
    assert info.returncode == 0, info.stderr
    spaces = json.loads(info.stdout)
    assert len(spaces) == 2 and {s["levels"]["series"]["kind"] for s in spaces} == {"exact"}
    assert (tmp_path / "s.zarr" / "indexes").is_dir()
    p = run("index", "rebuild", "--store", store, "--level", "slice", "--factory", "HNSW8")
    assert p.returncode == 0, p.stderr
    again = json.loads(run("index", "info", "--store", store, "--json").stdout)
    assert {s["levels"]["slice"]["factory"] for s in again} == {"HNSW8"}
    assert {s["levels"]["series"]["factory"] for s in again} == {"Flat"}
    bad = run("index", "rebuild", "--store", store, "--factory", "Bogus17")
    assert bad.returncode == 2 and "index-error" in bad.stderr
