"""The bench saga as a Temporal workflow (its own module: Temporal's sandbox
re-imports the module that defines a workflow, so it holds nothing else).

Three activities, one after the other, named "execute_step" and defined by
peer_temporal.py: each is one Execute call to the no-op participant.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

#: The activity's name, registered by peer_temporal.py.
EXECUTE_STEP = "execute_step"
# The bench definition's policy: 30 s per call, 3 attempts from 100 ms backoff.
_CALL_TIMEOUT = timedelta(seconds=30)
_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), backoff_coefficient=2,
                     maximum_interval=timedelta(seconds=1), maximum_attempts=3)


@workflow.defn(name="BenchSaga")
class BenchSaga:
    """Runs `steps` in order, each as one activity."""

    @workflow.run
    async def run(self, saga_id: str, steps: list[str]) -> None:
        for step in steps:
            await workflow.execute_activity(
                EXECUTE_STEP, args=[saga_id, step], start_to_close_timeout=_CALL_TIMEOUT, retry_policy=_RETRY,
            )
