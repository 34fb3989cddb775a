"""``/v1/series/…``: a cached series and its embeddings (JSON or ``.npy``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from radcache.clients.schemas import EntryOut

from ..auth import Read
from ..deps import ResourcesDep
from ._common import ERRORS, catalog, entry_out

__all__ = ["router"]

router = APIRouter()


@router.get(
    "/v1/series/{series}", response_model=EntryOut, responses=ERRORS, summary="A cached series"
)
def get_series(series: str, res: ResourcesDep, who: Read) -> EntryOut:
    """``series`` is a series name, ``series#part``, or an entry key, or a unique prefix
    (4 characters or more) of a series name or entry key."""
    return entry_out(catalog(res).resolve(series, res.store, who.tenant))


# The JSON form of an array: its values as nested lists of numbers, ``shape`` deep.
_ARRAY_JSON = {
    "type": "object",
    "properties": {
        "entry": {"type": "string"},
        "kind": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "dtype": {"type": "string"},
        "data": {"type": "array"},
    },
    "required": ["entry", "kind", "shape", "dtype", "data"],
}
Kind = Literal["pooled", "cls", "mean_patch", "patch", "cls_last", "cls_last4", "positions"]


def _npy_stream(arr: np.ndarray) -> Iterator[bytes]:
    """``arr`` as a ``.npy`` file, a MiB at a time (an empty array is a header alone)."""
    arr = np.ascontiguousarray(arr)  # C order, as the header will say
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    yield head.getvalue()
    flat = arr.reshape(-1).view(np.uint8)
    for i in range(0, flat.size, 1 << 20):
        yield flat[i : i + (1 << 20)].tobytes()


def _asked(accept: str | None) -> Literal["json", "npy"]:
    """What an ``Accept`` header asks for: npy when it names ``application/x-npy`` and not
    ``application/json`` first (or with a higher ``q``); json otherwise, ``*/*`` included."""
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate((accept or "").lower().split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media in ("application/x-npy", "application/json") and q > 0:
            ranked.append((-q, i, media))
    return "npy" if ranked and min(ranked)[2] == "application/x-npy" else "json"


@router.get(
    "/v1/series/{series}/embeddings",
    responses={
        200: {
            "content": {
                "application/json": {"schema": _ARRAY_JSON},
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            }
        },
        **ERRORS,
    },
    summary="Embeddings of a cached series (JSON or .npy)",
)
def get_embeddings(
    series: str,
    res: ResourcesDep,
    who: Read,
    kind: Kind = "pooled",
    slices: Annotated[str | None, Query(pattern=r"^\d*:\d*$", examples=["0:16"])] = None,
    format: Annotated[
        Literal["json", "npy"] | None,
        Query(description="json or npy; over Accept. [default: what Accept asks, else json]"),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """JSON unless asked for ``.npy`` (``?format=npy``, or ``Accept: application/x-npy``
    without ``application/json`` before it), so a client that asks for nothing in
    particular (``*/*``) never gets binary. ``slices=a:b`` cuts per-slice arrays (a range
    past the last slice: an empty array, shape ``(0, …)``)."""
    info = catalog(res).resolve(series, res.store, who.tenant)
    arr = res.store.read(info.key, "cls_last" if kind == "cls_last4" else kind)
    if slices and arr.ndim > 1:
        a, _, b = slices.partition(":")
        arr = arr[int(a) if a else None : int(b) if b else None]
    if (format or _asked(accept)) != "npy":
        return JSONResponse(
            {
                "entry": info.key,
                "kind": kind,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "data": arr.astype(np.float64).tolist(),
            }
        )
    return StreamingResponse(
        _npy_stream(arr),
        media_type="application/x-npy",
        headers={"Content-Disposition": f'attachment; filename="{info.key}-{kind}.npy"'},
    )
