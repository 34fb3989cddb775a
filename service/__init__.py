"""radcache.service: the `radcache` CLI and the HTTP service, composing radcache.embeddings.

Rooms: ``cli/`` (the console script), ``app`` + ``deps`` + ``routes/`` (HTTP), ``intake``
(every way a study comes in) with ``uploads`` and ``options``, ``runner`` (one job),
``worker`` / ``queue`` (who runs jobs), ``jobs`` + ``migrations`` (the job database),
``problems``, ``metrics``, ``settings``. See docs/ARCHITECTURE.md.

Importing it tunes one process-wide setting before numpy loads: numpy's transparent-huge-
page advice for large arrays is turned off (``NUMPY_MADVISE_HUGEPAGE=0``, unless already
set). radcache allocates and frees volume-sized arrays for every series, and on kernels
that compact memory on a huge-page fault (``defrag=madvise``) the first touch of each one
stalls: 0.35 s instead of 0.06 s for a 150×512×512 float32 volume here
(see bench/README.md).
"""

import os

os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
