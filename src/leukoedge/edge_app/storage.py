"""Results on disk: SQLite (WAL) rows + image files, consistent across power cuts.

Write order is what keeps the two consistent:

1. every image file is written by :func:`leukoedge.files.atomic_write_bytes`
   (mode 0640: a temp ``.<name>.<random>.tmp``, fsync'ed, renamed into place,
   the directory fsync'ed), so a file either exists whole or not at all;
2. only then is the row inserted and committed (``synchronous=FULL``).

A crash between 1 and 2 leaves files without a row; deletion removes the row
first, then the files, so a crash there leaves files without a row too. On
start-up :meth:`ResultStore.recover` removes ``*.tmp`` leftovers and orphan
files, and removes rows whose files have gone missing (e.g. a card restored
from an old backup), logging what it did. Rows never point at half files.

Files are named by result id only (32 hex chars, from :func:`uuid.uuid4`) and
a fixed kind, so no user-supplied text ever becomes part of a path.

Threads: one SQLite connection per thread (``threading.local``); SQLite's own
locking plus ``busy_timeout`` serialise writers.

Schema versions (``PRAGMA user_version``), migrated forward on open, in one
transaction, keeping every row:

1. the first release;
2. issue 15: the scale each result was classified at (``um_per_px``,
   ``scale_source``, ``scale_message``), its tiles and how they were
   aggregated, the capture quality report and ``retake`` (a capture refused
   for its quality: no label). Rows from version 1 read these as unknown
   (NULL, no tiles, not a retake);
3. issue 16: samples (a slide or case the user names: table ``samples``) and
   reviews. Results gain ``sample_id`` (NULL: in no sample) and the reviewer's
   ``review_label`` (a class name or :data:`REVIEW_UNUSABLE`), ``review_note``
   and ``reviewed_at`` (NULL: not reviewed), and ``bundle_sha256``: the
   checksum of the bundle that classified the result
   (:attr:`leukoedge.bundle.Bundle.sha256`), because a model's name and version
   are typed by whoever converted it and two different bundles can share them,
   and the bundle loaded now is not the one that made older rows. Rows from
   version 2 read as in no sample, unreviewed and made by an unknown bundle
   (NULL: nobody recorded which).

Samples follow the results' rules: ids are 32 hex chars made here, never
client text; a result can only be added to an existing sample that is still
open, checked before any file is written and again inside the row's
transaction (so a sample deleted meanwhile takes the new files with it);
deleting a sample removes its rows and the sample in one transaction, then
the files, so a crash leaves only orphans for :meth:`ResultStore.recover`.

A database from a newer leukoedge is refused rather than guessed at.
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..errors import LeukoEdgeError, UsageError
from ..files import atomic_write_bytes, fsync_dir, json_default

log = logging.getLogger(__name__)

#: kind -> file suffix. The kinds are the only names a client may ask for.
FILE_KINDS = {"original": None, "thumbnail": ".thumb.jpg", "heatmap": ".heatmap.jpg"}
ORIGINAL_SUFFIXES = (".jpg", ".png")
#: Mode of stored image files: owner read/write, group read, nothing for others (as the umask allows).
IMAGE_FILE_MODE = 0o640
ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # used with fullmatch: "$" would let a trailing newline through
SCHEMA_VERSION = 3
#: Most tiles kept per result (a 12 MP frame at the training scale gives a few dozen).
MAX_STORED_TILES = 2000
#: The review label for a capture no class fits (smudged, empty field, wrong stain): kept out of agreement
#: and out of any training export.
REVIEW_UNUSABLE = "unusable"
#: Longest sample name: a slide or case id, not a document (and it is shown in every page title).
MAX_SAMPLE_NAME = 100
#: Longest sample note and review note; longer text is refused, never cut.
MAX_NOTE = 500
#: Longest review label (class names are single-line and short; this bounds what a client can store).
MAX_REVIEW_LABEL = 100
#: A bundle's checksum as :attr:`leukoedge.bundle.Bundle.sha256` gives it (hex SHA-256 of MANIFEST.sha256).
#: Used with fullmatch, as ID_PATTERN.
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
#: Control characters: refused in names and labels (they break CSV cells, page titles and folder names).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: The same, less newline and tab, which a note may hold.
_NOTE_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id            TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    source        TEXT NOT NULL,
    filename      TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    abstained     INTEGER NOT NULL,
    ood_score     REAL,
    probabilities TEXT NOT NULL,
    latency_ms    REAL NOT NULL,
    timings       TEXT NOT NULL,
    model_name    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    original_ext  TEXT NOT NULL,
    has_heatmap   INTEGER NOT NULL,
    um_per_px     REAL,
    scale_source  TEXT,
    scale_message TEXT,
    tiles         TEXT,
    aggregation   TEXT,
    quality       TEXT,
    retake        INTEGER NOT NULL DEFAULT 0,
    sample_id     TEXT,
    review_label  TEXT,
    review_note   TEXT,
    reviewed_at   REAL,
    bundle_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS results_created ON results (created_at DESC);
CREATE INDEX IF NOT EXISTS results_label ON results (label, created_at DESC);
"""
#: Columns added by each schema version: (name, SQL type and default), in order.
_ADDED_COLUMNS = {
    2: (("um_per_px", "REAL"), ("scale_source", "TEXT"), ("scale_message", "TEXT"), ("tiles", "TEXT"),
        ("aggregation", "TEXT"), ("quality", "TEXT"), ("retake", "INTEGER NOT NULL DEFAULT 0")),
    3: (("sample_id", "TEXT"), ("review_label", "TEXT"), ("review_note", "TEXT"), ("reviewed_at", "REAL"),
        ("bundle_sha256", "TEXT")),
}
#: Tables and indexes each schema version adds, run inside the migration's transaction (after its
#: columns exist: an index on ``sample_id`` cannot be created on a version-2 table before that).
_ADDED_SQL = {
    3: (("CREATE TABLE IF NOT EXISTS samples (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
         "note TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, closed_at REAL)"),
        "CREATE INDEX IF NOT EXISTS results_sample ON results (sample_id, created_at)",
        "CREATE INDEX IF NOT EXISTS results_reviewed ON results (reviewed_at)"),
}
_COLUMNS = ("id", "created_at", "source", "filename", "label", "confidence", "abstained", "ood_score",
            "probabilities", "latency_ms", "timings", "model_name", "model_version", "width", "height",
            "original_ext", "has_heatmap", "um_per_px", "scale_source", "scale_message", "tiles", "aggregation",
            "quality", "retake", "sample_id", "bundle_sha256")


