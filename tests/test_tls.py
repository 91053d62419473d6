"""Mutual TLS between every party: client -> orchestrator -> participants.

Certificates are made for each run with the openssl command: a CA that signs
the servers' and the clients' certificates, and a second, unrelated CA whose
client certificate must be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from harness import CHECKOUT, FINAL, REPO, checkout_input, poll_until

from compensa.common.tls import TlsConfigError, TlsFiles
from compensa.examples.inventory import RESERVATIONS
from compensa.examples.server import start_participant
from compensa.orchestrator.api.auth import Role
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2
COMPENSA = REPO / ".venv" / "bin" / "compensa"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: TlsFiles  # server certificate for 127.0.0.1, trusting client certificates of `ca`
    client: TlsFiles  # client certificate signed by `ca`, trusting servers of `ca`
    stranger: TlsFiles  # a client certificate from another CA, trusting servers of `ca`
    operator: TlsFiles  # a client certificate of `ca`: CN ops-console, DNS name ops.example


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _authority(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=directory)


def _certificate(directory: Path, authority: str, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{authority}.pem", "-CAkey", f"{authority}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _authority(directory, "ca")
    _authority(directory, "other-ca")
    _certificate(directory, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _certificate(directory, "ca", "client", "extendedKeyUsage=clientAuth")
    _certificate(directory, "other-ca", "stranger", "extendedKeyUsage=clientAuth")
    _certificate(directory, "ca", "ops-console", "subjectAltName=DNS:ops.example\nextendedKeyUsage=clientAuth")
    ca = directory / "ca.pem"
    return Pki(
        ca=ca,
        server=TlsFiles(cert=directory / "server.pem", key=directory / "server.key", ca=ca),
        client=TlsFiles(cert=directory / "client.pem", key=directory / "client.key", ca=ca),
        stranger=TlsFiles(cert=directory / "stranger.pem", key=directory / "stranger.key", ca=ca),
        operator=TlsFiles(cert=directory / "ops-console.pem", key=directory / "ops-console.key", ca=ca),
    )


@dataclass(frozen=True)
class Deployment:
    address: str
    metrics_port: int


@pytest.fixture
async def deployment(pki: Pki, tmp_path: Path) -> AsyncIterator[Deployment]:
    """The checkout participants and an orchestrator, every hop mutual TLS."""
    participants = {
        kind: await start_participant(kind, f"sqlite+aiosqlite:///{tmp_path / kind}.db", tls=pki.server)
        for kind in ("inventory", "payment", "shipping")
    }
    orchestrator = await start_orchestrator(
        ServerConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
            definition_paths=(CHECKOUT,),
            participants={kind: running.address for kind, running in participants.items()},
            tls=pki.server,
            participant_tls=pki.client,
            metrics_listen="127.0.0.1:0",
        )
    )
    assert orchestrator.metrics_port is not None
    try:
        yield Deployment(orchestrator.address, orchestrator.metrics_port)
    finally:
        await orchestrator.stop(0)
        for running in participants.values():
            await running.stop(0)


def _stub(channel: grpc.aio.Channel) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


async def test_a_checkout_runs_over_mutual_tls_and_strangers_are_refused(pki: Pki, deployment: Deployment) -> None:
    async with grpc.aio.secure_channel(deployment.address, pki.client.channel_credentials) as channel:
        stub = _stub(channel)
        await stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id="tls-1", definition_name="checkout", input=checkout_input())
        )

        async def final() -> saga_pb2.Saga | None:
            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="tls-1"))).saga
            return saga if saga.state == S.SAGA_STATE_SUCCEEDED else None

        await poll_until(final, timeout=20)

        strangers = {
            "plaintext": grpc.aio.insecure_channel(deployment.address),
            "no client certificate": grpc.aio.secure_channel(
                deployment.address, TlsFiles(ca=pki.ca).channel_credentials
            ),
            "client certificate of another CA": grpc.aio.secure_channel(
                deployment.address, pki.stranger.channel_credentials
            ),
        }
        for what, stranger in strangers.items():
            async with stranger:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await _stub(stranger).StartSaga(
                        orchestrator_pb2.StartSagaRequest(
                            saga_id=f"stranger-{len(what)}", definition_name="checkout", input=checkout_input()
                        ),
                        timeout=5,
                    )
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, what
        listed = await stub.ListSagas(orchestrator_pb2.ListSagasRequest())
        assert [saga.saga_id for saga in listed.sagas] == ["tls-1"]


async def test_the_cli_calls_over_tls(pki: Pki, deployment: Deployment) -> None:
    assert pki.client.cert is not None and pki.client.key is not None
    tls = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    process = await asyncio.create_subprocess_exec(
        str(COMPENSA), "--address", deployment.address, *tls, "status",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "(no sagas)"
    refused = await asyncio.create_subprocess_exec(
        str(COMPENSA), "--address", deployment.address, "--timeout", "5", "status",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 2
    assert stderr.decode().startswith("error: UNAVAILABLE")


def test_unusable_tls_settings_are_refused_before_anything_starts(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="give both"):
        TlsFiles(cert=pki.server.cert)
    with pytest.raises(TlsConfigError, match="cannot read TLS file"):
        _ = TlsFiles(cert=tmp_path / "missing.pem", key=tmp_path / "missing.key").server_credentials
    result = subprocess.run(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "missing.pem"),
         "--tls-key", str(pki.server.key)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read TLS file") and "missing.pem" in result.stderr
    assert not (tmp_path / ".compensa").exists()
    result = subprocess.run(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--tls-client-ca", str(pki.ca)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--tls-client-ca needs --tls-cert and --tls-key" in result.stderr
    result = subprocess.run(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--operator", "ops.example",
         "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--operator needs --tls-client-ca" in result.stderr


async def test_metrics_are_served_over_the_same_mutual_tls(pki: Pki, deployment: Deployment) -> None:
    url = f"https://127.0.0.1:{deployment.metrics_port}/metrics"

    def fetch(with_client_certificate: bool) -> str:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if with_client_certificate:
            context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            text: str = response.read().decode()
            return text

    assert "compensa_sagas_driven" in await asyncio.to_thread(fetch, True)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(fetch, False)


_ONE_STEP = """\
name: tls-probe
description: One reversible step, few quick retries.
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve_stock
    participant: inventory
    kind: COMPENSABLE
    execute_timeout: 2s
    compensate_timeout: 2s
    retry: {max_attempts: 2, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 100ms}
    compensate_retry: {max_attempts: 2, initial_backoff: 50ms, backoff_multiplier: 2, max_backoff: 100ms}
