"""The SQLite inbox: durability, duplicates, claiming and recovery after a crash."""

from __future__ import annotations

import time

import pytest

from plugin.inbox import DONE, FAILED, PENDING, PROCESSING, Event, Inbox


def event(label_id: str, asset_id: str = "a1", received_at: float | None = None) -> Event:
    return Event(label_id=label_id, asset_id=asset_id, project_id="p1", event_type="onSubmit",
                 label={"id": label_id, "jsonResponse": {"JOB": {"categories": [{"name": "A"}]}}},
                 received_at=received_at if received_at is not None else time.time(), run_id="r1")


def test_event_survives_reopen(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1"))
    inbox.close()

    reopened = Inbox(tmp_path / "inbox.sqlite")
    claimed = reopened.claim_batch(10)

    assert [item.label_id for item in claimed] == ["l1"]
    assert claimed[0].label == {"id": "l1", "jsonResponse": {"JOB": {"categories": [{"name": "A"}]}}}
    assert claimed[0].run_id == "r1"
    assert claimed[0].attempts == 1


def test_duplicate_label_stored_once(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")

    first = inbox.add(event("l1"))
    again = inbox.add(event("l1"))

    assert first is True
    assert again is False
    assert inbox.counts()[PENDING] == 1


def test_finished_label_never_processed_again(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1"))
    inbox.finish([item.label_id for item in inbox.claim_batch(10)], DONE, outcome="flagged")

    stored_again = inbox.add(event("l1"))
    recovered = inbox.recover()

    assert stored_again is False
    assert recovered == 0
    assert inbox.claim_batch(10) == []
    assert inbox.get("l1")["outcome"] == "flagged"


def test_claim_takes_oldest_first(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    for index in range(5):
        inbox.add(event(f"l{index}", received_at=1000.0 - index))

    first = inbox.claim_batch(2)
    second = inbox.claim_batch(10)

    assert [item.label_id for item in first] == ["l4", "l3"]
    assert [item.label_id for item in second] == ["l2", "l1", "l0"]
    assert inbox.counts()[PROCESSING] == 5
    assert inbox.depth() == 5


def test_crash_recovery_requeues_processing(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1"))
    inbox.add(event("l2"))
    inbox.claim_batch(1)
    inbox.close()  # the process stops before finishing the batch

    restarted = Inbox(tmp_path / "inbox.sqlite")
    recovered = restarted.recover()
    claimed = restarted.claim_batch(10)

    assert recovered == 1
    assert sorted(item.label_id for item in claimed) == ["l1", "l2"]
    assert {item.label_id: item.attempts for item in claimed}["l1"] == 2


def test_release_does_not_count_attempt(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1"))

    inbox.release([item.label_id for item in inbox.claim_batch(10)])

    assert inbox.get("l1")["status"] == PENDING
    assert inbox.get("l1")["attempts"] == 0


def test_finish_rejects_non_final_status(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")

    with pytest.raises(ValueError, match="final status"):
        inbox.finish(["l1"], PENDING)


def test_failed_event_keeps_error(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1"))
    inbox.claim_batch(10)

    inbox.finish(["l1"], FAILED, outcome="failed", error="download from host failed with HTTP 404")

    assert inbox.get("l1")["error"] == "download from host failed with HTTP 404"
    assert inbox.get("l1")["finished_at"] is not None
    assert inbox.depth() == 0


def test_claim_skips_assets_being_written(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.add(event("l1", asset_id="a1", received_at=1.0))
    inbox.add(event("l2", asset_id="a2", received_at=2.0))
    inbox.add(event("l3", asset_id="a1", received_at=3.0))

    claimed = inbox.claim_batch(10, exclude_asset_ids={"a1"})
    later = inbox.claim_batch(10)

    assert [item.label_id for item in claimed] == ["l2"]
    assert [item.label_id for item in later] == ["l1", "l3"]
