"""What the command line prints for people: identifiers whole in an 80-column table, a
warning where a volume has no modality, and no third-party progress bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.models import REGISTRY, build_random, get_cfg
from radcache.service.cli import _common, main
from tests.dicomgen import phantom, write_nifti

# rich fixes a console's width from COLUMNS when the console is made: made here, before a
# test sets COLUMNS, the CLI's console follows each invocation's width.
assert _common.out is not None

NARROW = {"COLUMNS": "80"}


def _fits(text: str, width: int = 80) -> None:
    assert "…" not in text, text  # rich's mark of a cut cell
    assert max(len(line) for line in text.splitlines()) <= width, text


def test_models_in_80_columns_keep_every_name_and_weights_id_whole() -> None:
    r = CliRunner().invoke(main, ["models"], env=NARROW)
    assert r.exit_code == 0, r.output
    _fits(r.stdout)
    lines = r.stdout.splitlines()
    for cfg in REGISTRY.values():  # each name on one line, with its weights
        (row,) = [line for line in lines if f"│ {cfg.name} " in line]
        assert (cfg.hf_id or "RANDOM (tests only)") in row, row
    assert "left out to fit 80 columns: note" in r.stdout
    wide = CliRunner().invoke(main, ["models"], env={"COLUMNS": "250"})
    assert "note" in wide.stdout.splitlines()[2] and "left out" not in wide.stdout


def test_show_in_80_columns_keeps_identifiers_whole(
    tmp_path: Path, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> None:
    store = EmbeddingStore(tmp_path / "s.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=False)
    vol = write_nifti(tmp_path / "v.nii.gz", phantom(2, 12, 12).astype(np.float32))
    pipe.embed([vol], modality="CT")
    r = CliRunner().invoke(main, ["show", str(tmp_path / "s.zarr")], env=NARROW)
    assert r.exit_code == 0, r.output
    _fits(r.stdout)
    (entry,) = store.series()
    (row,) = [line for line in r.stdout.splitlines() if entry.key[:12] in line]
    for shown in (entry.series[:12], "dinov2-tiny-random", entry.recipe_hash[:8]):
        assert shown in row, row


def test_a_volume_without_modality_warns_and_no_progress_bar_is_drawn(tmp_path: Path) -> None:
    """A NIfTI embedded without --modality is stored without one: the command says so and
    which intensity the recipe gave it. Loading a checkpoint directory draws no
    transformers bar ("Loading weights"), with or without --json."""
    ckpt = tmp_path / "ckpt"
    model: Any = build_random(get_cfg("dinov2-tiny-random"))  # a transformers model
    model.save_pretrained(ckpt)
    vol = write_nifti(tmp_path / "v.nii.gz", phantom(3, 12, 12).astype(np.float32))
    base = ["embed", str(vol), "--model", str(ckpt), "--store", str(tmp_path / "s.zarr")]
    r = CliRunner().invoke(main, base, env=NARROW)
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())  # as wrapped to 80 columns
    assert "warning" in said and "no modality given (NIfTI files carry none)" in said
    assert "percentile low=0.5 high=99.5" in said and "a CT gets ct-windows" in said
    as_json = CliRunner().invoke(main, [*base, "--json"])
    assert as_json.exit_code == 0, as_json.output
    (series,) = json.loads(as_json.stdout)["series"]
    assert series["modality"] is None and "--modality" in series["warnings"][-1]
    for text in (r.stderr, as_json.stderr):
        assert "Loading weights" not in text and "it/s]" not in text, text
    named = CliRunner().invoke(main, [*base, "--modality", "CT", "--json"])
    (ct,) = json.loads(named.stdout)["series"]
    assert ct["modality"] == "CT" and not any("modality" in w for w in ct["warnings"])


def test_a_bad_setting_is_one_usage_error_naming_it_not_a_traceback(tmp_path: Path) -> None:
    env = {"RADCACHE_PSEUDONYM_KEY": "short-secret", "RADCACHE_BATCH_SIZE": "many"}
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--store", str(tmp_path / "s")], env=env)
    assert r.exit_code == 2 and r.exception is not None and "Traceback" not in r.output
    said = " ".join(r.output.split())
    assert "RADCACHE_PSEUDONYM_KEY (or its flag): RADCACHE_PSEUDONYM_KEY must be at least" in said
    assert "RADCACHE_BATCH_SIZE (or its flag)" in said and "short-secret" not in said


def test_a_narrow_table_leaves_a_column_out_rather_than_cut_its_header() -> None:
    """The search table's headers ("description" was shown as "descripti…" at 80
    columns): a lesser column whose header does not fit is left out, named."""
    import io

    from rich.console import Console
    from rich.table import Table

    from radcache.service.cli._common import fit_table

    table = Table()
    for col in ("rank", "score", "series", "slice", "modality", "description", "labels"):
        table.add_column(col)
    table.add_row("1", "0.93", "f" * 24, "12", "CT", "chest abdomen", "finding")
    buf = io.StringIO()
    console = Console(file=buf, width=80, color_system=None)
    console.print(
        fit_table(table, ids=("series",), lesser=("labels", "description"), console=console)
    )
    _fits(buf.getvalue(), 80)
    assert "f" * 24 in buf.getvalue() and "left out to fit 80 columns: labels" in buf.getvalue()
    assert "description" in buf.getvalue().splitlines()[1]
