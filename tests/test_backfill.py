"""`radcache backfill` and radcache.clients.backfill, against a real server on loopback."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from radcache.clients import RadcacheClient
from radcache.clients.backfill import (
    STATE_FILE,
    BackfillInterrupted,
    BackfillReport,
    backfill,
    find_studies,
)
from tests.dicomgen import phantom, write_nifti, write_series
from tests.servers import running_server
from tests.test_cli import run


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("server")) as (base, _):
        yield base


def _studies(root: Path, seeds: range) -> list[str]:
    """One small CT series folder per seed; returns their names."""
    names = [f"ct-{s:03d}" for s in seeds]
    for name, seed in zip(names, seeds, strict=True):
        write_series(root / name, phantom(3, 16, 16, seed=seed))
    return names


def _lines(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in state.read_text().splitlines()]


def _finished(state: Path) -> Counter[str]:
    return Counter(r["study"] for r in _lines(state) if r["state"] != "submitted")


def _job_count(url: str) -> int:
    with RadcacheClient(url) as rc:
        return len(rc.jobs(500))


def test_find_studies(tmp_path: Path) -> None:
    for name in ("b", "a/deep/er", ".hidden"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("x.nii.gz", "y.DCM", "z.zip", "notes.txt", ".radcache-backfill.jsonl", "v.mha"):
        (tmp_path / name).write_bytes(b"")
    studies = ["a", "b", "v.mha", "x.nii.gz", "y.DCM", "z.zip"]
    assert [p.name for p in find_studies(tmp_path)] == studies
    assert [p.name for p in find_studies(tmp_path, exclude=tmp_path / "z.zip")] == studies[:-1]


def test_cli_backfill_then_resume(url: str, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    names = _studies(root, range(100, 107))
    write_nifti(root / "vol.nii.gz", phantom(3, 16, 16, seed=107).astype(np.float32))
    (root / "zz-junk").mkdir()
    (root / "zz-junk" / "notes.txt").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not a study")
    (root / ".DS_Store").write_bytes(b"ignored: hidden")
    jobs = _job_count(url)

    p = run("backfill", str(root), "--url", url, "--concurrency", "3", "--json")
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert (out["studies"], out["done"], out["skipped"]) == (9, 8, 0)
    assert [(f["study"], f["state"]) for f in out["failed"]] == [("zz-junk", "failed")]
    assert "not-dicom" in out["failed"][0]["failure"] and out["studies_per_s"] > 0
    state = root / STATE_FILE
    assert _finished(state) == Counter([*names, "vol.nii.gz", "zz-junk"])
    assert _job_count(url) == jobs + 9

    # again: the finished studies are skipped, the failed one and a changed one are re-sent
    changed = next((root / names[0]).iterdir())
    os.utime(changed, (1e9, 2e9))
    again = run("backfill", str(root), "--url", url, "--json")
    assert again.returncode == 1, again.stderr
    out = json.loads(again.stdout)
    assert (out["studies"], out["done"], out["skipped"]) == (9, 1, 7)
    assert [f["study"] for f in out["failed"]] == ["zz-junk"]
    assert _job_count(url) == jobs + 11
    assert _finished(state) == Counter([*names, "vol.nii.gz", "zz-junk", names[0], "zz-junk"])


def test_a_partial_failure_stays_failed_until_its_files_change(url: str, tmp_path: Path) -> None:
    """A study with a broken file fails partially; a rerun reports it as failed still
    (exit 1) without sending the same files again, and sends it once they change."""
    from click.testing import CliRunner

    from radcache.service.cli import main

    root = tmp_path / "archive"
    names = _studies(root, range(400, 402))
    broken = root / names[1] / "MR_truncated.dcm"
    broken.write_bytes(Path(str(get_testdata_file("MR_truncated.dcm"))).read_bytes())
    args = ["backfill", str(root), "--url", url]
    jobs = _job_count(url)

    first = CliRunner().invoke(main, [*args, "--json"])
    assert first.exit_code == 1, first.output
    out = json.loads(first.stdout)
    assert (out["done"], out["skipped"]) == (1, 0)
    (failed,) = out["failed"]
    assert (failed["study"], failed["state"], failed["earlier"]) == (
        names[1],
        "partially_failed",
        False,
    )
    assert "truncated-file" in failed["failure"] and _job_count(url) == jobs + 2

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1, again.output
    assert "0 done, 1 skipped, 1 failed (1 unchanged since an earlier run)" in again.stdout
    said = " ".join(again.stderr.split())
    assert f"partially_failed {names[1]}: " in said and "truncated-file" in said
    assert "its files are unchanged, so not sent again" in said
    assert _job_count(url) == jobs + 2  # nothing sent

    broken.unlink()  # fixed: sent again, and done
    fixed = CliRunner().invoke(main, [*args, "--json"])
    assert fixed.exit_code == 0, fixed.output
    out = json.loads(fixed.stdout)
    assert (out["done"], out["skipped"], out["failed"]) == (1, 1, [])
    assert _job_count(url) == jobs + 3


def test_interrupted_run_resumes_without_sending_twice(url: str, tmp_path: Path) -> None:
    names = _studies(tmp_path, range(200, 208))
    jobs = _job_count(url)

    def stop_after_three(r: BackfillReport) -> None:
        if r.finished >= 3:
            raise KeyboardInterrupt

    with RadcacheClient(url) as rc:
        with pytest.raises(BackfillInterrupted) as exc:
            backfill(tmp_path, rc, concurrency=3, poll=0.1, on_progress=stop_after_three)
        first = exc.value.report
        assert first.interrupted and 3 <= first.done < len(names)
        state = tmp_path / STATE_FILE
        assert sum(_finished(state).values()) == first.done
        report = backfill(tmp_path, rc, concurrency=3, poll=0.1)
    assert report.ok and (report.skipped, report.done) == (first.done, len(names) - first.done)
    assert _finished(state) == Counter(names)
    job_ids: defaultdict[str, set[str]] = defaultdict(set)
    for r in _lines(state):
        job_ids[r["study"]].add(r["job"])
    assert all(len(ids) == 1 for ids in job_ids.values()), job_ids
    assert _job_count(url) == jobs + len(names)


def test_resume_waits_for_accepted_jobs(url: str, tmp_path: Path) -> None:
    """A `submitted` line makes the next run wait for that job, or re-send the study when
    the service no longer knows the job."""
    names = _studies(tmp_path, range(300, 302))
    state = tmp_path / "elsewhere.jsonl"
    with RadcacheClient(url) as rc:
        backfill(tmp_path, rc, state=state, poll=0.1)
        submitted = {r["study"]: r for r in _lines(state) if r["state"] == "submitted"}
        assert sorted(submitted) == names
        submitted[names[1]]["job"] = "forgotten"
        state.write_text("".join(json.dumps(r) + "\n" for r in submitted.values()))
        jobs = _job_count(url)
        report = backfill(tmp_path, rc, state=state, poll=0.1)
    assert report.ok and report.done == 2
    assert _job_count(url) == jobs + 1
    done = {r["study"]: r["job"] for r in _lines(state) if r["state"] == "done"}
    assert sorted(done) == names
    assert done[names[0]] == submitted[names[0]]["job"]
    assert done[names[1]] not in ("forgotten", submitted[names[1]]["job"])
