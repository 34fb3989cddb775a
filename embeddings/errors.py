"""Every error radcache raises, with a stable machine-readable ``code``.

The tree::

    RadcacheError                     code
    ├── InputError                    invalid-input  (one bad file or series; the rest goes on)
    │   ├── NotDicomError             not-dicom
    │   ├── TruncatedFileError        truncated-file
    │   ├── InvalidHeaderError        invalid-header
    │   ├── NoPixelDataError          no-pixel-data
    │   ├── DecodeError               decode-failed
    │   ├── UnsupportedTransferSyntaxError
    │   │                             unsupported-transfer-syntax
    │   ├── InvalidNiftiError         invalid-nifti
    │   ├── UnreadableVolumeError     unreadable-volume
    │   ├── InconsistentSeriesError   inconsistent-series
    │   ├── UnsupportedInputError     unsupported-input
    │   ├── EmptyUploadError          empty-upload
    │   ├── UnsupportedMediaTypeError unsupported-media-type
    │   ├── MalformedBodyError        bad-multipart
    │   ├── InvalidFieldError         invalid-request
    │   ├── InsufficientDataError     insufficient-data  (a probe's splits cannot give a result)
    │   ├── VolumeTooLargeError       volume-too-large
    │   ├── DecompressedTooLargeError decompressed-too-large
    │   └── UnsafeReferenceError      unsafe-reference
    ├── PayloadTooLargeError          payload-too-large
    │   └── JsonTooLargeError         json-too-large
    ├── RecipeError                   invalid-recipe
    ├── ModelError                    model-error
    │   ├── UnknownModelError         unknown-model
    │   ├── ModelUnavailableError     model-unavailable
    │   └── ModelNotLoadedError       model-not-loaded
    ├── StoreError                    store-error
    │   ├── NotFoundError             not-found
    │   ├── AmbiguousReferenceError   ambiguous-reference
    │   ├── StoreMismatchError        store-mismatch
    │   └── StoreBusyError            store-busy
    ├── SearchIndexError              index-error
    ├── JobQueueError                 job-queue-error
    │   ├── QueueFullError            queue-full
    │   └── QueueUnavailableError     queue-unavailable
    ├── ConfigError                   invalid-config
    │   ├── VaultOffError             uid-vault-off
    │   └── DestinationUnsetError     kos-destination-unset
    ├── SendFailedError               kos-send-failed  (a DICOM peer did not take a document)
    ├── AccessError                   access-denied
    │   ├── UnauthenticatedError      unauthenticated
    │   └── ForbiddenError            forbidden
    └── radcache.clients.RadcacheAPIError
                                      the code of the service's problem answer

Errors carry no HTTP knowledge: :mod:`radcache.service.problems` maps each ``code`` to
its status. Messages say what was seen, what was expected and how to fix it. ``path``
names the file (or series) an input error is about, so a report can list failures one
per line.
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "AmbiguousReferenceError",
    "ConfigError",
    "DecodeError",
    "DecompressedTooLargeError",
    "DestinationUnsetError",
    "EmptyUploadError",
    "ForbiddenError",
    "InconsistentSeriesError",
    "InputError",
    "InsufficientDataError",
    "InvalidFieldError",
    "InvalidHeaderError",
    "InvalidNiftiError",
    "JobQueueError",
    "JsonTooLargeError",
    "MalformedBodyError",
    "ModelError",
    "ModelNotLoadedError",
    "ModelUnavailableError",
    "NoPixelDataError",
    "NotDicomError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QueueFullError",
    "QueueUnavailableError",
    "RadcacheError",
    "RecipeError",
    "SearchIndexError",
    "SendFailedError",
    "StoreBusyError",
    "StoreError",
    "StoreMismatchError",
    "TruncatedFileError",
    "UnauthenticatedError",
    "UnknownModelError",
    "UnreadableVolumeError",
    "UnsafeReferenceError",
    "UnsupportedInputError",
    "UnsupportedMediaTypeError",
    "UnsupportedTransferSyntaxError",
    "VaultOffError",
    "VolumeTooLargeError",
]


class RadcacheError(Exception):
    """Base class: a message for people, a stable ``code`` for programs."""

    code: str = "radcache-error"
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
    title = "Invalid input"


class NotDicomError(InputError):
    code = "not-dicom"
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
    title = "Unsupported input"


class RecipeError(RadcacheError):
    code = "invalid-recipe"
    title = "Invalid preprocessing recipe"


class ModelError(RadcacheError):
    code = "model-error"
    title = "Model error"


class UnknownModelError(ModelError):
    code = "unknown-model"
    title = "Unknown model"


class ModelUnavailableError(ModelError):
    code = "model-unavailable"
    title = "Model weights not available"


class StoreError(RadcacheError):
    code = "store-error"
    title = "Store error"


class NotFoundError(StoreError):
    code = "not-found"
    title = "Not found"


class AmbiguousReferenceError(StoreError):
    code = "ambiguous-reference"
    title = "Reference matches more than one entry"


class StoreMismatchError(StoreError):
    code = "store-mismatch"
    title = "Store was written with another configuration"


class StoreBusyError(StoreError):
    """Another process has the store open for writing (``radcache check --repair``)."""

    code = "store-busy"
    title = "Store is open for writing elsewhere"


class SearchIndexError(RadcacheError):
    code = "index-error"
    title = "Search index cannot do that"


class ConfigError(RadcacheError):
    code = "invalid-config"
    title = "Invalid configuration"


class VaultOffError(ConfigError):
    """A feature that needs the original UIDs (a KOS answer), asked of a service whose UID
    vault is off."""

    code = "uid-vault-off"
    title = "UID vault off"


class DestinationUnsetError(ConfigError):
    """A KOS answer asked to be sent, of a service with no KOS destination configured."""

    code = "kos-destination-unset"
    title = "No KOS destination configured"


class SendFailedError(RadcacheError):
    """A DICOM peer (C-STORE or STOW-RS) refused a document radcache sent, or did not answer."""

    code = "kos-send-failed"
    title = "The document could not be sent"


class EmptyUploadError(InputError):
    code = "empty-upload"
    title = "Nothing uploaded"


class UnsupportedMediaTypeError(InputError):
    code = "unsupported-media-type"
    title = "Unsupported media type"


class InvalidFieldError(InputError):
    code = "invalid-request"
    title = "Invalid request field"


class PayloadTooLargeError(RadcacheError):
    code = "payload-too-large"
    title = "Upload too large"


class JsonTooLargeError(PayloadTooLargeError):
    """A request body that is not an upload (the JSON of a search, a classification, …)
    over the ``max_json_bytes`` setting; refused while it streams, before it is parsed."""

    code = "json-too-large"
    title = "Request body too large"


class ModelNotLoadedError(ModelError):
    code = "model-not-loaded"
    title = "Another model is loaded"


class JobQueueError(RadcacheError):
    code = "job-queue-error"
    title = "Job queue error"


class QueueFullError(JobQueueError):
    code = "queue-full"
    title = "Too many jobs waiting"


class QueueUnavailableError(JobQueueError):
    code = "queue-unavailable"
    title = "The job queue cannot be reached"


class AccessError(RadcacheError):
    code = "access-denied"
    title = "Access denied"


class UnauthenticatedError(AccessError):
    """No API key, or one that is unknown, revoked or expired."""

    code = "unauthenticated"
    title = "An API key is needed"


class ForbiddenError(AccessError):
    """A valid key without the scope the operation needs."""

    code = "forbidden"
    title = "The key lacks the scope this needs"


class MalformedBodyError(InputError):
    """A multipart request body that breaks its own framing: cut short, a part longer or
    shorter than its Content-Length, an instance cut inside."""

    code = "bad-multipart"
    title = "Malformed multipart body"


class InsufficientDataError(InputError):
    """Labelled rows a probe cannot work with: an empty split, a single class to learn
    from. Raised before anything is fitted; the message gives each split's patients,
    rows and classes, and what to change."""

    code = "insufficient-data"
    title = "Too little labelled data for the probe"


class VolumeTooLargeError(InputError):
    """A header that declares more voxels than the ``max_voxels`` setting allows; refused
    before any voxel is read or decoded."""

    code = "volume-too-large"
    title = "Volume too large"


class DecompressedTooLargeError(InputError):
    """An input that would inflate past the ``max_decompressed_bytes`` an upload may
    decompress to (zip members, gzipped volumes, compressed pixel data)."""

    code = "decompressed-too-large"
    title = "Input inflates past the decompression limit"


class UnsafeReferenceError(InputError):
    """A detached header (MetaImage ``.mhd``, NRRD ``.nhdr``) naming a data file that is not
    a file beside it in the same input."""

    code = "unsafe-reference"
    title = "Header names a file outside its input"
