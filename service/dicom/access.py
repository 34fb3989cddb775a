"""Who may send to the DICOM receiver: a calling-AE allow-list, each AE title mapped to an
API key (its tenant and scopes) or, while the service has no key, to a tenant.

DICOM associations carry no credentials, only AE titles, so the allow-list is the
receiver's access control, and an AE acts as the key it is mapped to: the key must be
active and hold the ``submit`` scope at each association (revoking it shuts the AE out
within about a second), and what the AE sends belongs to the key's tenant. A service
without keys is open where the HTTP side is (:func:`~radcache.service.auth.open_allowed`,
for the receiver's own address): there an AE may be mapped to a tenant by name, and an
empty allow-list lets any AE send for the default tenant. Everything else is refused at
association (A-ASSOCIATE-RJ, calling AE title not recognised).
"""

from __future__ import annotations

import re

from radcache.embeddings.errors import ConfigError, InvalidFieldError

from ..auth import OPEN, is_loopback
from ..keys import KeyStore, Principal, check_tenant
from ..settings import ServiceSettings

__all__ = ["AeAccess", "check_dicom_settings", "dicom_host"]

_KEY_PREFIX = re.compile(r"^[0-9a-f]{8}$")


def _ae_title(value: str, what: str) -> str:
    """``value`` as an AE title (PS3.5: 1-16 characters of the default repertoire, no
    backslash or control character, not only spaces), stripped."""
    title = value.strip()
    if not 0 < len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title):
        raise ConfigError(
            f"{what} {value!r} is not an AE title: expected 1-16 printable ASCII characters "
            "without backslashes, e.g. RADCACHE."
        )
    return title


def dicom_host(settings: ServiceSettings) -> str:
    """The address the receiver listens on (the HTTP host's unless set)."""
    return settings.dicom_host or settings.host


def check_dicom_settings(settings: ServiceSettings) -> None:
    """Refuse a receiver configuration that cannot work, before anything starts: an AE
    title that is none, an allow-list entry that names neither a key prefix nor a tenant."""
    if settings.dicom_port is None:
        return
    _ae_title(settings.ae_title, "RADCACHE_AE_TITLE")
    for ae, target in settings.dicom_calling_aes.items():
        _ae_title(ae, "a calling AE of RADCACHE_DICOM_CALLING_AES,")
        try:
            check_tenant(target)  # a key prefix is a valid tenant name too
        except InvalidFieldError:
            raise ConfigError(
                f"calling AE {ae.strip()!r} is mapped to {target!r}: expected the 8-digit "
                "prefix of an API key with the submit scope (`radcache keys list`), or a "
                "tenant name where the service has no key."
            ) from None


class AeAccess:
    """The principal each calling AE title acts as (see the module's docstring)."""

    def __init__(self, settings: ServiceSettings, keys: KeyStore) -> None:
        self.keys = keys
        self.allowed = {ae.strip(): t for ae, t in settings.dicom_calling_aes.items()}
        self.open_allowed = settings.insecure_open or is_loopback(dicom_host(settings))

    def _open(self) -> bool:
        return self.open_allowed and not self.keys.any_active()

    def principal(self, calling: str) -> tuple[Principal | None, str]:
        """The principal of an association from ``calling``, or None and why not."""
        ae = calling.strip()
        target = self.allowed.get(ae)
        if target is None:
            if not self.allowed and self._open():
                return OPEN, ""
            return None, "not on the calling-AE allow-list (RADCACHE_DICOM_CALLING_AES)"
        key = self.keys.info(target) if _KEY_PREFIX.fullmatch(target) else None
        if key is not None:
            who = Principal(key.tenant, frozenset(key.scopes), key.prefix)
            if not key.active():
                return None, f"its API key {key.prefix} is {key.state()}"
            if not who.allows("submit"):
                return None, f"its API key {key.prefix} lacks the submit scope"
            return who, ""
        if self._open():
            return Principal(target, OPEN.scopes, None), ""
        return None, (
            f"it is mapped to {target!r}, which is no API key, and this service has keys: map "
            "it to the prefix of a key with the submit scope"
        )
