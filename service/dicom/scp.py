"""The DICOM receiver itself: a pynetdicom Storage SCP (and Verification, C-ECHO) on
threads of its own, beside the HTTP service.

Associations are accepted from the AEs :class:`~.access.AeAccess` allows, for every
storage SOP class pynetdicom knows, in every transfer syntax the decoders read: lossless
compressed syntaxes first (a context that offers the sender's own compressed syntax gets
it, so the instance arrives as it was stored), then the uncompressed ones, then the lossy
ones (never asking a sender to compress an uncompressed image with loss).

Each C-STORE is answered after its instance is on disk: the encoded data set, as sent,
behind the file meta information, is written to the hold's incoming folder while it
arrives (:mod:`.spool`: one PDU in memory; past ``dicom_max_instance_bytes`` the rest is
counted, not kept, and the request answered 0xA700), checked from its header (its pixels
are never decoded), and held (:class:`~.hold.Hold`). Refusals
follow PS3.4 Annex B: ``0xA700`` (out of resources: the instance or its study past the
upload limits, the queue full), ``0xA900`` (the data set does not match its SOP class:
other SOP UIDs than the request's, no study or series UID), ``0xC000`` (cannot
understand: no readable header, cut short). Every refusal is an error of one failed job
per association, which ``GET /v1/jobs`` lists for the AE's tenant; the receiver goes on.

Logs name AE titles, counts, SOP classes and transfer syntaxes, never a UID or another
header value; pynetdicom's own per-message logging is off, and its records that quote a
UID are dropped.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from radcache.embeddings.errors import (
    InvalidHeaderError,
    NotDicomError,
    PayloadTooLargeError,
    QueueFullError,
    RadcacheError,
    TruncatedFileError,
)
from radcache.embeddings.ingest import cut_short, instance_ids

from ..deps import Resources
from ..keys import Principal
from .access import AeAccess, dicom_host
from .hold import Hold
from .spool import Spool, SpoolingDimse, make_server

__all__ = ["DicomReceiver", "transfer_syntaxes"]

log = logging.getLogger(__name__)

# PS3.4 Annex B.2.3: C-STORE statuses
_OUT_OF_RESOURCES = 0xA700
_NOT_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
_CANNOT_UNDERSTAND = 0xC000
_UID = re.compile(r"\d+(\.\d+){2,}")
_MAX_ERRORS = 100  # refusals itemised in one association's job; the rest are counted
_LOSSY = {
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes the receiver accepts, in order of preference: the compressed
    lossless ones the decoders read, the uncompressed ones, the lossy ones they read."""
    from pydicom.pixels.decoders.base import get_decoder

    readable = []
    for uid in AllTransferSyntaxes:
        if not uid.is_compressed or uid == DeflatedExplicitVRLittleEndian:
            continue
        try:
            if get_decoder(uid).is_available:
                readable.append(str(uid))
        except NotImplementedError:  # no decoder for it in pydicom
            continue
    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    return (
        [u for u in readable if u not in _LOSSY]
        + [str(u) for u in (*native, ExplicitVRBigEndian)]
        + [u for u in readable if u in _LOSSY]
    )


class _NoUids(logging.Filter):
    """Drops pynetdicom's records that quote a UID (its warnings on a non-conformant one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _UID.search(record.getMessage()) is None


@dataclass
class _Association:
    """What one association sent, for its log line and its refusals' job."""

    ae: str
    who: Principal
    stored: int = 0
    sop_classes: Counter[str] = field(default_factory=Counter)
    syntaxes: set[str] = field(default_factory=set)
    errors: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    job: str | None = None


