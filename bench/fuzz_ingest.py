"""Soak the ingest fuzzer: the harness of ``tests/test_fuzz_ingest.py`` (mutated real
DICOM, NIfTI and zip files through ``scan`` and ``Candidate.load``), run for many more
examples and, unless ``--seed`` is given, with a fresh random seed each run.

    python bench/fuzz_ingest.py                          # 2,000 examples per format
    python bench/fuzz_ingest.py --examples 20000 --formats dicom --seed 7

Prints, per format, the examples run, the time taken, the error codes seen (``(read
whole)``: files that gave volumes and no error) and any failure
(Hypothesis' shrunk example and traceback); exits 1 if a format failed. A hang kills the
process with every thread's traceback after ``tests.fuzzing.HANG_S`` seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings

from tests import fuzzing


def run(kind: str, examples: int, rng_seed: int) -> tuple[int, Counter[str], str | None]:
    """Fuzz one format; (examples run, error codes seen, failure text or None)."""
    codes: Counter[str] = Counter()
    count = 0

    @seed(rng_seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=fuzzing.DEADLINE_MS,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(fuzzing.mutated(fuzzing.SEEDS[kind]()))
    def soak(sample: fuzzing.Sample) -> None:
        nonlocal count
        count += 1
        codes.update([e.code for e in fuzzing.check(sample)] or ["(read whole)"])

    try:
        soak()
    except Exception:
        return count, codes, traceback.format_exc()
    return count, codes, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per format")
    ap.add_argument("--formats", default="dicom,nifti,zip", help="comma-separated")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = ap.parse_args()
    rng_seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"seed {rng_seed}")
    failed = False
    for kind in args.formats.split(","):
        t0 = time.perf_counter()
        count, codes, failure = run(kind, args.examples, rng_seed)
        took = time.perf_counter() - t0
        seen = ", ".join(f"{c} {n}" for c, n in codes.most_common()) or "none"
        print(f"{kind}: {count} examples in {took:.1f} s; errors: {seen}")
        if failure:
            failed = True
            print(f"{kind}: FAILED\n{failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
