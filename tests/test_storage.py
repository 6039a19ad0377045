"""Result storage: SQLite (WAL) + atomically written files, consistent after SIGKILL."""
from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoedge.edge_app.storage import ResultNotFoundError, ResultStore, check_result_id, csv_rows, csv_safe

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, side: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _fields(label: str = "Early", **kw) -> dict:
    base = {
        "source": "upload", "filename": "cell.png", "label": label, "confidence": 0.8, "abstained": False,
        "ood_score": 0.2, "probabilities": {"Benign": 0.1, "Early": 0.8, "Pre": 0.05, "Pro": 0.05},
        "latency_ms": 3.5, "timings": {"invoke_ms": 1.0}, "model_name": "tiny", "model_version": "1",
        "width": 48, "height": 48, "original_ext": ".jpg",
    }
    base.update(kw)
    return base


def _files(seed: int = 0, heatmap: bool = True) -> dict:
    files = {"original": _jpeg(seed), "thumbnail": _jpeg(seed + 1, 16)}
    if heatmap:
        files["heatmap"] = _jpeg(seed + 2, 32)
    return files


def test_add_get_page_count_delete(tmp_path):
    store = ResultStore(tmp_path)
    a = store.add(_fields("Early"), _files(0))
    b = store.add(_fields("Pro", created_at=time.time() + 1), _files(3, heatmap=False))
    c = store.add(_fields("Pre", abstained=True, created_at=time.time() + 2), _files(6))
    assert store.get(a.id) == a
    assert [r.id for r in store.page()] == [c.id, b.id, a.id]  # newest first
    assert [r.id for r in store.page(limit=1, offset=1)] == [b.id]
    assert store.count() == 3 and store.count(label="Pro") == 1
    assert [r.id for r in store.page(label="abstained")] == [c.id]
    assert store.labels() == ["Early", "Pre", "Pro"]
    assert set(store.files_of(b)) == {"original", "thumbnail"}
    for path in store.files_of(a).values():
        assert path.is_file()
    assert store.file_path(a.id, "original", ".jpg").read_bytes() == _files(0)["original"]
    store.delete(a.id)
    with pytest.raises(ResultNotFoundError):
        store.get(a.id)
    assert not any(p.exists() for p in store.files_of(a).values())
    assert store.count() == 2
    with sqlite3.connect(tmp_path / "results.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..", "", "ABCDEF" * 6, "0" * 31, "0" * 32 + "/x", "g" * 32])
def test_malformed_ids_never_reach_the_filesystem(tmp_path, bad):
    store = ResultStore(tmp_path)
    with pytest.raises(ResultNotFoundError):
        check_result_id(bad)
    with pytest.raises(ResultNotFoundError):
        store.file_path(bad, "original")
    with pytest.raises(ResultNotFoundError):
        store.get(bad)


def test_unknown_file_kind_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ResultNotFoundError):
        store.file_path("0" * 32, "../secret_key")


def test_recover_removes_tmp_orphans_and_rows_with_missing_files(tmp_path):
    store = ResultStore(tmp_path)
    keep = store.add(_fields(), _files(0))
    broken = store.add(_fields(), _files(3))
    store.file_path(broken.id, "heatmap").unlink()  # e.g. a card restored from an old backup
    (store.images_dir / ("a" * 32 + ".jpg")).write_bytes(b"orphan")  # file whose row never committed
    (store.images_dir / ("b" * 32 + ".thumb.jpg.tmp")).write_bytes(b"half")  # interrupted write
    store.close()

    reopened = ResultStore(tmp_path)
    removed = reopened.recover()
    assert removed == {"tmp_files": 1, "orphan_files": 3, "rows_missing_files": 1}  # 1 orphan + 2 of broken
    assert [r.id for r in reopened.page()] == [keep.id]
    assert sorted(p.name for p in reopened.images_dir.iterdir()) == sorted(p.name for p in reopened.files_of(keep).values())
    assert reopened.recover() == {"tmp_files": 0, "orphan_files": 0, "rows_missing_files": 0}