class StorageError(LeukoEdgeError):
    """The results database or image folder cannot be used (disk full, permissions)."""

    exit_code = 11
    http_status = 507


class ResultNotFoundError(LeukoEdgeError):
    """No stored result with that id (never existed, deleted, or a malformed id)."""

    http_status = 404


class SampleNotFoundError(LeukoEdgeError):
    """No sample with that id (never existed, deleted, or a malformed id)."""

    http_status = 404


@dataclass(frozen=True)
class Sample:
    """A slide or case the user named; its results point at it by ``sample_id``."""

    id: str
    name: str
    note: str
    created_at: float
    closed_at: float | None = None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "note": self.note, "created_at": self.created_at,
                "created": iso_time(self.created_at), "closed_at": self.closed_at,
                "closed": self.closed}


@dataclass(frozen=True)
class StoredResult:
    """One row of the results table, decoded."""

    id: str
    created_at: float
    source: str
    filename: str
    label: str
    confidence: float
    abstained: bool
    ood_score: float | None
    probabilities: dict[str, float]
    latency_ms: float
    timings: dict[str, float]
    model_name: str
    model_version: str
    width: int
    height: int
    original_ext: str
    has_heatmap: bool
    um_per_px: float | None = None
    scale_source: str | None = None
    scale_message: str | None = None
    tiles: tuple = ()
    aggregation: str | None = None
    quality: dict | None = None
    retake: bool = False
    sample_id: str | None = None
    review_label: str | None = None
    review_note: str | None = None
    reviewed_at: float | None = None
    bundle_sha256: str | None = None

    @property
    def reviewed(self) -> bool:
        return self.review_label is not None

    @property
    def disagreed(self) -> bool:
        """The reviewer gave a class other than the model's top class ("unusable" is not a disagreement)."""
        return self.reviewed and self.review_label != REVIEW_UNUSABLE and self.review_label != self.label

    @property
    def given_label(self) -> str | None:
        """The label a reader may act on: None when the model abstained ("not like the training images")
        or the capture was refused for its quality (``retake``)."""
        return None if self.abstained or self.retake else self.label

    @property
    def outcome(self) -> str:
        """``retake`` (capture refused for its quality), ``abstained`` or ``labelled``: the history filter's kinds."""
        return "retake" if self.retake else "abstained" if self.abstained else "labelled"

    @property
    def retake_message(self) -> str | None:
        """e.g. "retake: out of focus" for a retake; None otherwise."""
        if not self.retake:
            return None
        quality = self.quality or {}
        reasons = ", ".join(str(r).replace("_", " ") for r in quality.get("reasons") or ())
        return quality.get("message") or (f"retake: {reasons}" if reasons else "retake")

    def to_dict(self) -> dict:
        """JSON-ready: ``label`` is null for an abstained result; the model's top class is ``predicted``.

        ``confidence`` is the probability of ``predicted``. A script that reads
        ``label`` can never act on a class the model refused to give (issue 14).
        """
        return {
            "id": self.id,
            "created_at": self.created_at,
            "created": iso_time(self.created_at),
            "source": self.source,
            "filename": self.filename,
            "label": self.given_label,
            "predicted": self.label,
            "confidence": self.confidence,
            "abstained": self.abstained,
            "ood_score": self.ood_score,
            "probabilities": dict(self.probabilities),
            "latency_ms": self.latency_ms,
            "timings": dict(self.timings),
            "model": {"name": self.model_name, "version": self.model_version},
            "bundle_sha256": self.bundle_sha256,
            "width": self.width,
            "height": self.height,
            "has_heatmap": self.has_heatmap,
            "outcome": self.outcome,
            "retake": self.retake,
            "retake_message": self.retake_message,
            "quality": None if self.quality is None else dict(self.quality),
            "um_per_px": self.um_per_px,
            "scale_source": self.scale_source,
            "scale_message": self.scale_message,
            "aggregation": self.aggregation,
            "tiles": [dict(t) for t in self.tiles],
            "sample_id": self.sample_id,
            "review_label": self.review_label,
            "review_note": self.review_note,
            "reviewed_at": self.reviewed_at,
        }


