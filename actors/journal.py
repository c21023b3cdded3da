"""The scheduler's journal: every accepted job and each of its transitions, in one SQLite file.

A scheduler that is killed loses nothing it accepted: ``Submit`` is answered only once the job
(and its input images) is written, and each change of state after it is written before the
message that makes it known leaves. A restarted scheduler reads back the jobs that had not
ended and queues them again in the order they were submitted (a job that was running runs
again: generation is seeded, so it makes the same images), and still answers for the jobs that
had ended, with their artifacts.

SQLite, because it is one file and no server, and its WAL mode makes a write an append that
survives the process dying at any moment (``synchronous = NORMAL``: a power cut may lose the
last transactions, a killed process never does). The file is locked for one scheduler:
a second one pointed at it is refused at start rather than interleaving with the first.
Idempotency keys live here too, so a client's retried submit finds its job even once the
scheduler has forgotten it from memory; and a job id is never given out twice, whatever the
scheduler remembers (``add`` refuses one the journal has).

A restart always comes up, whatever the file holds: a row this version can no longer read is
moved to the ``quarantine`` table with the reason, for a person to look at; one whose inputs no
longer validate comes back marked ``unusable``, and the scheduler fails it with the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from atelier.jobs import Artifact, JobInputs, JobRecord, LoraInfo

log = logging.getLogger("atelier.journal")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    idempotency_key TEXT,
    client TEXT NOT NULL,          -- the frontend that submitted it: where its result goes
    state TEXT NOT NULL,
    record TEXT NOT NULL,          -- the JobRecord as JSON
    submitted_at REAL NOT NULL,
    finished_at REAL,
    outputs TEXT                   -- a done job's artifacts as JSON, less their bytes (those are in the store)
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (user, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS quarantine (      -- rows a restart could no longer read, kept for a person to look at
    id TEXT NOT NULL,
    user TEXT,
    record TEXT,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loras (           -- the LoRAs users trained (their files are in the artifact store)
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    info TEXT NOT NULL,            -- the LoraInfo as JSON
    uri TEXT NOT NULL,             -- its diffusers-format file
    kohya_uri TEXT,                -- the same LoRA in the kohya format
    PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS settings (        -- what an operator set that a restart must keep (as JSON)
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
_INPUT_NAMES = ("image", "mask", "control_image", "ip_adapter_image")


class JournalError(Exception):
    """The journal cannot be opened: locked by another scheduler, unreadable, or of a newer version."""


class DuplicateJob(Exception):
    """A job of this id is in the journal already (ended long ago, perhaps): ids are never reused."""


@dataclass
class Restored:
    """A job as the journal kept it."""

    record: JobRecord
    client: str
    idempotency_key: str | None
    inputs: JobInputs | None
    # Why its inputs could not be read back (e.g. above a limit tightened since): it cannot run again.
    unusable: str | None = None


class Journal:
    def __init__(self, path: Path | str):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are begun and ended here, explicitly.
            # check_same_thread off: a submit with large inputs is written from a worker thread, its
            # transaction serialised with the others by _lock.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5, check_same_thread=False)
            # The write lock, once taken, is held until the process ends (or dies: the OS drops it),
            # so a second scheduler on the same file fails here rather than each requeueing the
            # other's jobs.
            self.db.execute("PRAGMA locking_mode = EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("BEGIN IMMEDIATE")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self.db.execute("ROLLBACK")
                raise JournalError(f"journal {self.path} is of a newer atelier (schema {version}); "
                                   "upgrade atelier or point [scheduler] journal elsewhere")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise JournalError(f"journal {self.path} is in use by another scheduler") from None
            raise JournalError(f"journal {self.path} cannot be opened: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {self.path} is not a journal (or is damaged): {exc}") from None
        # What was last written of each job that has not ended: a transition rewrites the row, a
        # position or ETA update (many a second) does not.
        self._written: dict[str, tuple] = {}
        self._lock = threading.Lock()  # one transaction at a time, whichever thread begins it

    def close(self) -> None:
        self.db.close()

    # -- writes ------------------------------------------------------------------ #

    def add(self, record: JobRecord, client: str, idempotency_key: str | None, inputs: JobInputs | None) -> None:
        """A newly accepted job, with its input images, in one transaction."""
        spec = record.spec
        try:
            self._insert(record, client, idempotency_key, inputs)
        except sqlite3.IntegrityError as exc:
            if "jobs.id" not in str(exc):
                raise
            raise DuplicateJob(f"a job with id {spec.id!r} exists already") from None
        self._written[spec.id] = _mark(record)

    def _insert(self, record: JobRecord, client: str, idempotency_key: str | None, inputs: JobInputs | None) -> None:
        spec = record.spec
        with self._transaction():
            # A plain INSERT: an id that exists is refused, never merged into the older job's row.
            self.db.execute(
                "INSERT INTO jobs (id, user, idempotency_key, client, state, record, submitted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (spec.id, spec.user, idempotency_key, client, record.state.value, record.model_dump_json(),
                 record.submitted_at))
            for name, data in inputs.files() if inputs is not None else ():
                self.db.execute("INSERT OR REPLACE INTO inputs (job_id, name, data) VALUES (?, ?, ?)",
                                (spec.id, name, bytes(data)))

    def update(self, records: Iterable[JobRecord], outputs: Mapping[str, Sequence[Artifact]] | None = None) -> int:
        """Writes the jobs whose state changed since last written; returns how many. ``outputs``: a done
        job's artifacts, whose description (not bytes) is kept to give its result again. An ended
        job's input images go: no attempt comes after an end."""
        changed = [r for r in records if self._written.get(r.spec.id) != _mark(r)]
        if not changed:
            return 0
        outputs = outputs or {}
        with self._transaction():
            for record in changed:
                described = outputs.get(record.spec.id)
                if described is not None:
                    described = json.dumps([a.model_dump(mode="json", exclude={"data"}) for a in described])
                self.db.execute("UPDATE jobs SET state = ?, record = ?, finished_at = ?, outputs = ? WHERE id = ?",
                                (record.state.value, record.model_dump_json(), record.finished_at, described,
                                 record.spec.id))
                if record.state.terminal:
                    self.db.execute("DELETE FROM inputs WHERE job_id = ?", (record.spec.id,))
        for record in changed:
            if record.state.terminal:
                self._written.pop(record.spec.id, None)
            else:
                self._written[record.spec.id] = _mark(record)
        return len(changed)

    def prune(self, before: float) -> int:
        """Forgets jobs that ended before ``before`` (seconds since the epoch); returns how many."""
        with self._transaction():
            cursor = self.db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (before,))
        return cursor.rowcount

    def artifacts_before(self, before: float) -> list[str]:
        """The artifact URIs of the jobs ``prune(before)`` forgets: their files go with them."""
        rows = self.db.execute("SELECT outputs FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
                               " AND outputs IS NOT NULL", (before,)).fetchall()
        uris = []
        for (outputs,) in rows:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                uris += [meta["uri"] for meta in json.loads(outputs) if meta.get("uri")]
        return uris

    # -- trained LoRAs ------------------------------------------------------------- #

    def put_lora(self, lora: LoraInfo, uri: str, kohya_uri: str | None) -> list[str]:
        """Records a trained LoRA (replacing its owner's of that name); returns the replaced one's file URIs."""
        with self._transaction():
            old = self.db.execute("SELECT uri, kohya_uri FROM loras WHERE owner = ? AND name = ?",
                                  (lora.owner, lora.name)).fetchone()
            self.db.execute("INSERT OR REPLACE INTO loras (owner, name, info, uri, kohya_uri) VALUES (?, ?, ?, ?, ?)",
                            (lora.owner, lora.name, lora.model_dump_json(), uri, kohya_uri))
        return [u for u in old or () if u]

    def share_lora(self, lora: LoraInfo) -> None:
        with self._transaction():
            self.db.execute("UPDATE loras SET info = ? WHERE owner = ? AND name = ?",
                            (lora.model_dump_json(), lora.owner, lora.name))

    def delete_lora(self, owner: str, name: str) -> list[str]:
        """Forgets a LoRA; returns its files' URIs, for the caller to delete from the store."""
        with self._transaction():
            row = self.db.execute("SELECT uri, kohya_uri FROM loras WHERE owner = ? AND name = ?",
                                  (owner, name)).fetchone()
            self.db.execute("DELETE FROM loras WHERE owner = ? AND name = ?", (owner, name))
        return [u for u in row or () if u]

    def loras(self) -> list[LoraInfo]:
        """Every trained LoRA; a row this version cannot read is left out with a log line."""
        found = []
        for owner, name, info in self.db.execute("SELECT owner, name, info FROM loras").fetchall():
            try:
                found.append(LoraInfo.model_validate_json(info))
            except ValidationError as exc:
                log.warning("journal: LoRA %s of %s cannot be read (%s); left out", name, owner, exc)
        return found

    def lora_uri(self, owner: str, name: str, *, kohya: bool = False) -> str | None:
        row = self.db.execute(f"SELECT {'kohya_uri' if kohya else 'uri'} FROM loras WHERE owner = ? AND name = ?",
                              (owner, name)).fetchone()
        return row[0] if row else None

    def quarantine(self, job_id: str, reason: str) -> None:
        """Moves a row that can no longer be read out of the way: a restart must always come up."""
        log.warning("journal: job %s cannot be restored (%s); moved to the quarantine table", job_id, reason)
        with self._transaction():
            self.db.execute("INSERT INTO quarantine (id, user, record, reason, quarantined_at)"
                            " SELECT id, user, record, ?, ? FROM jobs WHERE id = ?", (reason, time.time(), job_id))
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._written.pop(job_id, None)

    def put_setting(self, name: str, value: object) -> None:
        """Keeps ``value`` (JSON data) under ``name``, replacing what was there."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    # -- reads ------------------------------------------------------------------- #

    def setting(self, name: str) -> object | None:
        """What ``put_setting`` kept under ``name``; None if nothing (or nothing readable) is."""
        row = self.db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            log.warning("journal: setting %s does not parse; ignored", name)
            return None

    def unfinished(self) -> list[Restored]:
        """Jobs that had not ended, in the order they were submitted (see ``each_unfinished``)."""
        return list(self.each_unfinished())

    def each_unfinished(self) -> Iterator[Restored]:
        """Jobs that had not ended, in the order they were submitted, one at a time: their inputs are
        read as each is taken, not all at once. A row that no longer parses is quarantined; one whose
        inputs no longer validate comes back ``unusable``, to be failed."""
        rows = self.db.execute("SELECT record, client, idempotency_key, id FROM jobs WHERE finished_at IS NULL"
                               " ORDER BY rowid").fetchall()
        for record, client, key, job_id in rows:
            parsed = self._parse(job_id, record)
            if parsed is None:
                continue
            inputs, unusable = None, None
            stored = dict(self.db.execute("SELECT name, data FROM inputs WHERE job_id = ?", (job_id,)).fetchall())
            try:
                inputs = JobInputs(**stored) if stored else None
            except ValidationError as exc:
                unusable = f"its input images are no longer accepted: {_first_error(exc)}"
            self._written[job_id] = _mark(parsed)
            yield Restored(parsed, client, key, inputs, unusable)

    def finished(self, limit: int) -> list[Restored]:
        """The ``limit`` jobs that ended last, oldest first (unreadable rows quarantined)."""
        rows = self.db.execute("SELECT record, client, idempotency_key, id FROM jobs WHERE finished_at IS NOT NULL"
                               " ORDER BY finished_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        parsed = [(self._parse(job_id, r), c, k) for r, c, k, job_id in reversed(rows)]
        return [Restored(record, c, k, None) for record, c, k in parsed if record is not None]

    def _parse(self, job_id: str, record: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate_json(record)
        except ValidationError as exc:
            self.quarantine(job_id, f"its record no longer parses: {_first_error(exc)}")
            return None

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not row:
            return None
        try:
            return JobRecord.model_validate_json(row[0])
        except ValidationError:  # quarantined at the next restart; until then, as if gone
            return None

    def inputs(self, job_id: str) -> JobInputs | None:
        """A job's input images, read when it is dispatched: they are not held in memory till then."""
        stored = dict(self.db.execute("SELECT name, data FROM inputs WHERE job_id = ?", (job_id,)).fetchall())
        return JobInputs.from_files(stored) if stored else None

    def submitter(self, job_id: str) -> tuple[str, str] | None:
        """(user, client) of a journaled job: a retry is the same user's, from the same frontend."""
        row = self.db.execute("SELECT user, client FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def outputs(self, job_id: str) -> list[dict]:
        """A done job's artifacts as ``update`` described them (each an Artifact's fields but ``data``)."""
        row = self.db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else []

    def by_key(self, user: str, idempotency_key: str) -> JobRecord | None:
        row = self.db.execute("SELECT record FROM jobs WHERE user = ? AND idempotency_key = ?",
                              (user, idempotency_key)).fetchone()
        return JobRecord.model_validate_json(row[0]) if row else None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self.db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _mark(record: JobRecord) -> tuple:
    """What makes a record worth writing again: its transitions, not its position or ETA."""
    return (record.state, record.attempts, record.runner, record.batch_id, record.reason, len(record.artifacts),
            record.checkpoint, record.spec.priority)  # an operator may change a queued job's priority

