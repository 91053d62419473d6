"""Access by role over gRPC with bearer tokens: reader < starter < operator,
definition scopes, unauthenticated calls, the per-client stream limit, and
tokens kept out of every log line and message. (Certificates: test_tls.py.)"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from dashboard_rig import TOKENS, bearer, dashboard_rig
from harness import REPO, checkout_input, poll_until

from compensa.orchestrator.api.auth import load_token_file
from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2
COMPENSA = REPO / ".venv" / "bin" / "compensa"


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


async def test_each_role_may_do_its_own_calls_and_is_refused_the_rest_naming_the_missing_role(
    tmp_path: Path, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        stub = rig.stub
        start = orchestrator_pb2.StartSagaRequest(saga_id="role-1", definition_name="board", input=checkout_input())

        nobody = await _refusal(stub.ListSagas(orchestrator_pb2.ListSagasRequest()))
        assert nobody.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (nobody.details() or "")
        forged = "forged-token-0123456789"
        wrong = await _refusal(stub.StartSaga(start, metadata=(("authorization", f"Bearer {forged}"),)))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not recognised" in (wrong.details() or "") and forged not in (wrong.details() or "")
        malformed = await _refusal(
            stub.ListSagas(orchestrator_pb2.ListSagasRequest(), metadata=(("authorization", "Basic x"),))
        )
        assert malformed.code() == grpc.StatusCode.UNAUTHENTICATED

        reader = await _refusal(stub.StartSaga(start, metadata=bearer("reader")))
        assert reader.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reader.details() == "StartSaga needs role starter; token viewer (role reader) lacks it"
        completion = await _refusal(stub.CompleteStep(
            orchestrator_pb2.CompleteStepRequest(completion_token="any"), metadata=bearer("reader")
        ))
        assert completion.code() == grpc.StatusCode.PERMISSION_DENIED
        assert completion.details() == "CompleteStep needs role starter; token viewer (role reader) lacks it"
        assert (await stub.ListSagas(orchestrator_pb2.ListSagasRequest(), metadata=bearer("reader"))).sagas == []

        rig.participant.script("execute", "reserve", ("sleep", 3.0))
        created = await stub.StartSaga(start, metadata=bearer("starter"))
        assert created.created
        for action, call in {
            "CancelSaga": stub.CancelSaga(
                orchestrator_pb2.CancelSagaRequest(saga_id="role-1"), metadata=bearer("starter")
            ),
            "RetrySaga": stub.RetrySaga(
                orchestrator_pb2.RetrySagaRequest(saga_id="role-1"), metadata=bearer("starter")
            ),
            "ResolveSaga": stub.ResolveSaga(
                orchestrator_pb2.ResolveSagaRequest(saga_id="role-1", note="x"), metadata=bearer("reader")
            ),
            "RegisterDefinition": stub.RegisterDefinition(
                orchestrator_pb2.RegisterDefinitionRequest(), metadata=bearer("starter")
            ),
            "SetParticipant": stub.SetParticipant(
                orchestrator_pb2.SetParticipantRequest(name="scripted", address="127.0.0.1:1"),
                metadata=bearer("starter"),
            ),
            "AuditSagas": stub.AuditSagas(orchestrator_pb2.AuditSagasRequest(), metadata=bearer("reader")),
        }.items():
            refused = await _refusal(call)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, action
            assert (refused.details() or "").startswith(f"{action} needs role operator; token "), refused.details()
        cancelled = await stub.CancelSaga(
            orchestrator_pb2.CancelSagaRequest(saga_id="role-1", reason="customer called", actor="ops desk"),
            metadata=bearer("operator"),
        )
        assert cancelled.saga.state == S.SAGA_STATE_COMPENSATING
        events = await rig.events("role-1")
        assert [event.actor for event in events if event.type == S.EVENT_TYPE_CANCEL_REQUESTED] == [
            'token:alice as "ops desk"'
        ]

        # A token scoped to definition "other" sees nothing of "board".
        scoped = await _refusal(
            stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="role-1"), metadata=bearer("elsewhere"))
        )
        assert scoped.code() == grpc.StatusCode.NOT_FOUND  # as if it did not exist (test_scope.py)
        assert scoped.details() == "saga 'role-1' not found"
        listing = await _refusal(stub.ListSagas(orchestrator_pb2.ListSagasRequest(), metadata=bearer("elsewhere")))
        assert listing.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "pass definition_name" in (listing.details() or "")
        other = await stub.ListSagas(
            orchestrator_pb2.ListSagasRequest(definition_name="other"), metadata=bearer("elsewhere")
        )
        assert list(other.sagas) == []
        start_here = await _refusal(stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(saga_id="role-2", definition_name="board", input=checkout_input()),
            metadata=bearer("elsewhere"),
        ))
        assert start_here.code() == grpc.StatusCode.PERMISSION_DENIED
        definitions = await stub.ListDefinitions(
            orchestrator_pb2.ListDefinitionsRequest(), metadata=bearer("elsewhere")
        )
        assert list(definitions.definitions) == []
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for token in (*TOKENS.values(), forged):
        assert token not in logged


async def test_streams_per_client_are_limited_with_resource_exhausted_naming_the_limit(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, max_streams_per_client=1) as rig:
        first = rig.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(), metadata=bearer("reader"))
        # The first stream is open once its saga's first event reaches it.
        await rig.begin("stream-1")
        assert (await first.read()).event.saga_id == "stream-1"
        second = rig.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(), metadata=bearer("reader"))
        refused = await _refusal(second.read())
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == (
            "token viewer has 1 streams open, the limit per client (serve --max-streams-per-client): close one first"
        )
        # Another identity has its own allowance.
        other = rig.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="stream-1"), metadata=bearer("operator"))
        assert (await other.read()).snapshot.saga_id == "stream-1"
        other.cancel()
        first.cancel()

        async def reopened() -> bool:
            again = rig.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="stream-1"), metadata=bearer("reader"))
            try:
                return (await again.read()).snapshot.saga_id == "stream-1"
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            finally:
                again.cancel()

        # The slot is given back once the server sees the cancel.
        await poll_until(reopened, timeout=10)


def test_token_files_are_checked_and_their_errors_never_show_a_token(tmp_path: Path) -> None:
    secret = "short-secret"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"tokens:\n  - token: {secret}\n    identity: x\n    role: reader\n")
    with pytest.raises(InvalidArgument, match="entry 1: give 'sha256'") as error:
        load_token_file(bad)
    assert secret not in str(error.value)
    bad.write_text("tokens:\n  - sha256: " + "a" * 64 + "\n    identity: x\n    role: admin\n")
    with pytest.raises(InvalidArgument, match="role 'admin' is not one of reader, starter, operator"):
        load_token_file(bad)
    hashed = tmp_path / "hashed.yaml"
    hashed.write_text("tokens:\n  - sha256: " + "B" * 64 + "\n    identity: ci\n    role: starter\n")
    (grant,) = load_token_file(hashed).values()
    assert (grant.identity, grant.role.label, grant.definitions) == ("ci", "starter", frozenset())
    result = subprocess.run(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--tokens", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read token file") and "missing.yaml" in result.stderr
    result = subprocess.run(
        [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--role", "ops=admin"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2 and "role 'admin' is not one of" in result.stderr


async def test_an_open_api_warns_at_start_and_lets_everyone_act(
    tmp_path: Path, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="compensa.server")
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None, http_listen=None) as rig:
        assert any("the API is open" in record.getMessage() for record in caplog.records)
        await rig.failed_for_a_person("open-1")
        resolved = await rig.stub.ResolveSaga(
            orchestrator_pb2.ResolveSagaRequest(saga_id="open-1", note="fixed", actor="bob")
        )
        assert resolved.saga.resolution_note == "fixed"
        events = await rig.events("open-1")
        assert [event.actor for event in events if event.type == S.EVENT_TYPE_OPERATOR_RESOLVED] == ["bob"]


def _jwt_signer(tmp_path: Path) -> tuple[Path, Callable[..., str], Callable[..., str]]:
    """A key set file with one EC key (kid "k1"), a signer with that key, and
    a signer with an unrelated key claiming the same kid."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}))

    def signer(private: object) -> Callable[..., str]:
        def sign(expires_in: float = 300, **claims: object) -> str:
            body = {"aud": "compensa", "exp": int(time.time() + expires_in), **claims}
            return jwt.encode(body, private, algorithm="ES256", headers={"kid": "k1"})  # type: ignore[arg-type]

        return sign

    return tmp_path / "jwks.json", signer(key), signer(stranger)