def iso_time(stamp: float | None) -> str | None:
    """UTC ISO 8601 ("2026-12-01T10:20:30Z") of a stored time; None for None."""
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def new_result_id() -> str:
    return uuid.uuid4().hex


def check_bundle_sha256(value: object) -> str | None:
    """The checksum (64 lowercase hex digits) or None (unknown); UsageError for anything else.

    It names the model in every report and export, so a value that is not a
    checksum is refused rather than stored.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise UsageError(f"bundle_sha256 must be 64 lowercase hex digits, not {str(value)[:80]!r}")
    return value


def check_result_id(result_id: str) -> str:
    """The id itself, or ResultNotFoundError: malformed ids never reach the filesystem."""
    if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
        raise ResultNotFoundError(f"no result with id {str(result_id)[:40]!r}")
    return result_id


def check_sample_id(sample_id: str) -> str:
    """The id itself, or SampleNotFoundError (ids are made by :func:`new_result_id`, never by a client)."""
    if not isinstance(sample_id, str) or not ID_PATTERN.fullmatch(sample_id):
        raise SampleNotFoundError(f"no sample with id {str(sample_id)[:40]!r}",
                                  hint="create the sample first, or pick one from the list")
    return sample_id


def check_sample_name(name: object) -> str:
    """The stripped name, or UsageError: 1..100 characters, no control characters."""
    text = name.strip() if isinstance(name, str) else ""
    if not text:
        raise UsageError("a sample needs a name (a slide or case id)", hint="no patient names are needed")
    if len(text) > MAX_SAMPLE_NAME:
        raise UsageError(f"a sample name has at most {MAX_SAMPLE_NAME} characters, this one has {len(text)}")
    if _CONTROL.search(text):
        raise UsageError("a sample name cannot hold control characters (line breaks, tabs)")
    return text


def check_note(note: object, what: str = "note") -> str:
    """The stripped note ('' for none), or UsageError: at most 500 characters, newlines allowed."""
    if note is None:
        return ""
    if not isinstance(note, str):
        raise UsageError(f"the {what} must be text")
    text = note.strip()
    if len(text) > MAX_NOTE:
        raise UsageError(f"the {what} has at most {MAX_NOTE} characters, this one has {len(text)}")
    if _NOTE_CONTROL.search(text):
        raise UsageError(f"the {what} cannot hold control characters")
    return text


def check_review_label(label: object) -> str:
    """The label's shape only (single-line, short); the caller checks it against the bundle's classes."""
    text = label.strip() if isinstance(label, str) else ""
    if not text or len(text) > MAX_REVIEW_LABEL or _CONTROL.search(text):
        raise UsageError("a review needs a label: one of the model's classes or 'unusable'")
    return text


class ResultStore:
    """The results table and image folder under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.db_path = self.data_dir / "results.sqlite3"
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the data folder {self.data_dir} ({err.strerror or err})",
                               hint="pass --data-dir to a folder the service user can write") from None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        try:
            conn = self._connection()
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StorageError(f"the results database {self.db_path} was written by a newer leukoedge "
                                   f"(schema {version}; this version reads up to {SCHEMA_VERSION})",
                                   hint="upgrade leukoedge, or start with another --data-dir")
            conn.executescript(_SCHEMA)
            self._migrate(conn, version)
        except sqlite3.Error as err:
            raise StorageError(f"cannot use the results database {self.db_path} ({err})") from None

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Add the columns of every schema version after ``version``, in one transaction.

        Columns are added only where missing (``PRAGMA table_info``), so a
        database made by this version (``_SCHEMA`` already has them) or a
        migration interrupted before its commit is handled alike.
        """
        if version == SCHEMA_VERSION:
            return
        have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        rows = int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        with self._Tx(conn):
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for name, decl in _ADDED_COLUMNS.get(step, ()):
                    if name not in have:
                        conn.execute(f"ALTER TABLE results ADD COLUMN {name} {decl}")
                for statement in _ADDED_SQL.get(step, ()):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version and rows:
            log.info("results database %s migrated from schema %d to %d (%d results kept)",
                     self.db_path, version, SCHEMA_VERSION, rows)

    # -- connections -------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=10000")
            except sqlite3.Error as err:
                raise StorageError(f"cannot open the results database {self.db_path} ({err})") from None
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _db(self) -> ResultStore._Tx:
        return self._Tx(self._connection())

    def close(self) -> None:
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- paths -------------------------------------------------------------
    def file_path(self, result_id: str, kind: str, original_ext: str = ".jpg") -> Path:
        check_result_id(result_id)
        if kind not in FILE_KINDS:
            raise ResultNotFoundError(f"no image kind {kind[:20]!r}; use one of {sorted(FILE_KINDS)}")
        suffix = FILE_KINDS[kind] or original_ext
        return self.images_dir / f"{result_id}{suffix}"

    def files_of(self, result: StoredResult) -> dict[str, Path]:
        kinds = ["original", "thumbnail"] + (["heatmap"] if result.has_heatmap else [])
        return {k: self.file_path(result.id, k, result.original_ext) for k in kinds}

    # -- writes ------------------------------------------------------------
    def add(self, fields: Mapping, files: Mapping[str, bytes]) -> StoredResult:
        """Write the files, then commit the row; returns the stored result.

        ``fields`` holds every column except ``id``/``has_heatmap``/``original_ext``;
        ``files`` maps kind -> bytes and must include ``original`` (as ``.jpg`` or
        ``.png`` bytes, named by ``fields["original_ext"]``) and ``thumbnail``.
        ``fields["sample_id"]`` (optional) must name an open sample: SampleNotFoundError
        or UsageError (closed) before any file is written. ``fields["bundle_sha256"]``
        (optional; None: unknown) is the classifying bundle's checksum, checked by
        :func:`check_bundle_sha256` before any file is written too.
        """
        if "original" not in files or "thumbnail" not in files:
            raise UsageError("a result needs at least its original image and a thumbnail")
        sample_id = fields.get("sample_id") or None
        if sample_id is not None:
            self._open_sample(self._connection(), sample_id)
        original_ext = fields.get("original_ext", ".jpg")
        if original_ext not in ORIGINAL_SUFFIXES:
            raise UsageError(f"original images are stored as {ORIGINAL_SUFFIXES}, not {original_ext!r}")
        result = StoredResult(
            id=new_result_id(),
            created_at=float(fields.get("created_at") or time.time()),
            source=str(fields["source"]),
            filename=str(fields.get("filename") or "")[:200],
            label=str(fields["label"]),
            confidence=float(fields["confidence"]),
            abstained=bool(fields["abstained"]),
            ood_score=None if fields.get("ood_score") is None else float(fields["ood_score"]),
            probabilities={str(k): float(v) for k, v in dict(fields["probabilities"]).items()},
            latency_ms=float(fields["latency_ms"]),
            timings={str(k): float(v) for k, v in dict(fields.get("timings") or {}).items()},
            model_name=str(fields["model_name"]),
            model_version=str(fields["model_version"]),
            width=int(fields["width"]),
            height=int(fields["height"]),
            original_ext=original_ext,
            has_heatmap="heatmap" in files,
            um_per_px=None if fields.get("um_per_px") is None else float(fields["um_per_px"]),
            scale_source=None if fields.get("scale_source") is None else str(fields["scale_source"])[:40],
            scale_message=None if fields.get("scale_message") is None else str(fields["scale_message"])[:500],
            tiles=tuple(dict(t) for t in list(fields.get("tiles") or ())[:MAX_STORED_TILES]),
            aggregation=None if fields.get("aggregation") is None else str(fields["aggregation"])[:500],
            quality=None if fields.get("quality") is None else dict(fields["quality"]),
            retake=bool(fields.get("retake", False)),
            sample_id=sample_id,
            bundle_sha256=check_bundle_sha256(fields.get("bundle_sha256")),
        )
        written: list[Path] = []
        try:
            for kind, data in files.items():
                path = self.file_path(result.id, kind, original_ext)
                atomic_write_bytes(path, data, mode=IMAGE_FILE_MODE)
                written.append(path)
            with self._db() as db:
                if sample_id is not None:
                    self._open_sample(db, sample_id)  # again: closed or deleted since the first check
                db.execute(
                    f"INSERT INTO results ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                    (result.id, result.created_at, result.source, result.filename, result.label,
                     result.confidence, int(result.abstained), result.ood_score,
                     json.dumps(result.probabilities), result.latency_ms, json.dumps(result.timings),
                     result.model_name, result.model_version, result.width, result.height,
                     result.original_ext, int(result.has_heatmap), result.um_per_px, result.scale_source,
                     result.scale_message, json.dumps(list(result.tiles), default=json_default),
                     result.aggregation,
                     None if result.quality is None else json.dumps(result.quality, default=json_default),
                     int(result.retake), result.sample_id, result.bundle_sha256),
                )
        except (OSError, sqlite3.Error, TypeError, ValueError, LeukoEdgeError) as err:
            for path in written:
                path.unlink(missing_ok=True)
            if isinstance(err, LeukoEdgeError):
                raise
            raise StorageError(f"could not save the result ({err})", hint="is the disk full?") from None
        return result

    def open_sample(self, sample_id: str) -> Sample:
        """The sample if results may be added to it: SampleNotFoundError, or UsageError when it is closed."""
        return self._open_sample(self._connection(), sample_id)

    def _open_sample(self, conn: sqlite3.Connection, sample_id: str) -> Sample:
        """The sample, if it exists and is open; SampleNotFoundError / UsageError otherwise."""
        sample = self._sample_row(conn, sample_id)
        if sample.closed:
            raise UsageError(f"sample {sample.name!r} is closed; nothing more can be added to it",
                             hint="create a new sample, or capture without one")
        return sample

    def _sample_row(self, conn: sqlite3.Connection, sample_id: str) -> Sample:
        check_sample_id(sample_id)
        row = conn.execute("SELECT * FROM samples WHERE id = ?", (sample_id,)).fetchone()
        if row is None:
            raise SampleNotFoundError(f"no sample with id {sample_id!r}", hint="it may have been deleted")
        return Sample(**dict(row))

    def delete(self, result_id: str) -> None:
        """Row first, then files: a crash in between leaves only orphans for recover()."""
        result = self.get(result_id)
        with self._db() as db:
            db.execute("DELETE FROM results WHERE id = ?", (result.id,))
        for path in self.files_of(result).values():
            path.unlink(missing_ok=True)

    def review(self, result_id: str, label: str, note: str = "") -> StoredResult:
        """Record (or replace) a reviewer's label and note, with the time; returns the updated result.

        ``label`` is a class name or :data:`REVIEW_UNUSABLE`: only its shape is
        checked here, the caller checks it against the bundle's classes (the store
        does not know the model). Unknown or deleted results raise
        ResultNotFoundError and nothing is written.
        """
        check_result_id(result_id)
        label = check_review_label(label)
        note = check_note(note, "review note")
        with self._db() as db:
            updated = db.execute("UPDATE results SET review_label = ?, review_note = ?, reviewed_at = ? WHERE id = ?",
                                 (label, note, time.time(), result_id)).rowcount
        if not updated:
            raise ResultNotFoundError(f"no result with id {result_id!r}", hint="it may have been deleted")
        return self.get(result_id)

    # -- samples -------------------------------------------------------------
    def create_sample(self, name: str, note: str = "") -> Sample:
        """A new open sample; UsageError for an empty, too long or multi-line name or a too long note."""
        sample = Sample(id=new_result_id(), name=check_sample_name(name), note=check_note(note, "sample note"),
                        created_at=time.time())
        try:
            with self._db() as db:
                db.execute("INSERT INTO samples (id, name, note, created_at, closed_at) VALUES (?, ?, ?, ?, NULL)",
                           (sample.id, sample.name, sample.note, sample.created_at))
        except sqlite3.Error as err:
            raise StorageError(f"could not save the sample ({err})", hint="is the disk full?") from None
        return sample

    def get_sample(self, sample_id: str) -> Sample:
        return self._sample_row(self._connection(), sample_id)

    def samples(self, *, limit: int = 1000) -> list[Sample]:
        """Newest first (at most ``limit``: a page, never the whole table in memory unasked)."""
        rows = self._connection().execute("SELECT * FROM samples ORDER BY created_at DESC, id LIMIT ?",
                                          (int(limit),)).fetchall()
        return [Sample(**dict(r)) for r in rows]

    def close_sample(self, sample_id: str) -> Sample:
        """Close a sample (idempotent: closing a closed sample keeps its first closing time)."""
        check_sample_id(sample_id)
        with self._db() as db:
            db.execute("UPDATE samples SET closed_at = COALESCE(closed_at, ?) WHERE id = ?", (time.time(), sample_id))
        return self.get_sample(sample_id)

    def delete_sample(self, sample_id: str) -> int:
        """Delete a sample and its results; returns how many results went.

        Rows (its results and the sample, in one transaction) first, then the
        files, as :meth:`delete` does: a crash in between leaves only orphan files,
        which :meth:`recover` removes. A capture racing with this either commits
        before (and is deleted with the sample) or finds the sample gone (and
        removes its own files).
        """
        check_sample_id(sample_id)
        with self._db() as db:
            self._sample_row(db, sample_id)
            rows = [_decode(r) for r in db.execute("SELECT * FROM results WHERE sample_id = ?", (sample_id,))]
            db.execute("DELETE FROM results WHERE sample_id = ?", (sample_id,))
            db.execute("DELETE FROM samples WHERE id = ?", (sample_id,))
        for row in rows:
            for path in self.files_of(row).values():
                path.unlink(missing_ok=True)
        return len(rows)

    def sample_results(self, sample_id: str, *, batch: int = 500) -> Iterator[StoredResult]:
        """The sample's results, oldest first (capture order), read ``batch`` rows at a time."""
        check_sample_id(sample_id)
        return self._iter("WHERE sample_id = ?", (sample_id,), "created_at, id", batch)

    def iter_reviewed(self, batch: int = 500) -> Iterator[StoredResult]:
        """Every reviewed result (``unusable`` included), oldest first, read ``batch`` rows at a time."""
        return self._iter("WHERE review_label IS NOT NULL", (), "created_at, id", batch)

    def _iter(self, where: str, params: tuple, order: str, batch: int) -> Iterator[StoredResult]:
        offset = 0
        while True:
            rows = self._connection().execute(f"SELECT * FROM results {where} ORDER BY {order} LIMIT ? OFFSET ?",
                                              (*params, int(batch), offset)).fetchall()
            yield from (_decode(r) for r in rows)
            if len(rows) < batch:
                return
            offset += batch

    def review_pairs(self, *, sample_id: str | None = None) -> list[tuple[str, str, bool, bool, int]]:
        """(predicted label, review label, retake, abstained, count) over reviewed results (of one sample when given).

        One grouped query: what the agreement figures need, without reading a row per result.
        """
        where, params = "WHERE review_label IS NOT NULL", ()
        if sample_id is not None:
            where, params = where + " AND sample_id = ?", (check_sample_id(sample_id),)
        rows = self._connection().execute(
            f"SELECT label, review_label, retake, abstained, COUNT(*) FROM results {where} "
            "GROUP BY label, review_label, retake, abstained", params).fetchall()
        return [(r[0], r[1], bool(r[2]), bool(r[3]), int(r[4])) for r in rows]

    def review_queue(self, *, low_confidence: float, limit: int = 50, offset: int = 0) -> list[StoredResult]:
        """Unreviewed results, those that most need a person first: abstained, then retakes, then
        confidence below ``low_confidence``, then the rest; newest first within each."""
        rows = self._connection().execute(
            "SELECT * FROM results WHERE review_label IS NULL ORDER BY "
            "CASE WHEN abstained = 1 AND retake = 0 THEN 0 WHEN retake = 1 THEN 1 WHEN confidence < ? THEN 2 "
            "ELSE 3 END, created_at DESC, id LIMIT ? OFFSET ?",
            (float(low_confidence), int(limit), int(offset))).fetchall()
        return [_decode(r) for r in rows]

    # -- reads -------------------------------------------------------------
    def get(self, result_id: str) -> StoredResult:
        check_result_id(result_id)
        row = self._connection().execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
        if row is None:
            raise ResultNotFoundError(f"no result with id {result_id!r}")
        return _decode(row)

    def page(self, *, label: str | None = None, review: str | None = None, limit: int = 50,
             offset: int = 0) -> list[StoredResult]:
        """Newest first; ``label="retake"`` selects captures refused for their quality,
        ``label="abstained"`` the abstentions (a retake may be one too), any other label the results
        GIVEN that label (abstentions and retakes whose top class it is are not). ``review`` is one of
        :data:`REVIEW_FILTERS` (UsageError otherwise)."""
        where, params = _filters(label, review)
        rows = self._connection().execute(
            f"SELECT * FROM results {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            (*params, int(limit), int(offset)),
        ).fetchall()
        return [_decode(r) for r in rows]

    def iter_all(self, *, label: str | None = None, review: str | None = None,
                 batch: int = 500) -> Iterator[StoredResult]:
        offset = 0
        while True:
            page = self.page(label=label, review=review, limit=batch, offset=offset)
            yield from page
            if len(page) < batch:
                return
            offset += batch

    def count(self, *, label: str | None = None, review: str | None = None) -> int:
        where, params = _filters(label, review)
        return int(self._connection().execute(f"SELECT COUNT(*) FROM results {where}", params).fetchone()[0])

    def labels(self) -> list[str]:
        rows = self._connection().execute("SELECT DISTINCT label FROM results ORDER BY label").fetchall()
        return [r[0] for r in rows]

    # -- start-up consistency ------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Make files and rows agree after a crash; returns what was removed."""
        removed = {"tmp_files": 0, "orphan_files": 0, "rows_missing_files": 0}
        for tmp in self.images_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            removed["tmp_files"] += 1
        rows = [_decode(r) for r in self._connection().execute("SELECT * FROM results").fetchall()]
        expected: set[str] = set()
        broken: list[StoredResult] = []
        for row in rows:
            paths = self.files_of(row)
            if all(p.is_file() for p in paths.values()):
                expected.update(p.name for p in paths.values())
            else:
                broken.append(row)
        if broken:
            with self._db() as db:
                db.executemany("DELETE FROM results WHERE id = ?", [(r.id,) for r in broken])
            removed["rows_missing_files"] = len(broken)
        for path in self.images_dir.iterdir():
            if path.is_file() and path.name not in expected:
                path.unlink(missing_ok=True)
                removed["orphan_files"] += 1
        if any(removed.values()):
            log.warning("storage recovery in %s: %s", self.data_dir, removed)
            fsync_dir(self.images_dir)
        return removed


