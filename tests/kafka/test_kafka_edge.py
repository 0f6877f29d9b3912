"""The Kafka edge's pure parts: backoff, supervision of background tasks, error classes."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from sidecar.errors import SidecarError
from sidecar.kafka import (
    BackgroundTaskFailed,
    Backoff,
    ProduceRefused,
    Supervisor,
    TaskFailure,
    is_permanent,
    refusal,
)


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.step() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.attempts == 5
    backoff.reset()
    assert backoff.delay == 0.5 and backoff.attempts == 0
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


async def test_backoff_wait_ends_early_when_asked_to_stop() -> None:
    stop = asyncio.Event()
    backoff = Backoff(5.0, 5.0)
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = asyncio.get_running_loop().time()
    assert await backoff.wait(stop) is False
    assert asyncio.get_running_loop().time() - started < 1.0
    assert await Backoff(0.01, 0.01).wait(asyncio.Event()) is True


async def test_a_task_that_dies_is_reported_once_with_its_cause() -> None:
    seen: list[TaskFailure] = []
    supervisor = Supervisor("test", seen.append)

    async def forever() -> None:
        await asyncio.Event().wait()

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    async def returns() -> None:
        await asyncio.sleep(0.02)

    supervisor.spawn(forever(), "forever")
    supervisor.spawn(broken(), "broken")
    supervisor.spawn(returns(), "returns")
    await asyncio.sleep(0.1)
    assert [f.task for f in seen] == ["broken"]  # the first failure only reaches the owner
    assert supervisor.failure is not None and "RuntimeError: boom" in supervisor.failure.reason
    with pytest.raises(BackgroundTaskFailed, match="broken died: RuntimeError: boom") as err:
        supervisor.raise_failure()
    assert isinstance(err.value, SidecarError) and err.value.retriable
    await supervisor.stop()  # cancelling on purpose is no failure
    assert [f.task for f in seen] == ["broken"]


async def test_cancelling_some_tasks_on_purpose_is_no_failure() -> None:
    seen: list[TaskFailure] = []
    supervisor = Supervisor("test", seen.append)
    tasks = [supervisor.spawn(asyncio.Event().wait(), f"t{i}") for i in range(3)]
    await supervisor.cancel(tasks[:2])
    assert seen == [] and supervisor.failure is None
    tasks[2].cancel()  # cancelled by someone else: the task is gone, so that is a failure
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [f.reason for f in seen] == ["cancelled"]


async def test_a_finite_task_may_return_but_not_fail() -> None:
    seen: list[TaskFailure] = []
    supervisor = Supervisor("test", seen.append)

    async def restore(fail: bool) -> None:
        await asyncio.sleep(0.01)
        if fail:
            raise RuntimeError("store locked")

    supervisor.spawn(restore(False), "restore-0", finite=True)
    await asyncio.sleep(0.05)
    assert seen == [] and supervisor.failure is None
    supervisor.spawn(restore(True), "restore-1", finite=True)
    await asyncio.sleep(0.05)
    assert [f.task for f in seen] == ["restore-1"] and "store locked" in seen[0].reason
    await supervisor.stop()


async def test_our_own_error_is_raised_as_itself() -> None:
    supervisor = Supervisor("test", lambda _: None)

    async def refuses() -> None:
        raise ProduceRefused("broker refused: grant WRITE")

    supervisor.spawn(refuses(), "committer")
    await asyncio.sleep(0.01)
    with pytest.raises(ProduceRefused, match="grant WRITE"):
        supervisor.raise_failure()


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (MessageSizeTooLargeError(), True),
        (TopicAuthorizationFailedError(), True),
        (NotLeaderForPartitionError(), False),
        (KafkaTimeoutError(), False),
        (KafkaConnectionError(), False),
    ],
)
def test_which_produce_errors_retrying_cannot_fix(error: Exception, permanent: bool) -> None:
    assert is_permanent(error) is permanent


def test_refusals_say_what_to_change() -> None:
    size = refusal(MessageSizeTooLargeError(), "out", 3, 2_000_000)
    assert "max.message.bytes" in str(size) and "kafka.max_record_bytes" in str(size)
    assert "3 record(s), 2000000 bytes, to out" in str(size)
    acl = refusal(TopicAuthorizationFailedError(), "out", 1, 10)
    assert "grant this principal WRITE on topic out" in str(acl)
    assert not acl.retriable


async def test_a_topic_this_principal_may_not_create_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster with ACLs a service without Create gets TOPIC_AUTHORIZATION_FAILED (29):
    the error says to create the topic beforehand, not just "error 29"."""
    import aiokafka.admin

    from sidecar.errors import BrokerError
    from sidecar.kafka.topics import ensure_topics

    class Response:
        topic_errors = [("sidecar-outcomes.by-task", 29, None)]

    class Admin:
        def __init__(self, **_: object) -> None:
            pass

        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def list_topics(self) -> list[str]:
            return []

        async def create_topics(self, _topics: object) -> Response:
            return Response()

    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", Admin)
    with pytest.raises(BrokerError, match=r"may not create topics .* Create it beforehand"):
        await ensure_topics("unused:9092", ["sidecar-outcomes.by-task"], 3)


async def test_our_own_errors_are_logged_without_a_traceback_others_with_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SidecarError says what happened and what to do (e.g. each task's store on a full
    disk): its traceback would bury that line, so only a bug's error is logged with one."""
    import logging

    async def fail(error: BaseException) -> None:
        raise error

    for error, traced in (
        (SidecarError("the volume is full: free space"), False),
        (KeyError("x"), True),
    ):
        supervisor = Supervisor("test", lambda _: None)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="sidecar.kafka.supervise"):
            supervisor.spawn(fail(error), "restore-0", finite=True)
            await asyncio.sleep(0.02)
        (line,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert (line.exc_info is not None) is traced
        assert str(error).strip("'") in line.getMessage()
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
        assert bool(debug) is not traced  # ours: the traceback is still there, at debug level
        await supervisor.stop()
