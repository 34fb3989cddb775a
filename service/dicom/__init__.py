"""The DICOM network receiver: a C-STORE SCP beside the HTTP service, through the one
intake (:mod:`radcache.service.intake`).

``radcache serve --dicom-port 11112 --ae-title RADCACHE`` starts it with the app
(:func:`start_receiver`, from the app's lifespan) and stops it with the app. Rooms:
:mod:`.access` (the calling-AE allow-list: which AE sends for which key and tenant),
:mod:`.scp` (pynetdicom: associations, C-ECHO, C-STORE and its statuses), :mod:`.spool`
(data sets written to disk as they arrive, under the instance limit), :mod:`.hold`
(instances on disk until their study is complete, then one job per study; late instances
re-embed their series, replacing its earlier entry) and :mod:`.send` (a document sent on
by C-STORE or STOW-RS: a KOS answer). The receiver only receives and enqueues: with
``--queue`` the jobs run on `radcache worker` processes like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .access import check_dicom_settings, dicom_host
from .hold import HOLD_DIR, forget_study

if TYPE_CHECKING:
    from ..deps import Resources
    from .scp import DicomReceiver

__all__ = ["HOLD_DIR", "check_dicom_settings", "dicom_host", "forget_study", "start_receiver"]


def start_receiver(res: Resources) -> DicomReceiver:
    """Start the receiver ``res.settings`` describe (``dicom_port`` set), as
    ``res.receiver`` (its :meth:`~.scp.DicomReceiver.state` is part of readiness);
    blocking."""
    from .scp import DicomReceiver

    receiver = DicomReceiver(res)
    res.receiver = receiver
    receiver.start()
    return receiver
