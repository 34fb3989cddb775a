"""Send a DICOM object to a peer by C-STORE (pynetdicom as storage SCU): how a Key Object
Selection answer (:func:`radcache.service.uid_vault.kos_document`) reaches a PACS."""

from __future__ import annotations

from io import BytesIO

from radcache.embeddings.errors import ConfigError

__all__ = ["parse_destination", "send"]


def parse_destination(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` as (AE title, host, port)."""
    ae, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and ae.strip() and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"C-STORE destination {value!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242."
        )
    return ae.strip(), host, int(port)


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
    as ``calling_ae``, in the file's own transfer syntax; :class:`ConfigError` when the peer
    refuses the association or the object."""
    from pydicom import dcmread
    from pynetdicom import AE

    ds = dcmread(BytesIO(data))
    sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    scu = AE(ae_title=calling_ae)
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = timeout
    scu.add_requested_context(sop_class, syntax)
    assoc = scu.associate(host, port, ae_title=ae)
    if not assoc.is_established:
        raise ConfigError(
            f"{ae}@{host}:{port} refused an association from {calling_ae} (or did not answer); "
            f"expected the peer to know {calling_ae} as a modality allowed to store."
        )
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or a warning
        shown = "no answer" if code is None else f"status 0x{code:04X}"
        raise ConfigError(
            f"{ae}@{host}:{port} did not store the {ds.SOPClassUID.name} ({shown}); expected "
            "the peer to accept that SOP class from this AE."
        )