async def test_jwts_signed_by_the_key_set_carry_identity_role_and_scope(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    key_set, sign, forge = _jwt_signer(tmp_path)
    async with dashboard_rig(tmp_path, make_postgres_url, jwt_keys=key_set, jwt_audience="compensa") as rig:
        rig.participant.script("execute", "reserve", ("sleep", 3.0))
        await rig.begin("jwt-1")

        def as_jwt(token: str) -> tuple[tuple[str, str]]:
            return (("authorization", f"Bearer {token}"),)

        reader = as_jwt(sign(sub="carol", role="reader", definitions=["board"]))
        assert (await rig.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="jwt-1"), metadata=reader)).saga.saga_id
        refused = await _refusal(
            rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="jwt-1"), metadata=reader)
        )
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.details() == "CancelSaga needs role operator; jwt carol (role reader) lacks it"
        for why, token in {
            "has expired": sign(expires_in=-60, sub="carol", role="operator"),
            "Audience doesn't match": sign(sub="carol", role="operator", aud="someone-else"),
            "Signature verification failed": forge(sub="mallory", role="operator"),
            "'role' claim": sign(sub="carol"),
        }.items():
            wrong = await _refusal(rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="jwt-1"),
                                                       metadata=as_jwt(token)))
            assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED, why
            assert why in (wrong.details() or "") and token not in (wrong.details() or ""), wrong.details()
        operator = as_jwt(sign(sub="dave", role="operator"))
        cancelled = await rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="jwt-1"), metadata=operator)
        assert cancelled.saga.state == S.SAGA_STATE_COMPENSATING
        actors = [event.actor for event in await rig.events("jwt-1") if event.type == S.EVENT_TYPE_CANCEL_REQUESTED]
        assert actors == ["jwt:dave"]
        # The token file still works beside the key set, and the dashboard takes JWTs too.
        assert (await rig.stub.ListSagas(orchestrator_pb2.ListSagasRequest(), metadata=bearer("reader"))).sagas
        async with aiohttp.ClientSession(headers={"Authorization": reader[0][1]}) as session:
            async with session.get(rig.url + "/") as page:
                assert page.status == 200 and "jwt carol (role reader)" in await page.text()


