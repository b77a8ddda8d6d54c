"""Typed loader errors: each message names the file, the byte offset where relevant, and what was expected."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model file or directory could not be loaded (corrupt, truncated, unsupported)."""


class ModelNotFoundError(ModelLoadError):
    """The model path does not exist (or the default model package is not installed)."""
