"""leukoedge.files: atomic writes leave the old file or the new one, never half a file or a temp file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from leukoedge import files
from leukoedge.files import (IMAGE_SUFFIXES, atomic_path, atomic_write_bytes, atomic_write_text, image_files,
                             sha256_file, write_json)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_write_replaces_whole_file_and_creates_parents(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert _leftovers(target.parent) == []
    assert atomic_write_text(tmp_path / "t.txt", "héllo\n").read_bytes() == "héllo\n".encode("utf-8")


@pytest.mark.parametrize("mode", [0o600, 0o640, None])
def test_mode_bits_are_respected(tmp_path, mode):
    path = atomic_write_bytes(tmp_path / "secret", b"k" * 32, mode=mode)
    expected = (0o666 if mode is None else mode) & ~_umask()
    assert path.stat().st_mode & 0o777 == expected
    # Replacing an existing file gives the new file the requested mode too (a fresh temp file every time).
    path.chmod(0o644)
    atomic_write_bytes(path, b"again", mode=mode)
    assert path.stat().st_mode & 0o777 == expected


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_write_json_conventions(tmp_path):
    data = {"b": np.float32(0.5), "a": np.arange(3), "p": Path("/x/y"), "n": np.int64(7)}
    path = write_json(tmp_path / "d.json", data)
    text = path.read_text()
    assert text.endswith("}\n") and text.startswith("{\n \"b\"")  # indent 1, insertion order, newline
    assert json.loads(text) == {"b": 0.5, "a": [0, 1, 2], "p": "/x/y", "n": 7}


def test_fsync_false_still_replaces_atomically(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append(fd))
    atomic_write_bytes(tmp_path / "a", b"1", fsync=False)
    assert calls == [] and (tmp_path / "a").read_bytes() == b"1"
    atomic_write_bytes(tmp_path / "b", b"2")
    assert len(calls) == 2  # the file, then its directory


def test_atomic_path_renames_on_success_with_the_target_suffix(tmp_path):
    target = tmp_path / "arrays" / "means.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp.npy") and not tmp.exists()
        np.save(tmp, np.arange(4))  # np.save appends .npy unless the name already ends in it
    np.testing.assert_array_equal(np.load(target), np.arange(4))
    assert _leftovers(target.parent) == []


def test_atomic_path_cleans_up_on_exception(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"previous model")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a mod")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous model"
    assert _leftovers(tmp_path) == []
    # A writer that failed before creating anything is fine too.
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "never.png"):
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_image_files(tmp_path):
    for name in ("a.JPG", "b.png", "notes.txt", "sub/c.tif", ".hidden/d.jpg", "sub/.e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rel = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert rel(image_files(tmp_path)) == [".hidden/d.jpg", "a.JPG", "b.png", "sub/.e.png", "sub/c.tif"]
    assert rel(image_files(tmp_path, skip_hidden=True)) == ["a.JPG", "b.png", "sub/c.tif"]
    assert rel(image_files(tmp_path, recursive=False)) == ["a.JPG", "b.png"]
    assert image_files(tmp_path / "missing") == []
    assert ".jpeg" in IMAGE_SUFFIXES and all(s == s.lower() for s in IMAGE_SUFFIXES)