async def test_a_reader_watches_the_alert_log_from_a_position_without_gaps_or_duplicates(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        store = rig.orchestrator.engine.store
        now = time.time()
        await store.set_participant("payments", "127.0.0.1:9", updated_by="test", now=now)

        async def outage(at: float) -> list[int]:
            await store.participant_failing("payments", at)
            down = await store.alert_participant_unhealthy("payments", unhealthy_before=at, now=at, message="down")
            up = await store.participant_serving("payments", now=at + 1, message="up")
            assert down is not None and up is not None
            return [down.position, up.position]

        raised = await outage(now) + await outage(now + 2)
        nobody = await _refusal(rig.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest()).read())
        assert nobody.code() == grpc.StatusCode.UNAUTHENTICATED
        scoped = await _refusal(
            rig.stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest(), metadata=bearer("elsewhere")).read()
        )
        assert scoped.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "limited to definitions other" in (scoped.details() or "")
        negative = await _refusal(rig.stub.WatchAlerts(
            orchestrator_pb2.WatchAlertsRequest(after_position=-1), metadata=bearer("reader")
        ).read())
        assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT

        stream = rig.stub.WatchAlerts(
            orchestrator_pb2.WatchAlertsRequest(after_position=raised[0]), metadata=bearer("reader")
        )
        read = [(await stream.read()).alert for _ in range(3)]
        assert [alert.position for alert in read] == raised[1:]
        assert [alert.kind for alert in read] == [
            orchestrator_pb2.ALERT_KIND_PARTICIPANT_RECOVERED, orchestrator_pb2.ALERT_KIND_PARTICIPANT_UNHEALTHY,
            orchestrator_pb2.ALERT_KIND_PARTICIPANT_RECOVERED,
        ]
        assert read[1].alert_id == f"participant/payments/{raised[2]}" and read[1].address == "127.0.0.1:9"
        # Live: an alert raised after the stream caught up reaches it, once.
        more = await outage(now + 4)
        live = [(await stream.read()).alert for _ in range(2)]
        assert [alert.position for alert in live] == more
        stream.cancel()
