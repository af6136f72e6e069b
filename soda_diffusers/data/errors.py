"""The one error type of the data layer for malformed datasets (missing files raise ``FileNotFoundError``)."""

from __future__ import annotations


class NMRFormatError(ValueError):
    """A dataset file exists but is not what the NMR layout expects: a corrupt PNG or zip, a
    malformed ``metadata.yaml`` or view list, a ``cameras.npz`` without the expected keys, or a folder
    that is not an NMR dataset at all. The message names the file (or key) and what was expected."""
