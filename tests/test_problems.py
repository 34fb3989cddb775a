"""Every radcache error code has its HTTP status in one table; the errors know no HTTP."""

from __future__ import annotations

import inspect

import pytest

from radcache.embeddings import errors
from radcache.service.problems import STATUS, status_of

CLASSES = [
    c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.RadcacheError)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_code_has_a_status_and_no_http_of_its_own(cls: type) -> None:
    assert cls is errors.RadcacheError or cls.code in STATUS, f"{cls.code} has no HTTP status"
    assert not hasattr(cls, "status"), "the library's errors carry a code, not an HTTP status"


def test_status_follows_the_code_then_the_parent() -> None:
    assert status_of(errors.NotDicomError("x")) == 415
    assert status_of(errors.TruncatedFileError("x")) == 422

    class Unlisted(errors.StoreError):
        code = "unlisted"

    assert status_of(Unlisted("x")) == 500 and status_of(errors.RadcacheError("x")) == 500
    assert status_of(errors.QueueFullError("x")) == 503
