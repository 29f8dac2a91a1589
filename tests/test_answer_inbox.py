"""Answer inboxes without Ray or AWS: which answers an inbox takes, forwards or leaves, and waits that end."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.queue_mode.answer_inbox import AnswerInbox, Route, Waiting


def _answer(correlation_id: str | None, body: str, reply_to: str | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if correlation_id is not None:
        attributes["key"] = {"DataType": "String", "StringValue": correlation_id}
    if reply_to is not None:
        attributes["reply-to"] = {"DataType": "String", "StringValue": reply_to}
    return {"MessageId": "m", "ReceiptHandle": "r", "Body": body, "MessageAttributes": attributes}


def test_answers_go_to_their_waiter_to_the_inbox_they_name_or_stay_for_others() -> None:
    async def scenario() -> None:
        here = Waiting("inbox-a")
        mine = here.register("c1", "test_001")
        assert here.route(_answer("c1", "('test_001', 'Paul')", "inbox-a")) == (Route.DONE, None)
        assert mine.result() == "('test_001', 'Paul')"
        # Another replica's answer: handed straight to its inbox.
        assert here.route(_answer("c2", "('test_002', 'Ann')", "inbox-b")) == (Route.FORWARD, "inbox-b")
        # No inbox named and nobody here waits for it: another web tier's, left on the queue.
        assert here.route(_answer("c3", "('test_003', 'Bo')")) == (Route.LEAVE, None)
        # Junk nobody can ever claim is dropped.
        assert here.route(_answer(None, "('x', 'y')")) == (Route.DONE, None)
        assert here.route(_answer("c4", "not an answer", "inbox-a")) == (Route.DONE, None)

    asyncio.run(scenario())


def test_an_answer_that_comes_before_its_wait_is_kept_for_it_and_a_late_one_is_dropped() -> None:
    async def scenario() -> None:
        here = Waiting("inbox-a")
        assert here.accept("early", "('test_001', 'Paul')")  # read (or handed over) before the wait began
        assert here.register("early", "test_001").result() == "('test_001', 'Paul')"
        here.release("early", answered=True)
        gave_up = here.register("late", "test_002")
        here.release("late", answered=gave_up.done())  # it timed out: no answer came
        assert here.accept("late", "('test_002', 'Ann')")  # taken care of: dropped, not kept
        assert not here.has_waiters
        assert here.route(_answer("late", "('test_002', 'Ann')")) == (Route.DONE, None)

    asyncio.run(scenario())


def test_a_waiter_whose_answer_names_another_stem_keeps_waiting() -> None:
    async def scenario() -> None:
        here = Waiting("inbox-a")
        waiter = here.register("c1", "test_001")
        assert here.route(_answer("c1", "('other', 'Paul')", "inbox-a")) == (Route.DONE, None)
        assert not waiter.done()

    asyncio.run(scenario())


class _QuietQueue:
    """An SQS stand-in whose long polls find nothing."""

    def receive_message(self, **_: Any) -> dict[str, Any]:
        import time

        time.sleep(0.05)
        return {}


def _inbox() -> AnswerInbox:
    inbox = object.__new__(AnswerInbox)
    inbox._sqs = _QuietQueue()
    inbox._queue_url = "queue"
    inbox._waiting = Waiting("inbox-a")
    inbox._inboxes = {}
    inbox._reader = None
    inbox.counts = {"read": 0, "forwarded": 0, "delivered_by_others": 0, "delete_failed": 0}
    return inbox


def test_a_wait_whose_caller_goes_away_is_released_and_reading_stops() -> None:
    """A client that disconnects cancels its wait: nothing of it stays registered, and the reader stops."""

    async def scenario() -> None:
        inbox = _inbox()
        waiting = asyncio.create_task(inbox.wait("c1", 300.0, "test_001"))
        await asyncio.sleep(0.1)
        assert inbox._waiting.has_waiters and inbox._reader is not None
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert not inbox._waiting.has_waiters
        await asyncio.wait_for(inbox._reader, 5)  # it reads only while someone waits
        # Its answer, if it comes now, is dropped rather than kept.
        assert inbox._waiting.route(_answer("c1", "('test_001', 'Paul')")) == (Route.DONE, None)
        assert "c1" not in inbox._waiting._early

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_wait_ends_at_its_deadline() -> None:
    async def scenario() -> None:
        inbox = _inbox()
        assert await inbox.wait("c1", 0.2, "test_001") is None
        assert not inbox._waiting.has_waiters

    asyncio.run(asyncio.wait_for(scenario(), 30))


class _QueueWhoseFirstDeleteFails:
    """Hands out one answer; the first delete of it fails, so it comes back once."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer, self.deletes, self.received = answer, 0, 0

    def receive_message(self, **_: Any) -> dict[str, Any]:
        import time

        time.sleep(0.02)
        if self.received < 2:
            self.received += 1
            return {"Messages": [self.answer]}
        return {}

    def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.deletes += 1
        if self.deletes == 1:
            return {"Failed": [{"Id": "0", "Code": "InternalError"}], "Successful": []}
        return {"Successful": [{"Id": e["Id"]} for e in kwargs["Entries"]], "Failed": []}

    def change_message_visibility_batch(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("an answer of an ended wait must be deleted, not left")


def test_an_answer_whose_delete_failed_is_counted_and_deleted_when_it_comes_back() -> None:
    """Legacy answers carry no inbox name: once handed over, a copy that comes back is still known (and deleted)."""

    async def scenario() -> None:
        inbox = _inbox()
        queue = _QueueWhoseFirstDeleteFails(_answer("c1", "('test_001', 'Paul')"))
        inbox._sqs = queue
        assert await inbox.wait("c1", 30.0, "test_001") == "('test_001', 'Paul')"
        keeper = asyncio.create_task(inbox.wait("other", 1.0))  # keeps the reader reading for a moment
        await asyncio.wait_for(keeper, 5)
        assert queue.received == 2 and queue.deletes == 2
        assert inbox.counts["delete_failed"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 30))
