"""radcache.clients and the client CLI commands, against a real server on loopback."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from radcache.clients import AsyncRadcacheClient, RadcacheAPIError, RadcacheClient, SubmitOptions
from radcache.embeddings import open_store
from tests.dicomgen import phantom, write_nifti, write_series
from tests.servers import running_server
from tests.test_cli import run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("server")
    with running_server(root) as (url, _):
        yield url, root / "s.zarr"


def test_client_round_trip(server: tuple[str, Path], tmp_path: Path) -> None:
    url, store = server
    gen = write_series(tmp_path / "ct", phantom(4, 16, 16, seed=70))
    with RadcacheClient(url) as rc:
        job = rc.submit([gen.directory], wait=True, timeout=60)
        assert job.state == "done" and job.series[0].slices == 4
        entry = job.series[0].entry
        cls = rc.embeddings(entry, "cls")
        np.testing.assert_array_equal(cls, open_store(store).read(entry, "cls"))
        assert rc.embeddings(entry, "patch", slices="1:3").shape[0] == 2
        assert rc.series(job.series[0].series).slices == 4
        assert any(s.study == job.series[0].study for s in rc.studies())
        again = rc.submit([gen.directory], wait=False)
        assert again.state == "done" and again.series[0].cache == "hit"  # answered at once
        with pytest.raises(RadcacheAPIError) as exc:
            rc.job("nope")
        assert exc.value.code == "not-found" and exc.value.status == 404
        erased = rc.delete(job.series[0].study, wait=True)
        assert erased is not None and erased.kind == "erase" and erased.state == "done"
        assert rc.delete(job.series[0].study) is None  # nothing names it any more
        with pytest.raises(RadcacheAPIError, match="not-found"):
            rc.series(entry)


def test_submit_options_travel_with_the_upload(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    gen = write_series(tmp_path / "opt", phantom(3, 16, 16, seed=72))
    opts = SubmitOptions(labels={"dx": "normal"}, collection="teaching", patch_tokens=False)
    assert opts.fields() == {
        "patch_tokens": "false",
        "labels": '{"dx": "normal"}',
        "collection": "teaching",
    }
    with RadcacheClient(url) as rc:
        job = rc.submit([gen.directory], options=opts, timeout=60)
        entry = rc.series(job.series[0].entry)
        assert entry.labels == {"dx": "normal"} and "patch" not in entry.kinds
        with pytest.raises(RadcacheAPIError) as exc:
            rc.submit([gen.directory], options=SubmitOptions(model="dinov2-giant"))
        assert exc.value.code == "model-not-loaded"


def test_async_client(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    gen = write_series(tmp_path / "mr", phantom(3, 16, 16, seed=71), modality="MR", intercept=0.0)

    async def go() -> tuple[str, np.ndarray]:
        async with AsyncRadcacheClient(url) as rc:
            job = await rc.submit([gen.directory], wait=True, timeout=60)
            return job.state, await rc.embeddings(job.series[0].entry)

    state, pooled = asyncio.run(go())
    assert state == "done" and pooled.shape == (64,)


def test_sync_and_async_clients_have_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {n: inspect.signature(getattr(cls, n)) for n in dir(cls) if not n.startswith("_")}

    sync, aio = public(RadcacheClient), public(AsyncRadcacheClient)
    assert set(sync) == set(aio)
    assert sync == aio  # the same parameters and return annotations
    assert all(inspect.iscoroutinefunction(getattr(AsyncRadcacheClient, n)) for n in aio)


def test_async_client_lists_and_reads_like_the_sync_one(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = server
    gen = write_series(tmp_path / "ct", phantom(3, 16, 16, seed=73))

    async def go() -> None:
        rc = AsyncRadcacheClient(url)
        try:
            job = await rc.submit([gen.directory], wait=True, timeout=60)
            name = job.series[0].series
            assert job.id in {j.id for j in await rc.jobs()}
            assert (await rc.series(name)).slices == 3
            assert await rc.models()
            out = await rc.search(series=name, k=1, exclude_same_study=False)
            assert out.results[0].hits[0].series == name
            assert any(i.space == out.results[0].space for i in await rc.indexes())
            with pytest.raises(RadcacheAPIError) as exc:
                await rc.series("nope")
            assert exc.value.status == 404
        finally:
            await rc.close()
        assert rc.http.is_closed

    asyncio.run(go())


def test_client_retries_on_503_then_gives_up() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return httpx.Response(
                503, json={"code": "queue-full", "title": "busy", "detail": "later"}
            )
        return httpx.Response(200, json=[])

    transport = httpx.MockTransport(handler)  # the retry policy alone, no server needed
    with RadcacheClient(
        http=httpx.Client(transport=transport, base_url="http://x"), retries=3
    ) as rc:
        assert rc.jobs() == [] and calls["n"] == 3
    always = httpx.MockTransport(lambda r: httpx.Response(503, json={"code": "queue-full"}))
    with (
        RadcacheClient(http=httpx.Client(transport=always, base_url="http://x"), retries=1) as rc,
        pytest.raises(RadcacheAPIError) as exc,
    ):
        rc.jobs()
    assert exc.value.code == "queue-full"


def test_client_cli(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    gen = write_series(tmp_path / "ct", phantom(3, 16, 16, seed=72))
    p = run("submit", str(gen.directory), "--url", url, "--json")
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout)
    assert job["state"] == "done"
    listed = json.loads(run("jobs", "--url", url, "--json").stdout)
    assert job["id"] in {j["id"] for j in listed}
    out = tmp_path / "cls.npy"
    g = run("get", job["series"][0]["entry"], "--kind", "cls", "-o", str(out), "--url", url)
    assert g.returncode == 0, g.stderr
    assert np.load(out).shape == (3, 64)
    down = run("jobs", "--url", "http://127.0.0.1:9", "--json")
    assert down.returncode == 2 and "error" in json.loads(down.stdout)


def test_get_takes_back_the_ids_tables_show(server: tuple[str, Path], tmp_path: Path) -> None:
    """`radcache get` takes the 12 characters `submit` shows of a series (or an entry key's
    first ones); fewer than 4 is not-found, exit 2."""
    from click.testing import CliRunner

    from radcache.service.cli import main

    url, _ = server
    gen = write_series(tmp_path / "ct", phantom(3, 16, 16, seed=74))
    shown = CliRunner().invoke(main, ["submit", str(gen.directory), "--url", url])
    with RadcacheClient(url) as rc:
        (s,) = rc.submit([gen.directory], wait=False).series  # cached: answered at once
        want = rc.embeddings(s.entry, "cls")
    assert shown.exit_code == 0 and s.series[:12] in shown.stdout, shown.output
    for i, ref in enumerate((s.series[:12], s.entry[:6])):
        npy = tmp_path / f"{i}.npy"
        r = CliRunner().invoke(main, ["get", ref, "--kind", "cls", "-o", str(npy), "--url", url])
        assert r.exit_code == 0, r.output
        np.testing.assert_array_equal(np.load(npy), want)
    r = CliRunner().invoke(main, ["get", s.entry[:3], "-o", str(tmp_path / "x.npy"), "--url", url])
    assert r.exit_code == 2 and "not-found" in r.output, r.output


def test_submit_and_jobs_keep_ids_whole_in_80_columns_and_warn(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    """`submit` and `jobs` print entry and job ids whole at 80 columns; `submit` says
    when a volume was sent without a modality."""
    from click.testing import CliRunner

    from radcache.service.cli import main

    url, _ = server
    vol = write_nifti(tmp_path / "v.nii.gz", phantom(3, 16, 16, seed=73).astype(np.float32))
    narrow = {"COLUMNS": "80"}
    r = CliRunner().invoke(main, ["submit", str(vol), "--url", url], env=narrow)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert "warning series " in said and "no modality given (NIfTI files carry none)" in said
    job = json.loads(CliRunner().invoke(main, ["jobs", "--url", url, "--json"]).stdout)[0]
    listed = CliRunner().invoke(main, ["jobs", "--url", url], env=narrow)
    for text, whole in ((r.stdout, job["series"][0]["entry"]), (listed.stdout, job["id"])):
        assert whole in text and "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80, text


def test_client_needs_no_torch() -> None:
    code = "import sys, radcache.clients; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_client_only_install_says_what_is_missing() -> None:
    """Without the server extra, `radcache embed` names the extra to install (torch and
    friends are hidden from the import system here, as in a client-only install)."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'transformers', 'pydicom', 'zarr'}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import radcache.clients, radcache.service.cli as cli\n"
        "sys.argv = ['radcache', 'embed', '.']\n"
        "cli.main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "[missing-extra]" in p.stderr and "radcache[server]" in p.stderr


