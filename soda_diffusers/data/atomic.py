"""Write a dataset directory or file under a temporary sibling name and rename it into place at the
end, so a conversion that fails part-way leaves whatever was at the destination untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _temporary_sibling(out: Path, kind: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(handle)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` to write into (a fresh directory for ``kind="dir"``, an
    empty file for ``kind="file"``); move it to ``out`` when the block succeeds, delete it when it fails.

    An existing ``out`` raises ``FileExistsError`` before anything is written, unless ``overwrite``;
    then it is replaced only once the new output is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True, or --overwrite, to replace it)")
    partial = _temporary_sibling(out, kind)
    try:
        yield partial
        if kind == "dir":
            # mkdtemp creates the directory 0700; give it the usual permissions of a dataset.
            os.chmod(partial, 0o755)
        else:
            os.chmod(partial, 0o644)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while it was being written")
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            os.replace(out, previous)
            os.replace(partial, out)
            _remove(previous)
        else:
            try:
                os.replace(partial, out)
            except OSError:
                # Another process finished first (renaming onto its non-empty directory fails).
                if out.exists():
                    raise FileExistsError(f"{out} appeared while it was being written") from None
                raise
    except BaseException:
        _remove(partial)
        raise