"""


@contextlib.asynccontextmanager
async def _one_step_deployment(
    pki: Pki, tmp_path: Path, *, definition: str = _ONE_STEP, inventory_faults: FaultPlan | None = None,
    **config: Any,
) -> AsyncIterator[RunningOrchestrator]:
    """The inventory participant over TLS and an orchestrator running `definition`."""
    (tmp_path / "tls-probe.yaml").write_text(definition)
    inventory = await start_participant(
        "inventory", f"sqlite+aiosqlite:///{tmp_path / 'inventory.db'}", tls=pki.server, faults=inventory_faults
    )
    try:
        orchestrator = await start_orchestrator(
            ServerConfig(
                listen="127.0.0.1:0",
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
                definition_paths=(tmp_path / "tls-probe.yaml",),
                participants={"inventory": inventory.address},
                **config,
            )
        )
        try:
            yield orchestrator
        finally:
            await orchestrator.stop(0)
    finally:
        await inventory.stop(0)


async def test_a_participant_certificate_from_an_untrusted_ca_fails_the_calls_and_says_why(
    pki: Pki, tmp_path: Path
) -> None:
    """The orchestrator trusts another CA than the one that signed the
    participant's certificate: no call gets through, the step's last error
    names the certificate check, and since the handshake failed before any
    request was sent, nothing is compensated."""
    wrong_trust = TlsFiles(cert=pki.client.cert, key=pki.client.key, ca=pki.ca.with_name("other-ca.pem"))
    async with (
        _one_step_deployment(pki, tmp_path, participant_tls=wrong_trust) as orchestrator,
        grpc.aio.insecure_channel(orchestrator.address) as channel,
    ):
        stub = _stub(channel)
        await stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id="tls-untrusted", definition_name="tls-probe",
                                              input=checkout_input())
        )

        async def final() -> saga_pb2.Saga | None:
            saga = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="tls-untrusted"))).saga
            return saga if saga.state in FINAL else None

        saga = await poll_until(final, timeout=20)
        history = (await stub.GetSagaHistory(orchestrator_pb2.GetSagaHistoryRequest(saga_id="tls-untrusted"))).history
    # The handshake fails before any request byte is sent, so every attempt
    # was never delivered: there is nothing to undo, and the compensation is
    # skipped rather than tried (and failed the same way).
    assert saga.state == S.SAGA_STATE_COMPENSATED
    (step,) = saga.steps
    assert step.state == S.STEP_STATE_FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in step.last_error, step.last_error
    skipped = [event for event in history.events if event.type == S.EVENT_TYPE_STEP_COMPENSATION_SKIPPED]
    assert [event.step_name for event in skipped] == [step.name]
    assert skipped[0].message.startswith("never delivered"), skipped[0].message
    assert not [event for event in history.events if event.type == S.EVENT_TYPE_STEP_COMPENSATING]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'inventory.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(RESERVATIONS)).scalar_one() == 0
    finally:
        engine.dispose()


async def test_only_operators_named_by_their_certificates_may_act_on_sagas_or_register(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        _one_step_deployment(
            pki, tmp_path, definition=_ONE_STEP.replace("execute_timeout: 2s", "execute_timeout: 10s"),
            # Slow enough that the saga is still running when the cancels arrive.
            inventory_faults=FaultPlan(delay_seconds=3.0),
            tls=pki.server, participant_tls=pki.client, operators=("ops.example",),
        ) as orchestrator,
        grpc.aio.secure_channel(orchestrator.address, pki.client.channel_credentials) as service_channel,
        grpc.aio.secure_channel(orchestrator.address, pki.operator.channel_credentials) as operator_channel,
    ):
        service, operator = _stub(service_channel), _stub(operator_channel)
        await service.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id="ops-1", definition_name="tls-probe", input=checkout_input())
        )
        refused = {
            "CancelSaga": service.CancelSaga(
                orchestrator_pb2.CancelSagaRequest(saga_id="ops-1", reason="no", actor="ops.example")
            ),
            "ResolveSaga": service.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="ops-1", note="no")),
            "RetrySaga": service.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="ops-1")),
            "RegisterDefinition": service.RegisterDefinition(orchestrator_pb2.RegisterDefinitionRequest()),
        }
        for action, call in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, action
            assert error.value.details() == f"{action} needs role operator; certificate client (role starter) lacks it"
        running = (await service.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="ops-1"))).saga
        assert running.state == S.SAGA_STATE_RUNNING and running.sequence == 2

        cancelled = await operator.CancelSaga(
            orchestrator_pb2.CancelSagaRequest(saga_id="ops-1", reason="customer called", actor="alice")
        )
        assert cancelled.saga.state == S.SAGA_STATE_COMPENSATING
        events = service.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="ops-1", replay_history=True))
        actors = []
        async for update in events:
            if update.event.type == S.EVENT_TYPE_CANCEL_REQUESTED:
                actors.append(update.event.actor)
                break
        events.cancel()
        # The role is ops.example's (a DNS name), and so is the name in the log.
        assert actors == ['cert:ops.example as "alice"']


async def test_roles_by_certificate_hold_on_the_api_and_on_the_dashboard_over_the_same_tls(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        _one_step_deployment(
            pki, tmp_path, tls=pki.server, participant_tls=pki.client, operators=("ops.example",),
            certificate_roles={"client": Role.READER}, http_listen="127.0.0.1:0",
        ) as orchestrator,
        grpc.aio.secure_channel(orchestrator.address, pki.client.channel_credentials) as reader_channel,
        grpc.aio.secure_channel(orchestrator.address, pki.operator.channel_credentials) as operator_channel,
    ):
        reader, operator = _stub(reader_channel), _stub(operator_channel)
        start = orchestrator_pb2.StartSagaRequest(saga_id="cert-1", definition_name="tls-probe", input=checkout_input())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await reader.StartSaga(start)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.value.details() == "StartSaga needs role starter; certificate client (role reader) lacks it"
        await operator.StartSaga(start)  # an operator may do what a starter may
        assert (await reader.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="cert-1"))).saga.saga_id == "cert-1"

        assert orchestrator.dashboard is not None and orchestrator.dashboard.url.startswith("https://")
        url = orchestrator.dashboard.url

        def fetch(client: TlsFiles | None) -> tuple[int, str]:
            context = ssl.create_default_context(cafile=str(pki.ca))
            if client is not None:
                context.load_cert_chain(str(client.cert), str(client.key))
            try:
                with urllib.request.urlopen(url, context=context, timeout=10) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as refused:
                return refused.code, refused.read().decode()

        status, html = await asyncio.to_thread(fetch, pki.operator)
        assert status == 200 and "certificate ops.example (role operator)" in html and 'data-saga-id="cert-1"' in html
        status, html = await asyncio.to_thread(fetch, pki.client)
        assert status == 200 and "certificate client (role reader)" in html
        # No client certificate (a browser without one): sign in with a token instead.
        status, html = await asyncio.to_thread(fetch, None)
        assert status == 401 and 'name="token"' in html
