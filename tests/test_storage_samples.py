"""Samples and reviews in the result store (issue 16): schema 3, its migration, kill -9 safety."""
from __future__ import annotations

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
from test_storage import WRITER_PRELUDE, _decodes, _fields, _files

from leukoedge.edge_app.storage import (
    REVIEW_UNUSABLE,
    SCHEMA_VERSION,
    ResultNotFoundError,
    ResultStore,
    Sample,
    SampleNotFoundError,
    csv_rows,
)
from leukoedge.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
V2_SQL = Path(__file__).parent / "fixtures" / "results_v2.sql"


def _v2_database(data_dir: Path) -> None:
    """The results database as the schema-2 code wrote it (tests/fixtures/results_v2.sql)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(data_dir / "results.sqlite3") as db:
        db.executescript(V2_SQL.read_text())
    with sqlite3.connect(data_dir / "results.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_migration_from_schema_2_keeps_every_row(tmp_path):
    _v2_database(tmp_path)
    with sqlite3.connect(tmp_path / "results.sqlite3") as db:
        before = [tuple(r) for r in db.execute("SELECT * FROM results ORDER BY id")]
    store = ResultStore(tmp_path)
    rows = sorted(store.page(limit=100), key=lambda r: r.id)
    assert len(rows) == len(before) == 3
    for old, new in zip(before, rows):
        assert (new.id, new.created_at, new.label, new.confidence, new.abstained) == (old[0], old[1], old[4], old[5],
                                                                                      bool(old[6]))
        assert new.sample_id is None and new.review_label is None and new.review_note is None
        assert new.reviewed_at is None and not new.reviewed
        assert new.bundle_sha256 is None  # nobody recorded which bundle made a version-2 row: unknown, not guessed
        assert {"sample_id", "review_label", "review_note", "reviewed_at", "bundle_sha256"} <= set(new.to_dict())
        assert new.to_dict()["bundle_sha256"] is None
    retake = next(r for r in rows if r.retake)
    assert retake.um_per_px == pytest.approx(0.21) and retake.tiles and retake.quality["reasons"] == ["out_of_focus"]
    assert store.samples() == [] and list(store.iter_reviewed()) == []
    with sqlite3.connect(tmp_path / "results.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "results_sample" in indexes
    # The migrated database takes samples and reviews like a new one.
    sample = store.create_sample("slide 7")
    store.review(rows[0].id, "Pro", "lobed nucleus")
    added = store.add(_fields(sample_id=sample.id, bundle_sha256="ab" * 32), _files(0))
    assert [r.id for r in store.sample_results(sample.id)] == [added.id]
    assert store.get(added.id).bundle_sha256 == "ab" * 32
    header, *csv_body = list(csv_rows(store.iter_all(), ["Benign", "Early", "Pre", "Pro"]))
    column = {row[0]: row[header.index("bundle_sha256")] for row in csv_body}
    assert column[added.id] == "ab" * 32 and column[rows[0].id] == ""  # empty cell: not recorded
    assert [r.review_label for r in store.iter_reviewed()] == ["Pro"]
    store.close()
    assert ResultStore(tmp_path).count() == 4  # reopening a version-3 database migrates nothing


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "xyz", 5, "ab" * 32 + "\n"])
def test_a_malformed_bundle_checksum_stores_nothing(tmp_path, bad):
    """The checksum names the model in every report: anything but 64 lowercase hex digits is refused before any file."""
    store = ResultStore(tmp_path)
    with pytest.raises(UsageError, match="bundle_sha256"):
        store.add(_fields(bundle_sha256=bad), _files(0))
    assert store.count() == 0 and not list(store.images_dir.iterdir())


def test_interrupted_migration_is_redone(tmp_path):
    """A migration whose transaction never committed leaves version 2; the next open does it all again."""
    _v2_database(tmp_path)
    with sqlite3.connect(tmp_path / "results.sqlite3", isolation_level=None) as db:
        db.execute("BEGIN")
        db.execute("ALTER TABLE results ADD COLUMN sample_id TEXT")
        db.execute("ROLLBACK")
    assert ResultStore(tmp_path).count() == 3


def test_samples_create_get_list_close_delete(tmp_path):
    store = ResultStore(tmp_path)
    a = store.create_sample("  slide A-12  ", "Wright stain")
    b = store.create_sample("slide B")
    assert isinstance(a, Sample) and a.name == "slide A-12" and a.note == "Wright stain" and not a.closed
    assert len(a.id) == 32 and store.get_sample(a.id) == a
    assert [s.id for s in store.samples()] == [b.id, a.id]  # newest first
    r1 = store.add(_fields(sample_id=a.id), _files(0))
    r2 = store.add(_fields("Pro", sample_id=a.id, created_at=time.time() + 1), _files(3, heatmap=False))
    other = store.add(_fields(sample_id=b.id), _files(6))
    loose = store.add(_fields(), _files(9))
    assert r1.sample_id == a.id and loose.sample_id is None
    assert [r.id for r in store.sample_results(a.id)] == [r1.id, r2.id]

    closed = store.close_sample(a.id)
    assert closed.closed and store.close_sample(a.id).closed_at == closed.closed_at
    before = sorted(p.name for p in store.images_dir.iterdir())
    with pytest.raises(UsageError, match="closed"):
        store.add(_fields(sample_id=a.id), _files(12))
    assert sorted(p.name for p in store.images_dir.iterdir()) == before and store.count() == 4

    assert store.delete_sample(a.id) == 2
    with pytest.raises(SampleNotFoundError):
        store.get_sample(a.id)
    for gone in (r1, r2):
        with pytest.raises(ResultNotFoundError):
            store.get(gone.id)
        assert not any(p.exists() for p in store.files_of(gone).values())
    assert {r.id for r in store.page()} == {other.id, loose.id}
    assert store.recover() == {"tmp_files": 0, "orphan_files": 0, "rows_missing_files": 0}
    with pytest.raises(SampleNotFoundError):
        store.delete_sample(a.id)


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "two\nlines", "tab\there", "nul\x00"])
def test_bad_sample_names_are_refused(tmp_path, name):
    store = ResultStore(tmp_path)
    with pytest.raises(UsageError):
        store.create_sample(name)
    assert store.samples() == []


def test_long_note_is_refused_and_100_char_name_is_fine(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(UsageError, match="500"):
        store.create_sample("ok", "n" * 501)
    assert store.create_sample("n" * 100, "line one\nline two").note == "line one\nline two"


@pytest.mark.parametrize("bad", ["../etc", "0" * 31, "f" * 32])
def test_adding_to_an_unknown_sample_stores_nothing(tmp_path, bad):
    store = ResultStore(tmp_path)
    with pytest.raises(SampleNotFoundError):
        store.add(_fields(sample_id=bad), _files(0))
    assert store.count() == 0 and not list(store.images_dir.iterdir())


def test_review_and_filters(tmp_path):
    store = ResultStore(tmp_path)
    early = store.add(_fields("Early"), _files(0))
    pro = store.add(_fields("Pro", created_at=time.time() + 1), _files(3))
    junk = store.add(_fields("Pre", created_at=time.time() + 2), _files(6))
    untouched = store.add(_fields("Benign", created_at=time.time() + 3), _files(9))

    agreed = store.review(early.id, "Early")
    assert agreed.review_label == "Early" and agreed.review_note == "" and agreed.reviewed_at > 0
    assert not agreed.disagreed
    store.review(pro.id, "Benign", "first look")
    changed = store.review(pro.id, "Pre", "  on second look  ")  # a review can be replaced
    assert (changed.review_label, changed.review_note, changed.disagreed) == ("Pre", "on second look", True)
    store.review(junk.id, REVIEW_UNUSABLE)

    assert [r.id for r in store.iter_reviewed(batch=2)] == [early.id, pro.id, junk.id]  # oldest first, batched
    assert {r.id for r in store.page(review="reviewed")} == {early.id, pro.id, junk.id}
    assert [r.id for r in store.page(review="unreviewed")] == [untouched.id]
    assert [r.id for r in store.page(review="disagreed")] == [pro.id]  # "unusable" is not a disagreement
    assert store.count(review="disagreed", label="Pro") == 1 and store.count(review="disagreed", label="Early") == 0
    with pytest.raises(UsageError):
        store.page(review="everything")

    header, *rows = list(csv_rows(store.iter_all(), ["Benign", "Early", "Pre", "Pro"]))
    row = next(r for r in rows if r[0] == pro.id)
    assert row[header.index("review_label")] == "Pre" and row[header.index("review_note")] == "on second look"
    assert row[header.index("reviewed_at")].endswith("Z") and header[-4:] == ["p_Benign", "p_Early", "p_Pre", "p_Pro"]


def test_review_of_unknown_or_deleted_result_stores_nothing(tmp_path):
    store = ResultStore(tmp_path)
    gone = store.add(_fields(), _files(0))
    kept = store.add(_fields(), _files(3))
    store.delete(gone.id)
    with pytest.raises(ResultNotFoundError):
        store.review(gone.id, "Pro")
    with pytest.raises(ResultNotFoundError):
        store.review("nope", "Pro")
    for label in ("", "a\nb", "x" * 101, None):
        with pytest.raises(UsageError):
            store.review(kept.id, label)
    with pytest.raises(UsageError, match="500"):
        store.review(kept.id, "Pro", "n" * 501)
    assert list(store.iter_reviewed()) == []


def test_review_queue_order(tmp_path):
    store = ResultStore(tmp_path)
    t = time.time()
    confident = store.add(_fields(confidence=0.95, created_at=t + 5), _files(0))
    low = store.add(_fields(confidence=0.5, created_at=t + 4), _files(3))
    retake = store.add(_fields(retake=True, created_at=t + 3), _files(6))
    abstained = store.add(_fields(abstained=True, created_at=t + 2), _files(9))
    done = store.add(_fields(abstained=True, created_at=t + 6), _files(12))
    store.review(done.id, "Early")
    queue = store.review_queue(low_confidence=0.6)
    assert [r.id for r in queue] == [abstained.id, retake.id, low.id, confident.id]


WRITER = WRITER_PRELUDE + textwrap.dedent("""
    big = jpeg(600)
    fields = {"source": "camera", "filename": "f", "label": "Early", "confidence": 0.9, "abstained": False,
              "ood_score": None, "probabilities": {"Early": 0.9, "Pro": 0.1}, "latency_ms": 1.0, "timings": {},
              "model_name": "m", "model_version": "1", "width": 600, "height": 600, "original_ext": ".jpg",
              "bundle_sha256": "ab" * 32}
    i = 0
    while True:
        sample = store.create_sample(f"slide {i}")
        ids = [store.add(dict(fields, sample_id=sample.id), {"original": big, "thumbnail": jpeg(24),
                                                             "heatmap": jpeg(40)}).id for _ in range(3)]
        store.review(ids[0], "Pro", "checked")
        print("reviewed", ids[0], sample.id, flush=True)
        if i % 2:
            store.delete_sample(sample.id)  # the kill often lands between its rows and its files
            print("deleted", sample.id, "-", flush=True)
        i += 1
