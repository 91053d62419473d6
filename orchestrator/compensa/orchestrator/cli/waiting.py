"""`compensa start --wait` while nothing happens: after a few quiet seconds,
one line on stderr saying what the saga waits for, again whenever that changes."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import grpc

from compensa.orchestrator.shared import timeline
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc

_Item = TypeVar("_Item")

#: Quiet for this long (no event), the saga's wait is described.
QUIET_SECONDS = 3.0
# How often a quiet saga is looked at again.
_LOOK_SECONDS = 1.0


class WaitReporter:
    """Tells on stderr what a followed saga waits for while its events stop.

    Use as a context manager around the loop over the saga's events, passing
    them through `passing`."""

    def __init__(self, stub: orchestrator_pb2_grpc.OrchestratorServiceStub, saga_id: str, timeout: float) -> None:
        self._stub = stub
        self._saga_id = saga_id
        self._timeout = timeout
        self._last_event = time.monotonic()
        self._said = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compensa-wait-reporter", daemon=True)

    def __enter__(self) -> WaitReporter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def passing(self, events: Iterable[_Item]) -> Iterator[_Item]:
        """`events`, noting when each arrives."""
        for event in events:
            self._last_event = time.monotonic()
            yield event

    def _run(self) -> None:
        while not self._done.wait(_LOOK_SECONDS):
            if time.monotonic() - self._last_event < QUIET_SECONDS:
                continue
            try:
                saga = self._stub.GetSaga(
                    orchestrator_pb2.GetSagaRequest(saga_id=self._saga_id), timeout=self._timeout
                ).saga
            except grpc.RpcError:
                continue  # the stream being followed reports a lost server
            line = timeline.describe_wait(saga, time.time())
            # The countdown changes every look: only a change of what it waits for is told.
            what = line.split(", next attempt in ")[0]
            if line and what != self._said and not self._done.is_set():
                self._said = what
                print(line, file=sys.stderr, flush=True)