class DicomReceiver:
    """The C-STORE SCP of one ``radcache serve``: :meth:`start`, :meth:`stop`."""

    def __init__(self, res: Resources) -> None:
        s = res.settings
        assert s.dicom_port is not None, "no RADCACHE_DICOM_PORT"
        self.res = res
        self.address = (dicom_host(s), s.dicom_port)
        self.access = AeAccess(s, res.keys)
        self.hold = Hold(res)
        self.max_instance = s.dicom_max_instance_bytes
        self._assocs: dict[int, _Association] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why it could not start
        self.ae = AE(ae_title=s.ae_title.strip())
        self.ae.require_called_aet = True  # A-ASSOCIATE-RJ: called AE title not recognised
        syntaxes = transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), syntaxes)
        self.ae.add_supported_context(Verification, syntaxes)

    def start(self) -> None:
        """Take up the hold, then listen. A port that cannot be listened on is logged and
        kept as the receiver's :meth:`state` (``/readyz`` answers 503 with it); the HTTP
        service goes on."""
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's message logs quote UIDs
        quiet = logging.getLogger("pynetdicom")
        quiet.setLevel(logging.WARNING)
        if not any(isinstance(f, _NoUids) for f in quiet.filters):
            quiet.addFilter(_NoUids())
        self.hold.start()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        try:
            self._server, self._thread = make_server(
                self.ae, self.address, handlers, self.hold.incoming(), self.max_instance
            )
        except OSError as exc:
            self.failure = (
                f"it cannot listen on {self.address[0]}:{self.address[1]} "
                f"({exc.strerror or exc}); choose another --dicom-port or RADCACHE_DICOM_HOST"
            )
            log.error("DICOM receiver not started: %s", self.failure)
            return
        log.info(
            "DICOM receiver %s on %s:%d (%d calling AEs allowed)",
            self.ae.ae_title,
            *self.address,
            len(self.access.allowed),
        )

    def state(self) -> tuple[bool, str]:
        """Whether the receiver is listening and handing studies over, and what it does
        (or why it does not)."""
        if self.failure is not None:
            return False, self.failure
        if self._server is None or self._thread is None:
            return False, "it is not started"
        sock = self._server.socket
        if not self._thread.is_alive() or sock is None or sock.fileno() < 0:
            return False, "its listening thread has stopped"
        if not self.hold.alive:
            return False, "its hand-over thread has stopped"
        host, port = self.address
        return True, f"listening on {host}:{port} as {self.ae.ae_title}"

    def stop(self) -> None:
        """Stop listening and handing over (held instances stay on disk)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.hold.stop()

    # --- event handlers (each association's own thread) ---

    def _requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", ""))
        try:
            who, why = self.access.principal(calling)
        except Exception as exc:  # the job database away: nobody is let in
            who, why = None, f"its key could not be looked up ({type(exc).__name__})"
        if who is None:
            log.warning("DICOM association from AE %r refused: %s", calling.strip(), why)
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent; calling AE not recognised
            assoc.kill()  # once the rejection is sent and the peer has closed (as pynetdicom's own)
            return
        with self._lock:
            self._assocs[id(assoc)] = _Association(calling.strip(), who)

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            sent = self._assocs.get(id(event.assoc))
        if sent is None:  # not let in by _requested (it raised): refused
            return _OUT_OF_RESOURCES
        req = cast(C_STORE, event.request)
        sop_class = UID(str(req.AffectedSOPClassUID))
        syntax = UID(str(event.context.transfer_syntax))
        n = sent.stored + sent.refused + 1
        try:
            self._take(event, sent, str(req.AffectedSOPInstanceUID))
        except RadcacheError as exc:
            return self._refuse(sent, n, sop_class, exc)
        except Exception as exc:  # a bug or the disk: refused, the receiver goes on
            log.error("DICOM instance from AE %r not held: %s", sent.ae, type(exc).__name__)
            return self._refuse(sent, n, sop_class, TruncatedFileError("it could not be held"))
        sent.stored += 1
        sent.sop_classes[sop_class.name] += 1
        sent.syntaxes.add(syntax.name)
        return 0x0000

    def _take(self, event: evt.Event, sent: _Association, sop_instance: str) -> None:
        """Check and hold one instance, already on disk (:class:`~.spool.Spool`); raises
        what refuses it."""
        req = cast(C_STORE, event.request)
        spool = req.DataSet
        if not isinstance(spool, Spool):  # never: every association spools
            raise TruncatedFileError("it was not received as a file.")
        try:
            path = spool.finished()
            if spool.over:
                raise PayloadTooLargeError(
                    f"the instance has {spool.size} bytes, more than the {self.max_instance} "
                    "the receiver takes (the rest was not kept); raise "
                    "RADCACHE_DICOM_MAX_INSTANCE_BYTES."
                )
            if path is None:
                raise NotDicomError("its C-STORE request came without a data set.")
            ids = instance_ids(path)  # NotDicomError: no readable header
            why = cut_short(path)
            if why is not None:
                raise TruncatedFileError(f"the data set is cut short: {why}.")
            if (ids.sop_class, ids.sop_instance) != (
                str(req.AffectedSOPClassUID),
                sop_instance,
            ):
                raise InvalidHeaderError(
                    "its SOP Class or SOP Instance UID is not the one of its C-STORE request; "
                    "the sender must send the data set the request names."
                )
            if not ids.study or not ids.series:
                raise InvalidHeaderError(
                    "it has no Study or Series Instance UID, which every image must have."
                )
            self.hold.admit(path, sent.who.tenant, ids, id(event.assoc))
        finally:
            spool.discard()  # still there: refused

    def _refuse(self, sent: _Association, n: int, sop_class: UID, exc: RadcacheError) -> int:
        """Record a refused instance in the association's failed job; its status."""
        if isinstance(exc, PayloadTooLargeError | QueueFullError):
            status = _OUT_OF_RESOURCES
        elif isinstance(exc, NotDicomError | TruncatedFileError):
            status = _CANNOT_UNDERSTAND
        else:
            status = _NOT_SOP_CLASS
        sent.refused += 1
        if len(sent.errors) < _MAX_ERRORS:
            item = exc.to_dict()
            item["path"] = f"instance {n} ({sop_class.name})"
            item["message"] = f"{exc.message} (C-STORE status 0x{status:04X})"
            sent.errors.append(item)
        failure = (
            f"{sent.refused} instance(s) sent by AE {sent.ae!r} were refused; the "
            "errors name each by its place in the association"
        )
        report = {"series": [], "errors": sent.errors, "skipped": []}
        try:
            jobs = self.res.jobs
            if sent.job is None:
                sent.job = jobs.create("", state="failed", report=report, tenant=sent.who.tenant).id
            jobs.update(sent.job, report=report, failure=failure)
        except Exception as exc2:  # the job database away: the refusal stands
            log.error("DICOM refusal not recorded: %s", type(exc2).__name__)
        log.warning(
            "DICOM instance %d (%s) from AE %r refused: 0x%04X %s",
            n,
            sop_class.name,
            sent.ae,
            status,
            exc.code,
        )
        return status

    def _released(self, event: evt.Event) -> None:
        self.hold.ended(id(event.assoc), released=True)

    def _closed(self, event: evt.Event) -> None:
        if isinstance(event.assoc.dimse, SpoolingDimse):
            event.assoc.dimse.discard()  # an instance cut off by an abort: never acknowledged
        with self._lock:
            sent = self._assocs.pop(id(event.assoc), None)
        if sent is None:
            return  # refused at association
        self.hold.ended(id(event.assoc), released=False)
        log.info(
            "DICOM association from AE %r ended: %d instances held, %d refused; %s; %s",
            sent.ae,
            sent.stored,
            sent.refused,
            ", ".join(f"{k} x{v}" for k, v in sorted(sent.sop_classes.items())) or "no SOP class",
            ", ".join(sorted(sent.syntaxes)) or "no transfer syntax",
        )
