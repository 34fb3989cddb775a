"""``python -m radcache.service.cli``: the ``radcache`` console script."""

from . import main

main()