#: History's review filter: value -> SQL condition. "disagreed": the reviewer gave another class than the
#: model's top class ("unusable" excluded: it says the capture is bad, not that the model was wrong).
REVIEW_FILTERS = {
    "reviewed": "review_label IS NOT NULL",
    "unreviewed": "review_label IS NULL",
    "disagreed": f"review_label IS NOT NULL AND review_label != '{REVIEW_UNUSABLE}' AND review_label != label",
}


def _filters(label: str | None, review: str | None) -> tuple[str, tuple]:
    where, params = _label_filter(label)
    if not review:
        return where, params
    if review not in REVIEW_FILTERS:
        raise UsageError(f"unknown review filter {review[:20]!r}; use one of {sorted(REVIEW_FILTERS)}")
    condition = REVIEW_FILTERS[review]
    return (f"{where} AND {condition}" if where else f"WHERE {condition}"), params


def _label_filter(label: str | None) -> tuple[str, tuple]:
    if not label:
        return "", ()
    if label == "retake":
        return "WHERE retake = 1", ()
    if label == "abstained":
        return "WHERE abstained = 1", ()
    return "WHERE label = ? AND abstained = 0 AND retake = 0", (label,)


def _decode(row: sqlite3.Row) -> StoredResult:
    data = dict(row)
    data["abstained"] = bool(data["abstained"])
    data["has_heatmap"] = bool(data["has_heatmap"])
    data["probabilities"] = json.loads(data["probabilities"])
    data["timings"] = json.loads(data["timings"])
    data["tiles"] = tuple(json.loads(data["tiles"])) if data.get("tiles") else ()
    data["quality"] = json.loads(data["quality"]) if data.get("quality") else None
    data["retake"] = bool(data.get("retake") or 0)
    return StoredResult(**data)


