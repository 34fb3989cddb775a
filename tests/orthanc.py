"""A throwaway Orthanc with its DICOMweb plugin on loopback, for tests that make it push to
radcache over STOW-RS or C-STORE, and receive a Key Object Selection document back.

Orthanc and the plugin come from Debian (``apt-get install orthanc orthanc-dicomweb``).
Without them the tests that need them skip, except under CI=true, where they fail:
.ci/run installs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import free_port

INSTALL = "apt-get install orthanc orthanc-dicomweb"
# Where Debian's packages put them (/usr/sbin is often off a normal user's PATH).
BINARIES = (Path("/usr/sbin/Orthanc"), Path("/usr/bin/Orthanc"))
PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
DICOMWEB_ROOT = "/dicom-web/"


@dataclass(frozen=True)
class OrthancInstall:
    """The Orthanc binary and its DICOMweb plugin."""

    binary: Path
    plugin: Path


def find_orthanc() -> OrthancInstall | None:
    """The installed Orthanc and DICOMweb plugin, or None when either is missing."""
    on_path = shutil.which("Orthanc")
    binaries = [Path(on_path)] if on_path else []
    binary = next((p for p in [*binaries, *BINARIES] if p.is_file()), None)
    plugins = [*PLUGINS, *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))]
    plugin = next((p for p in plugins if p.is_file()), None)
    if binary is None or plugin is None:
        return None
    return OrthancInstall(binary, plugin)


def require_orthanc() -> OrthancInstall:
    """The installed Orthanc; skips the test without it (fails it under CI=true)."""
    found = find_orthanc()
    if found is None:
        reason = (
            f"Orthanc or its DICOMweb plugin is not installed ({INSTALL}); "
            "the Orthanc push is not tested"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}, and CI=true requires it: .ci/run installs them.")
        print(reason)
        pytest.skip(reason)
    return found


def dicomweb_server(url: str, *, username: str = "", password: str = "") -> dict[str, Any]:
    """A ``DicomWeb.Servers`` entry for the radcache at ``url`` (its base URL), with HTTP
    Basic credentials when a password (the API key) is given."""
    entry: dict[str, Any] = {"Url": url.rstrip("/") + DICOMWEB_ROOT}
    if password:
        entry |= {"Username": username or "orthanc", "Password": password}
    return entry


def dicom_modality(ae: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A ``DicomModalities`` entry: Orthanc sends to ``ae`` at ``host:port`` and accepts
    C-STORE from that AE title at that host only (nothing else may store)."""
    return {"AET": ae, "Host": host, "Port": port, "AllowStore": True}


def _config(
    root: Path,
    install: OrthancInstall,
    servers: dict[str, dict[str, Any]],
    modalities: dict[str, dict[str, Any]],
    dicom_port: int | None,
    http_port: int | None = None,
) -> Path:
    http_port = http_port or free_port()
    while dicom_port in (None, http_port):
        dicom_port = free_port()
    config = {
        "Name": "radcache-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        # Orthanc 1.10's DICOM listener cannot be bound to loopback: it is on only when
        # asked for, on a free port (never 4242), storing from the listed modalities only
        # (AE title and host checked), and answering nothing else.
        "DicomServerEnabled": bool(modalities),
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomModalities": modalities,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "RemoteAccessAllowed": False,  # loopback only, so its own REST needs no password
        "AuthenticationEnabled": False,
        "SaveJobs": False,
        "HttpTimeout": 60,
        "Plugins": [str(install.plugin)],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "Servers": servers},
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)  # it holds API keys
    return path


@contextlib.contextmanager
def running_orthanc(
    root: Path,
    servers: dict[str, dict[str, Any]],
    modalities: dict[str, dict[str, Any]] | None = None,
    dicom_port: int | None = None,
    http_port: int | None = None,
) -> Iterator[str]:
    """Start Orthanc (storage, config and log under ``root``) knowing the DICOMweb
    ``servers`` and the DICOM ``modalities`` (:func:`dicom_modality`; with any, its DICOM
    listener is on at ``dicom_port``, AE title ORTHANC; its HTTP port ``http_port``, or a
    free one); wait until ``/system`` answers. Yields its base URL."""
    install = require_orthanc()
    root.mkdir(parents=True, exist_ok=True)
    config = _config(root, install, servers, modalities or {}, dicom_port, http_port)
    url = f"http://127.0.0.1:{json.loads(config.read_text())['HttpPort']}"
    log = root / "orthanc.log"
    with log.open("a") as out:
        proc = subprocess.Popen(
            [str(install.binary), str(config)], cwd=root, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"Orthanc did not answer /system: {log.read_text()[-2000:]}")
