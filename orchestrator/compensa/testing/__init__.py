"""Testing a participant of your own against a real orchestrator.

In the spirit of Temporal's `testing` module: `SagaTestEnvironment` starts an
orchestrator in your test's process on a temporary SQLite database, serves your
participant servicers on free ports, registers your definitions and gives you
a connected `SagaClient`. Nothing is mocked: your servicer answers real
Execute and Compensate calls through its barrier, and the saga is driven,
retried and compensated as in production.

    async with SagaTestEnvironment.start(
        definitions=[Path("definitions/billing.yaml")],
        participants={"billing": Billing},  # a class or factory taking an AsyncEngine
    ) as env:
        saga = await env.client.execute("billing", BillingInput(...))
        assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED

A participant given as a factory gets an engine on its own SQLite file in the
environment's temporary directory; one given as a servicer keeps its own
engine. Each participant is reachable under its name, the `participant` of
the definitions' steps. The message types the definitions name must be
imported in the test (their generated `_pb2` modules).

A definition change can also be checked against real past sagas, without any
server: save their histories (`compensa get ID --history > h.json`) and
replay them under the changed definition file in CI:

    assert_histories_replay(Path("histories").glob("*.json"), Path("definitions/billing.yaml"))

It fails naming each saga and the first event where the new definition would
have decided otherwise (`replay_saved_history` gives the same per file).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from compensa.orchestrator.api.history_checks import HistoryCheck, check_history, read_history_file
from compensa.orchestrator.client import SagaClient
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.definitions import load_definition_file
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.participants.sdk import Participant
from compensa.participants.serving import RunningParticipant, create_participant_engine, start_server
from compensa.v1 import definition_pb2, orchestrator_pb2, saga_pb2

__all__ = [
    "HistoryCheck", "ParticipantFactory", "SagaTestEnvironment", "assert_histories_replay", "replay_saved_history",
]

#: Makes a participant servicer on the engine it is given.
ParticipantFactory = Callable[[AsyncEngine], Participant]


@dataclass
class SagaTestEnvironment:
    """A running orchestrator and participants; see the module docstring."""

    orchestrator: RunningOrchestrator
    participants: Mapping[str, RunningParticipant]
    client: SagaClient
    directory: Path

    @property
    def address(self) -> str:
        """Where the orchestrator listens, for other clients (`compensa --address`)."""
        return self.orchestrator.address

    def participant(self, name: str) -> Participant:
        """The servicer serving participant `name`."""
        return self.participants[name].participant

    async def register(self, definition: definition_pb2.SagaDefinition) -> definition_pb2.SagaDefinition:
        """Registers `definition` (validated as `compensa register` would); the stored version."""
        response: orchestrator_pb2.RegisterDefinitionResponse = await self.client.stub.RegisterDefinition(
            orchestrator_pb2.RegisterDefinitionRequest(definition=definition)
        )
        return response.definition

    async def events(self, saga_id: str) -> list[saga_pb2.SagaEvent]:
        """The saga's log so far, to its end if it has ended."""
        return [event async for event in self.client.events(saga_id)]

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        *,
        participants: Mapping[str, Participant | ParticipantFactory],
        definitions: Sequence[Path | definition_pb2.SagaDefinition] = (),
        lease_seconds: float = 5.0,
    ) -> AsyncIterator[SagaTestEnvironment]:
        """Starts everything, yields the environment, and stops everything
        (deleting the temporary databases) when the block ends. `definitions`
        are files or directories of them, or SagaDefinition messages; a bad
        one raises DefinitionError before anything is served."""
        files = tuple(Path(item) for item in definitions if not isinstance(item, definition_pb2.SagaDefinition))
        messages = [item for item in definitions if isinstance(item, definition_pb2.SagaDefinition)]
        async with contextlib.AsyncExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compensa-test-")))
            running: dict[str, RunningParticipant] = {}
            for name, given in participants.items():
                servicer = given if isinstance(given, Participant) else given(
                    create_participant_engine(f"sqlite+aiosqlite:///{directory / name}.db")
                )
                running[name] = await start_server(servicer, listen="127.0.0.1:0")
                stack.push_async_callback(running[name].stop, 0)
            orchestrator = await start_orchestrator(
                ServerConfig(
                    listen="127.0.0.1:0",
                    database_url=f"sqlite+aiosqlite:///{directory / 'compensa.db'}",
                    definition_paths=files,
                    participants={name: participant.address for name, participant in running.items()},
                    lease_seconds=lease_seconds,
                )
            )
            stack.push_async_callback(orchestrator.stop, 0)
            client = SagaClient(orchestrator.address)
            stack.push_async_callback(client.close)
            environment = cls(orchestrator, running, client, directory)
            for definition in messages:
                await environment.register(definition)
            yield environment


def replay_saved_history(
    history_file: Path, definition_file: Path | None = None, *, renames: Mapping[str, str] | None = None
) -> HistoryCheck:
    """Replays a saved history (`compensa get ID --history`) through the
    state machine under `definition_file` (YAML or JSON, as `compensa
    register` reads it), its steps renamed old -> new by `renames`; without a
    file, under the version the saga ran on, which must rebuild it exactly."""
    definition = load_definition_file(definition_file) if definition_file is not None else None
    return check_history(read_history_file(history_file), definition, renames=renames)


def assert_histories_replay(
    history_files: Iterable[Path], definition_file: Path | None = None, *, renames: Mapping[str, str] | None = None
) -> None:
    """AssertionError naming every saved history that `replay_saved_history`
    finds diverging (the saga, the first diverging event and why)."""
    files = list(history_files)
    definition = load_definition_file(definition_file) if definition_file is not None else None
    failed = [
        f"{path}: {check.summary()}"
        for path in files
        if not (check := check_history(read_history_file(path), definition, renames=renames)).ok
    ]
    if failed:
        under = f"under {definition_file}" if definition_file is not None else "under their own versions"
        raise AssertionError(
            f"{len(failed)} of {len(files)} saved histories do not replay {under}:\n" + "\n".join(failed)
        )