def csv_safe(value: object) -> object:
    """Defuse spreadsheet formulas in exported text (a file named '=HYPERLINK(...)')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_rows(results: Iterable[StoredResult], classes: list[str]) -> Iterator[list]:
    """Header then one row per result, probability columns in ``classes`` order.

    ``reviewed_at`` is written as UTC ISO time, like ``created``; empty review columns: not reviewed;
    an empty ``bundle_sha256``: not recorded (a result migrated from schema 2).
    """
    yield ["id", "created", "source", "filename", "label", "predicted", "confidence", "abstained", "ood_score",
           "latency_ms", "model_name", "model_version", "bundle_sha256", "retake", "quality_reasons", "um_per_px", "scale_source",
           "tiles_used", "tiles", "sample_id", "review_label", "review_note", "reviewed_at",
           *[f"p_{c}" for c in classes]]
    for r in results:
        d = r.to_dict()
        reasons = ";".join(str(x) for x in (r.quality or {}).get("reasons") or ())
        yield [csv_safe(v) for v in (
            r.id, d["created"], r.source, r.filename, r.given_label or "", r.label, f"{r.confidence:.6f}",
            int(r.abstained),
            "" if r.ood_score is None else f"{r.ood_score:.6f}", f"{r.latency_ms:.3f}",
            r.model_name, r.model_version, r.bundle_sha256 or "", int(r.retake), reasons,
            "" if r.um_per_px is None else f"{r.um_per_px:.6g}", r.scale_source or "",
            sum(1 for t in r.tiles if t.get("used")), len(r.tiles),
            r.sample_id or "", r.review_label or "", r.review_note or "", iso_time(r.reviewed_at) or "",
            *[f"{r.probabilities.get(c, 0.0):.6f}" for c in classes])]