def test_stored_images_are_not_world_readable(tmp_path):
    """The store writes through leukoedge.files with mode 0640 (tests of the write itself: test_files.py)."""
    store = ResultStore(tmp_path)
    result = store.add(_fields(), _files(0))
    umask = os.umask(0)
    os.umask(umask)
    for path in store.files_of(result).values():
        assert path.stat().st_mode & 0o777 == 0o640 & ~umask
    assert not list(store.images_dir.glob("*.tmp"))


def test_csv_export_defuses_formulas():
    assert csv_safe("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert csv_safe("+1") == "'+1" and csv_safe("cell.png") == "cell.png" and csv_safe(0.5) == 0.5


def test_csv_rows_have_one_probability_column_per_class(tmp_path):
    store = ResultStore(tmp_path)
    store.add(_fields(filename="=cmd|' /C calc'!A0"), _files(0))
    header, row = list(csv_rows(store.iter_all(), ["Benign", "Early", "Pre", "Pro"]))
    assert header[-4:] == ["p_Benign", "p_Early", "p_Pre", "p_Pro"]
    assert row[header.index("filename")].startswith("'=")
    assert float(row[header.index("p_Early")]) == pytest.approx(0.8)


def test_many_threads_write_and_read(tmp_path):
    import threading

    store = ResultStore(tmp_path)
    errors = []

    def work(seed):
        try:
            for i in range(5):
                r = store.add(_fields(), _files(seed * 10 + i, heatmap=False))
                assert store.get(r.id).id == r.id
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.count() == 30


#: Start of a writer process killed by the SIGKILL tests: ``store`` on argv[1], ``jpeg(side)`` seeded by argv[2].
WRITER_PRELUDE = textwrap.dedent("""
    import io, sys, time
    import numpy as np
    from PIL import Image
    from leukoedge.edge_app.storage import ResultStore

    store = ResultStore(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    def jpeg(side):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, format="JPEG", quality=95)
        return out.getvalue()
""")
WRITER = WRITER_PRELUDE + textwrap.dedent("""
    big = jpeg(700)  # ~1 MB: the kill often lands inside a file write
    i = 0
    while True:
        start = time.perf_counter()
        files = {"original": big, "thumbnail": jpeg(24), "heatmap": jpeg(40)}
        store.add({"source": "upload", "filename": f"f{i}", "label": "Early", "confidence": 0.9,
                   "abstained": False, "ood_score": None, "probabilities": {"Early": 0.9, "Pro": 0.1},
                   "latency_ms": 1.0, "timings": {}, "model_name": "m", "model_version": "1",
                   "width": 700, "height": 700, "original_ext": ".jpg"}, files)
        i += 1
        print(i, (time.perf_counter() - start) * 1000, flush=True)
""")


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except OSError:
        return False


def test_sigkill_during_writes_leaves_a_consistent_store(tmp_path):
    """Kill a writer process at several points; rows never point at half files.

    The kill lands at a different fraction of a write each round (timed from the
    writer's own per-result duration), so across rounds it hits file writes,
    renames and commits; what it hit is printed, the invariants are asserted.
    """
    data = tmp_path / "data"
    committed_total = 0
    for round_no, (wait_for, fraction) in enumerate(((3, 0.2), (4, 0.5), (5, 0.8), (6, 0.95))):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data), str(round_no)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        seen, durations = 0, []
        for line in proc.stdout:
            count, ms = line.split()
            seen = int(count)
            durations.append(float(ms))
            if seen >= wait_for:
                break
        time.sleep(fraction * float(np.median(durations)) / 1000)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        committed_total += seen

        # Before any recovery: every committed row has all of its files, whole.
        with sqlite3.connect(data / "results.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store = ResultStore(data)
        rows = store.page(limit=10_000)
        assert len(rows) >= committed_total  # nothing the writer reported as stored was lost
        for row in rows:
            for path in store.files_of(row).values():
                assert path.is_file() and _decodes(path), path

        print(f"round {round_no}: kill at {fraction:.0%} of a write -> recover() removed {store.recover()}")
        names = {p.name for p in store.images_dir.iterdir()}
        expected = {p.name for row in store.page(limit=10_000) for p in store.files_of(row).values()}
        assert names == expected  # no orphans, no .tmp leftovers
        committed_total = len(rows)
        store.close()