def test_search_and_classify_from_client_and_cli(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    gens = [write_series(tmp_path / f"s{i}", phantom(3, 16, 16, seed=80 + i)) for i in range(4)]
    with RadcacheClient(url) as rc:
        jobs = [rc.submit([g.directory], wait=True, timeout=60) for g in gens]
        names = [j.series[0].series for j in jobs]
        out = rc.search(series=names[0], k=2)
        assert out.level == "series" and len(out.results[0].hits) == 2
        assert names[0] not in {h.series for h in out.results[0].hits}  # own study left out
        up = rc.search(files=[gens[1].directory], k=1, exclude_same_study=False)
        assert up.results[0].hits[0].series == names[1]  # the same pixels, embedded again
        vec = rc.embeddings(names[2])
        space = out.results[0].space
        assert rc.search(vector=vec, space=space, k=1).results[0].hits[0].series == names[2]
        pred = rc.classify(
            names[:1], support=[(n, "a" if i % 2 else "b") for i, n in enumerate(names)]
        )
        assert set(pred.predictions[0].probabilities) == {"a", "b"}
        (ix,) = [i for i in rc.indexes() if i.space == space]
        assert ix.modalities == ["CT"] and ix.recipe.startswith("ct-windows"), ix
        assert ix.description.startswith(f"{ix.model} · CT · ct-windows") and ix.entries >= 4
    p = run("search", "--series", names[0], "-k", "2", "--url", url, "--json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["results"][0]["hits"]) == 2
    p = run("search", str(gens[3].directory), "-k", "1", "--include-same-study", "--url", url)
    assert p.returncode == 0 and names[3][:12] in p.stdout, p.stdout + p.stderr
    p = run("search", "--series", names[0], "--filter-modality", "XA", "--url", url)
    assert p.returncode == 0 and "no hits; none of the" in p.stdout, p.stdout + p.stderr
    p = run(
        "classify",
        names[1],
        "--support",
        f"{names[0]}=b",
        "--support",
        f"{names[2]}=b",
        "--url",
        url,
        "--json",
    )
    assert p.returncode == 0 and json.loads(p.stdout)["predictions"][0]["label"] == "b", p.stderr
    bad = run("search", "--series", "nope", "--url", url, "--json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "not-found"


def test_studies_page_by_page(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    with RadcacheClient(url) as rc:
        for i in range(3):
            gen = write_series(tmp_path / f"p{i}", phantom(2, 16, 16, seed=80 + i))
            assert rc.submit([gen.directory], timeout=60).state == "done"
        everything = [s.study for s in rc.studies(limit=1000)]
        assert len(everything) >= 3 and everything == sorted(everything)
        paged, cursor = [], None
        while True:
            page = rc.studies_page(limit=2, cursor=cursor)
            paged += [s.study for s in page.studies]
            if page.next is None:
                break
            cursor = page.next
        assert paged == everything
        assert [s.study for s in rc.studies(limit=2, offset=1)] == everything[1:3]

    async def first_two() -> list[str]:
        async with AsyncRadcacheClient(url) as rc:
            page = await rc.studies_page(limit=1)
            assert page.next is not None
            nxt = await rc.studies_page(limit=1, cursor=page.next)
            return [s.study for s in (*page.studies, *nxt.studies)]

    assert asyncio.run(first_two()) == everything[:2]


def test_slice_search_by_series_prints_one_table_over_the_query_slices(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    url, _ = server
    vols = [phantom(6, 16, 16, seed=s) for s in (90, 91)]
    with RadcacheClient(url) as rc:
        jobs = [
            rc.submit([write_series(tmp_path / f"v{i}", v).directory], wait=True, timeout=60)
            for i, v in enumerate(vols)
        ]
    target = jobs[0].series[0].series
    query = write_series(tmp_path / "q", vols[0]).directory  # the same pixels, a new study
    args = ["search", str(query), "--level", "slice", "--group-by-series", "-k", "2"]
    args += ["--include-same-study", "--url", url]
    r = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert r.output.count("best series over its 6 slices") == 1, r.output
    (first,) = [ln for ln in r.output.splitlines() if ln.startswith("│ 1 ")]
    assert target[:12] in first and "│ 6/6 " in first, r.output
    pair = re.search(r"(\d) → (\d) \((1\.0000|0\.99\d\d)\)", first)
    assert pair is not None and pair[1] == pair[2], first  # a slice matched with itself
    r = CliRunner().invoke(main, [*args, "--per-slice"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.count("· slice level") == 6, r.output
