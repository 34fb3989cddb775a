"""The code in the docs runs: the README's store-reading snippet and STORE.md's plain-zarr one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from tests.dicomgen import phantom, write_series

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture
def filled_store(
    tmp_path: Path, tiny: Encoder, pseudo: Pseudonymizer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    gen = write_series(tmp_path / "in", phantom(3, 16, 16))
    Pipeline(tiny, EmbeddingStore(tmp_path / "radcache-store"), pseudo).embed([gen.directory])
    monkeypatch.chdir(tmp_path)
    return tmp_path / "radcache-store"


@pytest.mark.parametrize("doc", ["README.md", "docs/STORE.md"])
def test_doc_snippets_run(doc: str, filled_store: Path) -> None:
    # Blocks that talk to a running server (they name its URL) are exercised by the
    # client and DICOMweb tests instead.
    blocks = [b for b in _python_blocks(ROOT / doc) if "http://" not in b]
    assert blocks, f"no python block in {doc}"
    for code in blocks:
        namespace: dict[str, object] = {}
        exec(compile(code, f"{doc} snippet", "exec"), namespace)  # our own docs
