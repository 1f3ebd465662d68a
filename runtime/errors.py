"""The runtime's error tree.

Every failure a user can act on is one of these, with a message that names what is wrong and how
to fix it. onnxruntime and cryptography exceptions are caught where they enter our code and
re-raised as these, so callers (the agent, the CLI) need to know only this module.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose; the CLI prints its message in one line."""

    #: exit code the CLI uses for this kind of error (2: bad usage or bad input)
    exit_code = 2


class PackageError(EdgefleetError):
    """A model package cannot be used: missing, malformed, tampered or untrusted."""


class PackageNotFoundError(PackageError):
    """The package directory or one of its files is missing."""


class ManifestError(PackageError):
    """manifest.json is not valid JSON or does not follow the manifest schema."""


class UnsupportedFormatError(PackageError):
    """The manifest declares a package format this version of edgefleet cannot read."""


class IntegrityError(PackageError):
    """The model file does not match the size or SHA-256 recorded in the manifest."""


class SignatureError(PackageError):
    """The package is unsigned where a signature is required, or its signature does not hold."""


class KeyFileError(EdgefleetError):
    """A key file is missing, unreadable or of the wrong kind."""


class ModelLoadError(EdgefleetError):
    """onnxruntime refused the model file (not ONNX, unsupported operator, broken graph)."""


class InputError(EdgefleetError):
    """A request's inputs do not fit the model's schema; the message names the input."""

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name


class InferenceError(EdgefleetError):
    """onnxruntime failed while running a request that passed the schema checks."""


class OverloadedError(EdgefleetError):
    """The micro-batcher's queue is full; the request was refused, not dropped silently."""


class ClosedError(EdgefleetError):
    """The micro-batcher was closed; no new requests are accepted."""
