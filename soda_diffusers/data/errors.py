"""The one error type of the data layer for malformed datasets (missing files raise ``FileNotFoundError``),
and how errors from elsewhere are quoted in its messages."""

from __future__ import annotations


class NMRFormatError(ValueError):
    """A dataset file exists but is not what the NMR layout expects: a corrupt PNG or zip, a
    malformed ``metadata.yaml`` or view list, a ``cameras.npz`` without the expected keys, or a folder
    that is not an NMR dataset at all. The message names the file (or key) and what was expected."""


def short_error(error: Exception) -> str:
    """The type and first line of an error: Hub and network errors run over many lines."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
