"""Send a DICOM object to a peer: by C-STORE (pynetdicom as storage SCU) to
``AE@HOST:PORT``, or by STOW-RS to a DICOMweb base URL. How a Key Object Selection answer
(:func:`radcache.service.uid_vault.kos_document`) reaches a PACS: :func:`deliver`."""

from __future__ import annotations

import base64
import contextlib
import uuid
from io import BytesIO
from typing import Any

from radcache.embeddings.errors import ConfigError, SendFailedError

__all__ = ["deliver", "parse_destination", "send", "stow"]

_STOW_FAILED = "00081198"  # Failed SOP Sequence
_WARNINGS = (0x0000, 0xB000, 0xB006, 0xB007)  # success, or a C-STORE warning


def parse_destination(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` as (AE title, host, port)."""
    ae, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    title = ae.strip()
    ok_title = 0 < len(title) <= 16 and "\\" not in title  # PS3.5: up to 16, no backslash
    if not (at and colon and ok_title and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"C-STORE destination {value!r}: expected AE@HOST:PORT (an AE title of 1 to 16 "
            "characters, no backslash), e.g. ORTHANC@127.0.0.1:4242."
        )
    return title, host, int(port)


def deliver(
    data: bytes, destination: str, *, auth: str | None = None, calling_ae: str = "RADCACHE"
) -> str:
    """Send the Part 10 file ``data`` to ``destination``: a DICOMweb base URL
    (``http(s)://…``, STOW-RS with ``auth``: ``USER:PASSWORD`` or ``Bearer TOKEN``) or
    ``AE@HOST:PORT`` (C-STORE calling as ``calling_ae``). Returns how and where it went;
    :class:`SendFailedError` when the peer did not take it."""
    if destination.startswith(("http://", "https://")):
        stow(data, destination, auth=auth)
        return f"STOW-RS {destination}"
    ae, host, port = parse_destination(destination)
    send(data, host, port, ae, calling_ae=calling_ae)
    return f"C-STORE {ae}@{host}:{port}"


def _authorization(auth: str | None) -> dict[str, str]:
    if not auth:
        return {}
    if auth.startswith("Bearer "):
        return {"Authorization": auth}
    if ":" not in auth:
        raise ConfigError(
            "the STOW-RS credentials (RADCACHE_KOS_DESTINATION_AUTH) have no ':'; expected "
            "USER:PASSWORD or 'Bearer TOKEN'."
        )
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def stow(data: bytes, base_url: str, *, auth: str | None = None, timeout: float = 30) -> None:
    """STOW-RS the Part 10 file ``data`` to the DICOMweb service at ``base_url`` (posted to
    its ``/studies``); :class:`SendFailedError` unless it stored the instance."""
    import httpx

    url = base_url.rstrip("/")
    url = url if url.endswith("/studies") else url + "/studies"
    shown = httpx.URL(url).copy_with(username=None, password=None)  # never a password
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **_authorization(auth),
    }
    try:
        r = httpx.post(url, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise SendFailedError(
            f"STOW-RS to {shown} did not answer ({type(exc).__name__}); expected a DICOMweb "
            "service there (RADCACHE_KOS_DESTINATION, or --send-to)."
        ) from None
    answer: Any = None
    with contextlib.suppress(ValueError):  # an answer that is no JSON: the status decides
        answer = r.json() if r.content else None
    failed = isinstance(answer, dict) and answer.get(_STOW_FAILED, {}).get("Value")
    if r.status_code != 200 or failed:
        why = "the instance is in its Failed SOP Sequence" if failed else f"HTTP {r.status_code}"
        raise SendFailedError(
            f"STOW-RS to {shown} did not store the document ({why}); expected 200 with the "
            "instance stored: check the URL and RADCACHE_KOS_DESTINATION_AUTH."
        )


def send(
    data: bytes,
    host: str,
    port: int,
    ae: str,
    *,
    calling_ae: str = "RADCACHE",
    timeout: float = 30,
) -> None:
    """C-STORE the Part 10 file ``data`` to the AE titled ``ae`` at ``host:port``, calling
    as ``calling_ae``, in the file's own transfer syntax; :class:`SendFailedError` when the
    peer refuses the association or the object."""
    from pydicom import dcmread
    from pynetdicom import AE

    ds = dcmread(BytesIO(data))
    sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    scu = AE(ae_title=calling_ae)
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = timeout
    scu.add_requested_context(sop_class, syntax)
    assoc = scu.associate(host, port, ae_title=ae)
    if not assoc.is_established:
        raise SendFailedError(
            f"{ae}@{host}:{port} refused an association from {calling_ae} (or did not answer); "
            f"expected the peer to know {calling_ae} as a modality allowed to store."
        )
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code not in _WARNINGS:
        shown = "no answer" if code is None else f"status 0x{code:04X}"
        raise SendFailedError(
            f"{ae}@{host}:{port} did not store the {ds.SOPClassUID.name} ({shown}); expected "
            "the peer to accept that SOP class from this AE."
        )
