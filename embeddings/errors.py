"""Every error radcache raises, with a stable machine-readable ``code``.

The tree::

    RadcacheError                     code            HTTP
    ├── InputError                    (bad input: one file or series, the rest goes on)
    │   ├── NotDicomError             not-dicom              415
    │   ├── TruncatedFileError        truncated-file         422
    │   ├── InvalidHeaderError        invalid-header         422
    │   ├── NoPixelDataError          no-pixel-data          422
    │   ├── DecodeError               decode-failed          422
    │   ├── UnsupportedTransferSyntaxError
    │   │                             unsupported-transfer-syntax 415
    │   ├── InvalidNiftiError         invalid-nifti          422
    │   ├── UnreadableVolumeError     unreadable-volume      422
    │   ├── InconsistentSeriesError   inconsistent-series    422
    │   └── UnsupportedInputError     unsupported-input      415
    ├── RecipeError                   invalid-recipe         422
    ├── ModelError
    │   ├── UnknownModelError         unknown-model          404
    │   └── ModelUnavailableError     model-unavailable      503
    ├── StoreError                    store-error            500
    │   ├── NotFoundError             not-found              404
    │   ├── AmbiguousReferenceError   ambiguous-reference    409
    │   └── StoreMismatchError        store-mismatch         409
    ├── SearchIndexError              index-error            422
    └── ConfigError                   invalid-config         500

Messages say what was seen, what was expected and how to fix it. ``path`` names the
file (or series) an input error is about, so a report can list failures one per line.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousReferenceError",
    "ConfigError",
    "DecodeError",
    "InconsistentSeriesError",
    "InputError",
    "InvalidHeaderError",
    "InvalidNiftiError",
    "ModelError",
    "ModelUnavailableError",
    "NoPixelDataError",
    "NotDicomError",
    "NotFoundError",
    "RadcacheError",
    "RecipeError",
    "SearchIndexError",
    "StoreError",
    "StoreMismatchError",
    "TruncatedFileError",
    "UnknownModelError",
    "UnreadableVolumeError",
    "UnsupportedInputError",
    "UnsupportedTransferSyntaxError",
]


class RadcacheError(Exception):
    """Base class: a message for people, a stable ``code`` for programs."""

    code: str = "radcache-error"
    status: int = 500
    title: str = "radcache error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def to_dict(self) -> dict[str, str | None]:
        """The error as a JSON-ready record: ``{"path", "code", "message"}``."""
        return {"path": self.path, "code": self.code, "message": self.message}


class InputError(RadcacheError):
    """A file or series that cannot be turned into a volume; other inputs go on."""

    code = "invalid-input"
    status = 422
    title = "Invalid input"


class NotDicomError(InputError):
    code = "not-dicom"
    status = 415
    title = "Not a DICOM, NIfTI or other readable volume file"


class TruncatedFileError(InputError):
    code = "truncated-file"
    title = "File is truncated"


class InvalidHeaderError(InputError):
    code = "invalid-header"
    title = "Invalid DICOM header value"


class NoPixelDataError(InputError):
    code = "no-pixel-data"
    title = "No pixel data"


class DecodeError(InputError):
    code = "decode-failed"
    title = "Pixel data could not be decoded"


class UnsupportedTransferSyntaxError(InputError):
    code = "unsupported-transfer-syntax"
    status = 415
    title = "Unsupported transfer syntax"


class InvalidNiftiError(InputError):
    code = "invalid-nifti"
    title = "Invalid NIfTI file"


class UnreadableVolumeError(InputError):
    code = "unreadable-volume"
    title = "Volume file could not be read"


class InconsistentSeriesError(InputError):
    code = "inconsistent-series"
    title = "Series geometry is inconsistent"


class UnsupportedInputError(InputError):
    code = "unsupported-input"
    status = 415
    title = "Unsupported input"


class RecipeError(RadcacheError):
    code = "invalid-recipe"
    status = 422
    title = "Invalid preprocessing recipe"


class ModelError(RadcacheError):
    code = "model-error"
    status = 500
    title = "Model error"


class UnknownModelError(ModelError):
    code = "unknown-model"
    status = 404
    title = "Unknown model"


class ModelUnavailableError(ModelError):
    code = "model-unavailable"
    status = 503
    title = "Model weights not available"


class StoreError(RadcacheError):
    code = "store-error"
    status = 500
    title = "Store error"


class NotFoundError(StoreError):
    code = "not-found"
    status = 404
    title = "Not found"


class AmbiguousReferenceError(StoreError):
    code = "ambiguous-reference"
    status = 409
    title = "Reference matches more than one entry"


class StoreMismatchError(StoreError):
    code = "store-mismatch"
    status = 409
    title = "Store was written with another configuration"


class SearchIndexError(RadcacheError):
    code = "index-error"
    status = 422
    title = "Search index cannot do that"


class ConfigError(RadcacheError):
    code = "invalid-config"
    status = 500
    title = "Invalid configuration"
