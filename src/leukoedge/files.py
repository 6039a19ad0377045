"""File helpers every stage shares: image suffixes, SHA-256 of a file, atomic writes.

Why one module: the same few lines were copied into the bundle writer, the run
directory, the data tools, the app's result store, the benchmarks and the plots,
and the copies had drifted (some fsync'ed, most did not; one set a file mode,
the others did not; temp names differed). Every file write that a crash must
not leave half-done goes through here.

Atomic writes (:func:`atomic_write_bytes`, :func:`atomic_write_text`,
:func:`write_json`, :func:`atomic_path`) follow one recipe:

1. write a temp file in the SAME directory (a rename is only atomic within one
   file system), named ``.<name>.<random>.tmp`` (``.tmp<suffix>`` for
   :func:`atomic_path`, so writers that insist on an extension get it);
2. flush and ``fsync`` it, so the bytes are on disk before the name points at them;
3. ``os.replace`` it onto the target (readers see the old file or the new one,
   never half of either);
4. ``fsync`` the directory, so the rename itself survives a power cut.

``fsync=False`` skips steps 2 and 4 for files that are cheap to regenerate
(synthetic images): the rename still protects against a crash of the process,
only not against a power cut. On error the temp file is removed and the
target is left as it was.

Standard library + numpy only (numpy for :func:`write_json`): the device imports it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator

import numpy as np

#: File name suffixes (lower case) that every reader treats as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

_READ_CHUNK = 1 << 20
#: Permission bits a new file asks for when no mode is given (the umask then applies, as for ``open()``).
_DEFAULT_MODE = 0o666


def image_files(folder: str | Path, *, recursive: bool = True, skip_hidden: bool = False) -> list[Path]:
    """Image files (by :data:`IMAGE_SUFFIXES`, any case) under ``folder``, sorted.

    ``skip_hidden`` drops files with a path part below ``folder`` that starts
    with a dot (judged below ``folder`` only, so a dataset kept under
    ``~/.cache`` still counts). A missing folder gives an empty list; callers
    raise their own typed error, since "no images" means something different
    to a dataset reader, a camera and a benchmark.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not (skip_hidden and any(part.startswith(".") for part in p.relative_to(folder).parts))
    )


def require_image_files(folder: str | Path, error: type[Exception], label: str) -> list[Path]:
    """:func:`image_files` (recursive) of a folder that must exist and hold some, else ``error``.

    ``label`` names the folder in the message (e.g. ``"--ood-dir ood/"``) and
    ``error`` is the caller's typed error, so each stage keeps its own exit code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{label}: no such folder")
    found = image_files(folder)
    if not found:
        raise error(f"{label}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return found


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (bundles hold models of many MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a directory so renames and deletions in it are durable (a no-op where POSIX lacks it)."""
    if os.name == "posix":  # Windows cannot open a directory
        _fsync_path(path)


def _temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh hidden sibling of ``path``: ``.<name>.<random>.tmp<suffix>``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")


def _create_temp(path: Path, mode: int) -> tuple[Path, int]:
    """Create (O_EXCL) a new temp sibling of ``path`` with ``mode``; returns its path and open fd."""
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")  # pragma: no cover


def _install(tmp: Path, target: Path, fsync: bool) -> None:
    """Steps 2-4 of the module docstring for a written ``tmp``; removes ``tmp`` if any of them fails."""
    try:
        if fsync:
            _fsync_path(tmp)  # the bytes reach the disk before the name points at them
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); creates parent folders.

    ``mode``: permission bits for the new file (e.g. ``0o600`` for a secret,
    ``0o640`` for the app's stored images), applied through ``os.open`` so the
    process umask can only take bits away, exactly like ``open()``. ``None``
    asks for ``0o666`` (the usual ``0o644`` under umask 022). The temp file gets
    the mode from its creation, so the data is never readable with wider bits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(path, _DEFAULT_MODE if mode is None else mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _install(tmp, path, fsync)
    return path


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None, fsync: bool = True) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (never the locale's encoding)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode, fsync=fsync)


def json_default(obj):
    """``json.dumps(default=...)`` for what reports hold besides plain types: numpy scalars and arrays, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_json(path: str | Path, data, *, fsync: bool = True) -> Path:
    """``data`` as JSON (indent 1, keys in insertion order, trailing newline), written atomically.

    The conventions of every JSON file leukoedge writes (bundle, run directory,
    manifests): numpy scalars/arrays and :class:`~pathlib.Path` serialise (see
    :func:`json_default`). NaN is written as ``NaN`` as :mod:`json` does; reports
    that must be strict JSON replace it first (``train.metrics.jsonable``).
    """
    return atomic_write_text(path, json.dumps(data, indent=1, default=json_default) + "\n", fsync=fsync)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temp path for writers that want a file NAME (Keras ``model.save``, ``np.save``, ``savefig``)::

        with atomic_path(run / "model.keras") as tmp:
            model.save(tmp)

    The temp path sits next to ``target`` and ends in ``.tmp`` + the target's
    suffix (``.keras``, ``.npy``, ...), since some writers refuse or append an
    extension otherwise. When the block succeeds the file is fsync'ed, renamed
    onto ``target`` and the directory fsync'ed; when it raises, the temp file is
    removed and ``target`` is untouched. Parent folders are created.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, target.suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _install(tmp, target, fsync)


__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "image_files",
    "json_default",
    "require_image_files",
    "sha256_file",
    "write_json",
]