""")


def test_sigkill_during_sample_writes_leaves_a_consistent_store(tmp_path):
    """Kill a process that adds results to samples, reviews and deletes samples; check what survives.

    Invariants before recovery: the database is intact, every row's files are whole, every result's
    sample exists, every review the writer reported is there with its note, and no deleted sample
    left a row. After recover(): no orphan or temp file.
    """
    data = tmp_path / "data"
    reviewed, deleted = {}, set()
    for round_no, lines in enumerate((4, 7, 9)):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data), str(round_no)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        for n, line in enumerate(proc.stdout, 1):
            kind, ident, sample_id = line.split()
            if kind == "reviewed":
                reviewed[ident] = sample_id
            else:
                deleted.add(ident)
            if n >= lines:
                break
        time.sleep(float(np.random.default_rng(round_no).uniform(0.0, 0.05)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()

        with sqlite3.connect(data / "results.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store = ResultStore(data)
        samples = {s.id for s in store.samples()}
        rows = store.page(limit=10_000)
        assert samples.isdisjoint(deleted)
        for row in rows:
            assert row.sample_id in samples and row.sample_id not in deleted
            assert row.bundle_sha256 == "ab" * 32
            for path in store.files_of(row).values():
                assert path.is_file() and _decodes(path), path
        by_id = {r.id: r for r in rows}
        for result_id, sample_id in reviewed.items():
            row = by_id.get(result_id)
            if sample_id in samples:  # a reported review is there while its sample is
                assert row is not None and (row.review_label, row.review_note) == ("Pro", "checked")
            else:  # the sample was deleted (perhaps by the transaction the kill cut short): its results too
                assert row is None
        print(f"round {round_no}: recover() removed {store.recover()}")
        names = {p.name for p in store.images_dir.iterdir()}
        assert names == {p.name for row in store.page(limit=10_000) for p in store.files_of(row).values()}
        store.close()


def test_sample_deleted_while_a_result_is_written_takes_the_files_with_it(tmp_path, monkeypatch):
    """add() checks the sample again inside the row's transaction: a capture racing a delete leaves nothing."""
    from leukoedge.edge_app import storage

    store = ResultStore(tmp_path)
    sample = store.create_sample("slide")
    real_write = storage.atomic_write_bytes
    calls = []

    def write_then_delete(path, data, **kw):
        real_write(path, data, **kw)
        if not calls:
            store.delete_sample(sample.id)  # another request deletes the sample mid-write
        calls.append(path)

    monkeypatch.setattr(storage, "atomic_write_bytes", write_then_delete)
    with pytest.raises(SampleNotFoundError):
        store.add(_fields(sample_id=sample.id), _files(0))
    assert calls and store.count() == 0 and not list(store.images_dir.iterdir())
