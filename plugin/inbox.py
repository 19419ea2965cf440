"""The durable event inbox: one SQLite row per label, written before the webhook responds.

Each event is keyed by its label id, so a label that Kili sends twice is
stored and processed once. Status moves ``pending`` -> ``processing`` ->
``done`` | ``failed`` | ``skipped``. ``claim_batch`` moves pending rows to
processing in one transaction. Rows still ``processing`` when the service
starts belong to a process that stopped mid-batch, so ``recover`` puts them
back to ``pending``. A label whose row is done, failed or skipped is never
processed again.

The database runs in WAL mode with ``synchronous=FULL``, so an event that
``add`` accepted survives a crash of the process or the machine.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

PENDING, PROCESSING, DONE, FAILED, SKIPPED = "pending", "processing", "done", "failed", "skipped"
FINAL_STATUSES = (DONE, FAILED, SKIPPED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    label_id     TEXT PRIMARY KEY,
    asset_id     TEXT NOT NULL,
    project_id   TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    run_id       TEXT,
    label_json   TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    outcome      TEXT,
    received_at  REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS events_status ON events (status, received_at);
"""


@dataclass(frozen=True)
class Event:
    """One stored webhook call: a submitted or reviewed label of an asset."""

    label_id: str
    asset_id: str
    project_id: str
    event_type: str
    label: dict
    received_at: float  # time.time() when the webhook call was stored
    run_id: str | None = None
    attempts: int = 0


class Inbox:
    """SQLite-backed queue of webhook events, safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, event: Event) -> bool:
        """Store an event durably; return False when its label id is already stored."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO events (label_id, asset_id, project_id, event_type, run_id, label_json,"
                " status, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event.label_id, event.asset_id, event.project_id, event.event_type, event.run_id,
                 json.dumps(event.label), PENDING, event.received_at, now),
            )
            return cursor.rowcount == 1

    def recover(self) -> int:
        """Put events left ``processing`` by a stopped process back to ``pending``; return how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE events SET status = ?, updated_at = ? WHERE status = ?", (PENDING, time.time(), PROCESSING)
            )
            return cursor.rowcount

    def claim_batch(self, max_events: int, exclude_asset_ids: Collection[str] = ()) -> list[Event]:
        """Move up to ``max_events`` of the oldest pending events to ``processing`` and return them.

        Events of ``exclude_asset_ids`` (assets that a running batch is writing) stay pending.
        """
        excluded = list(exclude_asset_ids)
        placeholders = ", ".join("?" * len(excluded))
        condition = f" AND asset_id NOT IN ({placeholders})" if excluded else ""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT label_id, asset_id, project_id, event_type, label_json, received_at, run_id, attempts"
                    f" FROM events WHERE status = ?{condition} ORDER BY received_at, label_id LIMIT ?",
                    (PENDING, *excluded, max_events),
                ).fetchall()
                now = time.time()
                self._db.executemany(
                    "UPDATE events SET status = ?, attempts = attempts + 1, updated_at = ? WHERE label_id = ?",
                    [(PROCESSING, now, row[0]) for row in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [
            Event(label_id=row[0], asset_id=row[1], project_id=row[2], event_type=row[3], label=json.loads(row[4]),
                  received_at=row[5], run_id=row[6], attempts=row[7] + 1)
            for row in rows
        ]

    def finish(self, label_ids: Sequence[str], status: str, *, outcome: str | None = None, error: str | None = None) -> None:
        """Record the final status of processed events."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"final status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        now = time.time()
        with self._lock:
            self._db.executemany(
                "UPDATE events SET status = ?, outcome = ?, error = ?, updated_at = ?, finished_at = ? WHERE label_id = ?",
                [(status, outcome, error, now, now, label_id) for label_id in label_ids],
            )

    def release(self, label_ids: Sequence[str]) -> None:
        """Put claimed events back to ``pending`` without counting the attempt (no model version yet)."""
        with self._lock:
            self._db.executemany(
                "UPDATE events SET status = ?, attempts = attempts - 1, updated_at = ? WHERE label_id = ?",
                [(PENDING, time.time(), label_id) for label_id in label_ids],
            )

    def counts(self) -> dict[str, int]:
        """Return the number of events per status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall()
        counts = {status: 0 for status in (PENDING, PROCESSING, *FINAL_STATUSES)}
        counts.update({status: count for status, count in rows})
        return counts

    def count_received_since(self, since: float | None, event_type: str = "onSubmit") -> int:
        """Return how many distinct labels of ``event_type`` arrived at or after ``since`` (a Unix time)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM events WHERE event_type = ? AND received_at >= ?",
                (event_type, since if since is not None else 0.0),
            ).fetchone()
        return int(row[0])

    def depth(self) -> int:
        """Return the number of events not yet finished (pending or processing)."""
        counts = self.counts()
        return counts[PENDING] + counts[PROCESSING]

    def get(self, label_id: str) -> dict | None:
        """Return one event's row as a dict (for inspection and tests), or None."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM events WHERE label_id = ?", (label_id,))
            row = cursor.fetchone()
            names = [column[0] for column in cursor.description]
        return dict(zip(names, row)) if row else None
