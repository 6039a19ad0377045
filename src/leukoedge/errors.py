"""Typed errors with a user-facing message.

Library code raises these and never calls ``sys.exit``; the CLI's ``main()`` and
the Flask app's error handler are the only two places that turn them into an
exit status or an HTTP response. Every error carries a message written for the
lab member who will read it, saying what went wrong and, where possible, what to
do about it.
"""
from __future__ import annotations


class LeukoEdgeError(Exception):
    """Base class: ``str(err)`` is the user message."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def user_message(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class UsageError(LeukoEdgeError):
    """A bad combination of arguments (rejected, never silently rewritten)."""

    exit_code = 2
    http_status = 400


class InvalidImageError(LeukoEdgeError):
    """The input is not a decodable image (corrupt, truncated, empty, not an image)."""

    exit_code = 3
    http_status = 400


class ImageTooLargeError(InvalidImageError):
    """Absurd dimensions or a decompression bomb; refused before decoding pixels."""

    http_status = 413


class DatasetError(LeukoEdgeError):
    """A dataset folder whose layout or content cannot be used."""

    exit_code = 4
    http_status = 400


class ManifestError(DatasetError):
    """A split manifest that is missing, malformed or does not match the data."""


class ModelNotFoundError(LeukoEdgeError):
    """An unknown model name; the message lists the registered names."""

    exit_code = 2
    http_status = 404


class RunError(LeukoEdgeError):
    """A training run directory that is missing pieces or is inconsistent."""

    exit_code = 5


class ConversionError(LeukoEdgeError):
    """TFLite conversion failed or produced an unusable model."""

    exit_code = 6


class ParityError(ConversionError):
    """The converted model does not classify like the float model (gate failed)."""

    exit_code = 7


class BundleError(LeukoEdgeError):
    """A bundle that is missing files, damaged, tampered with or marked invalid."""

    exit_code = 8
    http_status = 503


class RuntimeUnavailableError(LeukoEdgeError):
    """No TFLite runtime (ai-edge-litert / tflite-runtime) is installed."""

    exit_code = 9
    http_status = 503


class CameraError(LeukoEdgeError):
    """The camera is missing or failed; the app falls back to upload mode."""

    exit_code = 10
    http_status = 503


class ScaleError(LeukoEdgeError):
    """A pixel size that cannot be measured (no red cells found) or makes no sense (not positive, absurd)."""

    exit_code = 11
    http_status = 422


class BackboneError(LeukoEdgeError):
    """A pretrained backbone (``--init``) that is unknown, missing, damaged or of another format."""

    exit_code = 12
    http_status = 500
