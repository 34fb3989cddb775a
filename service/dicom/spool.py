"""C-STORE data sets written to disk as their P-DATA fragments arrive, under the instance
size limit, for the receiver (:mod:`.scp`).

pynetdicom gathers a message's data set in memory (a ``BytesIO``) until its last fragment,
or, with ``_config.STORE_RECV_CHUNKED_DATASET``, in a temporary file of the system's
temporary folder (often memory too) that is left behind when the association is aborted.
Here each association's DIMSE provider (:class:`SpoolingDimse`) gives every message a
:class:`Spool` as that ``BytesIO``: pynetdicom writes each fragment to it, and it writes
the fragment to a file in the hold's incoming folder (file meta first, as pynetdicom's
chunked mode does), counting. Once an instance passes the limit, the file is deleted and
the rest of the instance is counted, not kept; the C-STORE handler then answers 0xA700
(:attr:`Spool.over`). Memory per instance is one PDU, whatever the instance's size: the
association socket (:class:`BoundedSocket`) also refuses a PDU longer than
:data:`MAX_PDU` (a peer must keep to the maximum length the receiver announced), which
closes the connection.
"""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import create_file_meta
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

__all__ = ["MAX_PDU", "BoundedSocket", "Spool", "SpoolingDimse", "make_server"]

#: The longest PDU read (the receiver announces pynetdicom's 16 KiB maximum for P-DATA;
#: an association request with many presentation contexts is longer than that).
MAX_PDU = 1 << 20


class Spool(BytesIO):
    """One message's data set, written to ``folder`` as it arrives (a C-STORE request's;
    any other message's is counted only). Thread-safe: the association's reader writes,
    its handler thread reads and discards."""

    def __init__(self, message: DIMSEMessage, assoc: Any, folder: Path, limit: int) -> None:
        super().__init__()
        self.message, self.assoc, self.folder, self.limit = message, assoc, folder, limit
        self.path: Path | None = None
        self.size = 0  # data set bytes received
        self.over = False  # passed ``limit``: nothing is kept
        self._file: Any = None
        self._lock = threading.Lock()

    def write(self, data: Any) -> int:
        n = len(data)
        with self._lock:
            self.size += n
            if self.over or not isinstance(self.message, C_STORE_RQ):
                return n
            if self.size > self.limit:
                self.over = True
                self._drop()
                return n
            if self._file is None and not self._open():
                return n
            self._file.write(data)
        return n

    def _open(self) -> bool:
        """The file, with the file meta of the request's SOP class and instance and the
        presentation context's transfer syntax (the data set is written as sent); False
        for a context the association did not accept (pynetdicom refuses the message)."""
        import uuid

        cs = self.message.command_set
        context = self.assoc._accepted_cx.get(self.message.context_id)
        if context is None:
            return False
        syntax = context.transfer_syntax[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{uuid.uuid4().hex}.dcm"
        self._file = self.path.open("wb")
        self._file.write(b"\x00" * 128 + b"DICM")
        meta = create_file_meta(
            sop_class_uid=cs.AffectedSOPClassUID,
            sop_instance_uid=cs.AffectedSOPInstanceUID,
            transfer_syntax=syntax,
        )
        write_file_meta_info(cast(Any, self._file), meta)
        return True

    def finished(self) -> Path | None:
        """The complete file (closed), or None when nothing was kept (over the limit)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            return None if self.over else self.path

    def _drop(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete what was written (the handler has taken it, or the association ended)."""
        with self._lock:
            self._drop()
            self.over = True


class SpoolingDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with each message's data set spooled (:class:`Spool`)."""

    def __init__(self, assoc: Any, folder: Path, limit: int) -> None:
        super().__init__(assoc)
        self.folder, self.limit = folder, limit
        self.spools: list[Spool] = []  # not yet discarded

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            spool = Spool(self.message, self.assoc, self.folder, self.limit)
            self.message.data_set = spool
            # the earlier messages are complete: keep those whose file is not yet taken
            self.spools = [s for s in self.spools if s.path is not None and not s.over]
            self.spools.append(spool)
        super().receive_primitive(primitive)

    def discard(self) -> None:
        """Delete every file of the association's messages (it has ended)."""
        for spool in self.spools:
            spool.discard()


class BoundedSocket(AssociationSocket):
    """An association socket that reads no PDU longer than :data:`MAX_PDU`."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU:  # the PDU's body, after its 6-byte header
            raise OSError(f"a PDU of {nr_bytes} bytes, over the {MAX_PDU} read")
        return super().recv(nr_bytes)


class _Handler(RequestHandler):
    """Each association with a :class:`SpoolingDimse` and a :class:`BoundedSocket`."""

    folder: Path
    limit: int

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dimse = SpoolingDimse(assoc, self.folder, self.limit)
        assoc.dul.socket.__class__ = BoundedSocket  # same state, a bounded recv
        return assoc


def make_server(
    ae: AE, address: tuple[str, int], handlers: list[Any], folder: Path, limit: int
) -> tuple[ThreadedAssociationServer, threading.Thread]:
    """``ae``'s threaded server on ``address`` and the thread it serves from, its
    associations spooling data sets to ``folder`` under ``limit`` bytes each; OSError when
    it cannot listen."""
    from pynetdicom.utils import make_target

    handler = type("SpoolingHandler", (_Handler,), {"folder": folder, "limit": limit})
    server = cast(
        ThreadedAssociationServer,
        ae.make_server(
            address,
            evt_handlers=handlers,
            server_class=ThreadedAssociationServer,
            request_handler=handler,
        ),
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever), name="radcache-dicom-server", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # as start_server does: the server's shutdown removes it
    return server, thread
