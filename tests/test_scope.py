"""A caller limited to some definitions stays inside them everywhere: one
validation of every way of naming a scope, no existence leaks, participants
kept to the caller's definitions, and refused calls that leave a trace.
(Roles in general: test_access.py; certificates: test_tls.py.)"""

from __future__ import annotations

import json
import logging
import re
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from dashboard_rig import TOKEN_FILE, TOKENS, bearer, dashboard_rig
from harness import REPO, checkout_input
from test_tls import Pki, pki  # noqa: F401 (the fixture)

from compensa.orchestrator.api.auth import Role, check_scope, load_token_file
from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pb = orchestrator_pb2
COMPENSA = REPO / ".venv" / "bin" / "compensa"

#: Definition "other" (the scope of token "elsewhere") names participant
#: "other-side" (unreachable: its sagas keep running); "board" names "scripted" only.
OTHER = """\
name: other
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: other-side
    execute_timeout: 10s
    retry: {max_attempts: 100, initial_backoff: 1s, backoff_multiplier: 1, max_backoff: 1s}
"""


def _rig(tmp_path: Path, make_postgres_url: Callable[[], str], **config: object):  # type: ignore[no-untyped-def]
    (tmp_path / "other.yaml").write_text(OTHER)
    config.setdefault("definition_paths", (tmp_path / "board.yaml", tmp_path / "other.yaml"))
    config.setdefault("participants", {"other-side": "127.0.0.1:9"})
    return dashboard_rig(tmp_path, make_postgres_url, **config)


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


def _jwt_signer(tmp_path: Path) -> tuple[Path, Callable[..., str]]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}))

    def sign(kid: str = "k1", **claims: object) -> str:
        body = {"aud": "compensa", "exp": int(time.time() + 300), **claims}
        return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})  # type: ignore[arg-type]

    return tmp_path / "jwks.json", sign


def _as(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _single_saga_answers(
    stub: object, saga_id: str, metadata: tuple[tuple[str, str]]
) -> dict[str, tuple[grpc.StatusCode, str]]:
    """What each call over one saga answers `metadata`'s caller."""
    calls = {
        "GetSaga": lambda: stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), metadata=metadata),  # type: ignore[attr-defined]
        "WatchSaga": lambda: stub.WatchSaga(  # type: ignore[attr-defined]
            pb.WatchSagaRequest(saga_id=saga_id), metadata=metadata
        ).read(),
        "CancelSaga": lambda: stub.CancelSaga(  # type: ignore[attr-defined]
            pb.CancelSagaRequest(saga_id=saga_id, reason="x"), metadata=metadata
        ),
        "RetrySaga": lambda: stub.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id), metadata=metadata),  # type: ignore[attr-defined]
        "ResolveSaga": lambda: stub.ResolveSaga(  # type: ignore[attr-defined]
            pb.ResolveSagaRequest(saga_id=saga_id, note="x"), metadata=metadata
        ),
    }
    answers = {}
    for action, call in calls.items():
        refused = await _refusal(call())
        answers[action] = (refused.code(), (refused.details() or "").replace(saga_id, "ID"))
    return answers


async def test_a_saga_outside_the_callers_scope_is_answered_as_one_that_does_not_exist(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    key_set, sign = _jwt_signer(tmp_path)
    async with _rig(tmp_path, make_postgres_url, jwt_keys=key_set, jwt_audience="compensa") as rig:
        rig.participant.script("execute", "reserve", ("sleep", 30.0))
        await rig.begin("hidden-1")
        scoped_jwt = sign(sub="erin", role="operator", definitions=["other"])
        for metadata in (bearer("elsewhere"), _as(scoped_jwt)):
            hidden = await _single_saga_answers(rig.stub, "hidden-1", metadata)
            missing = await _single_saga_answers(rig.stub, "never-was-1", metadata)
            assert hidden == missing
            assert all(code == grpc.StatusCode.NOT_FOUND for code, _ in hidden.values()), hidden
            assert not any("board" in text for _, text in hidden.values()), hidden

        # A saga id taken in another definition: the same answer as any
        # conflict, naming no definition; and GetSaga still says NOT_FOUND.
        await rig.stub.StartSaga(
            pb.StartSagaRequest(saga_id="mine-1", definition_name="other", input=checkout_input()),
            metadata=bearer("elsewhere"),
        )
        conflicts = []
        for saga_id in ("hidden-1", "mine-1"):
            conflict = await _refusal(rig.stub.StartSaga(
                pb.StartSagaRequest(saga_id=saga_id, definition_name="other", input=checkout_input()),
                metadata=bearer("elsewhere"),
            ))
            assert conflict.code() == grpc.StatusCode.ALREADY_EXISTS
            conflicts.append((conflict.details() or "").replace(saga_id, "ID"))
        assert conflicts[0] == conflicts[1] and "board" not in conflicts[0]

        # The dashboard: 404, as for a saga that does not exist.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKENS['elsewhere']}"}) as session:
            async with session.get(f"{rig.url}/sagas/mine-1") as page:  # its own saga, still running
                form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', await page.text())
            assert form_token is not None
            pages = {}
            for saga_id in ("hidden-1", "never-was-1"):
                async with session.get(f"{rig.url}/sagas/{saga_id}") as page:
                    pages[saga_id] = (page.status, (await page.text()).replace(saga_id, "ID"))
                form = {"form_token": form_token.group(1), "reason": "x"}
                async with session.post(f"{rig.url}/sagas/{saga_id}/cancel", data=form) as answer:
                    pages[saga_id + "/cancel"] = (answer.status, (await answer.text()).replace(saga_id, "ID"))
            assert pages["hidden-1"] == pages["never-was-1"] and pages["hidden-1"][0] == 404
            assert pages["hidden-1/cancel"] == pages["never-was-1/cancel"] and pages["hidden-1/cancel"][0] == 404
            assert not re.search(r"\bboard\b", pages["hidden-1"][1] + pages["hidden-1/cancel"][1])


async def test_a_scoped_operator_sets_only_participants_no_other_definition_names_and_lists_only_its_own(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with _rig(tmp_path, make_postgres_url) as rig:
        before = {p.name: p.address for p in (await rig.stub.ListParticipants(
            pb.ListParticipantsRequest(), metadata=bearer("operator"))).participants}
        assert set(before) == {"scripted", "other-side"}
        refused = await _refusal(rig.stub.SetParticipant(
            pb.SetParticipantRequest(name="scripted", address="127.0.0.1:1"), metadata=bearer("elsewhere")
        ))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "board" not in (refused.details() or "") and "scripted" in (refused.details() or "")
        mine = await rig.stub.SetParticipant(
            pb.SetParticipantRequest(name="other-side", address="127.0.0.1:2"), metadata=bearer("elsewhere")
        )
        assert mine.participant.address == "127.0.0.1:2"
        fresh = await rig.stub.SetParticipant(
            pb.SetParticipantRequest(name="fresh", address="127.0.0.1:3"), metadata=bearer("elsewhere")
        )
        assert fresh.participant.name == "fresh"
        after = {p.name: p.address for p in (await rig.stub.ListParticipants(
            pb.ListParticipantsRequest(), metadata=bearer("operator"))).participants}
        assert after["scripted"] == before["scripted"]

        seen = await rig.stub.ListParticipants(pb.ListParticipantsRequest(), metadata=bearer("elsewhere"))
        assert [p.name for p in seen.participants] == ["other-side"]


def test_every_scope_is_checked_by_one_function_and_nothing_empty_or_malformed_widens(tmp_path: Path) -> None:
    assert check_scope({}, "x") == frozenset()
    assert check_scope({"definitions": ["other", "board"]}, "x") == frozenset({"other", "board"})
    for bad in (None, [], [""], [" "], "board", ["bad name!"], [1], ["board", ""]):
        with pytest.raises(InvalidArgument, match=r"^x: 'definitions'"):
            check_scope({"definitions": bad}, "x")
    token_file = tmp_path / "tokens.yaml"
    for scope in ("[]", "['']", "board", ""):
        token_file.write_text(
            f"tokens:\n  - token: a-long-enough-token-1\n    identity: x\n    role: reader\n    definitions: {scope}\n"
        )
        with pytest.raises(InvalidArgument, match="entry 1: 'definitions'"):
            load_token_file(token_file)


async def test_a_jwt_whose_scope_names_nothing_is_refused_at_sign_in(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    key_set, sign = _jwt_signer(tmp_path)
    async with _rig(tmp_path, make_postgres_url, jwt_keys=key_set, jwt_audience="compensa") as rig:
        await rig.begin("jwt-scope-1")
        for scope in ([""], [], ["bad name!"], "board", None):
            token = sign(sub="frank", role="reader", definitions=scope)
            for call in (
                rig.stub.ListSagas(pb.ListSagasRequest(), metadata=_as(token)),
                rig.stub.WatchSagas(pb.WatchSagasRequest(), metadata=_as(token)).read(),
            ):
                refused = await _refusal(call)
                assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, scope
                assert "'definitions'" in (refused.details() or "")


async def test_unknown_kids_are_quoted_short_and_token_file_tokens_with_dots_still_work(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    key_set, sign = _jwt_signer(tmp_path)
    dotted = "team.reader.token-0123456789"
    tokens = tmp_path / "dotted.yaml"
    tokens.write_text(TOKEN_FILE + f"  - token: {dotted}\n    identity: dotted\n    role: reader\n")
    async with _rig(
        tmp_path, make_postgres_url, jwt_keys=key_set, jwt_audience="compensa", token_file=tokens
    ) as rig:
        long_kid = "k" * 1000
        refused = await _refusal(rig.stub.ListSagas(pb.ListSagasRequest(), metadata=_as(sign(kid=long_kid, sub="x"))))
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "k" * 41 not in (refused.details() or "") and "(1000 characters)" in (refused.details() or "")
        assert (await rig.stub.ListSagas(pb.ListSagasRequest(), metadata=_as(dotted))).sagas == []


async def test_refused_calls_are_logged_without_the_token_and_counted_by_reason(
    tmp_path: Path, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    forged = "forged-token-0123456789"
    async with _rig(tmp_path, make_postgres_url) as rig:
        for _ in range(50):
            await _refusal(rig.stub.ListSagas(pb.ListSagasRequest(), metadata=_as(forged)))
        await _refusal(rig.stub.CancelSaga(pb.CancelSagaRequest(saga_id="x"), metadata=bearer("reader")))
        async with aiohttp.ClientSession() as session, session.get(rig.url + "/") as page:
            assert page.status == 401
        registry = rig.orchestrator.engine.metrics.registry
        assert registry.get_sample_value("compensa_refused_calls_total", {"reason": "unauthenticated"}) == 51
        assert registry.get_sample_value("compensa_refused_calls_total", {"reason": "permission_denied"}) == 1
    refusals = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert any("ListSagas" in line and "UNAUTHENTICATED" in line for line in refusals), refusals
    assert any("CancelSaga" in line and "token viewer" in line for line in refusals), refusals
    assert len(refusals) < 20  # rate-limited
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert forged not in logged and not any(token in logged for token in TOKENS.values())


async def test_dashboard_refuses_null_and_foreign_origins_shows_only_fixed_notices_and_ends_sessions(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with _rig(tmp_path, make_postgres_url) as rig:
        await rig.failed_for_a_person("dash-1")
        headers = {"Authorization": f"Bearer {TOKENS['operator']}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(rig.url + "/sagas/dash-1") as page:
                html = await page.text()
            form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', html).group(1)  # type: ignore[union-attr]
            for foreign in ({"Origin": "null"}, {"Referer": "http://evil.example/page"}):
                answer = await session.post(rig.url + "/sagas/dash-1/resolve", headers=foreign,
                                            data={"form_token": form_token, "note": "x"}, allow_redirects=False)
                assert answer.status == 403, foreign
            assert (await rig.saga("dash-1")).resolution_note == ""
            async with session.get(rig.url + "/sagas/dash-1?done=the+attacker+says+hello") as page:
                assert "attacker" not in await page.text()
            async with session.get(rig.url + "/sagas/dash-1?done=resolve") as page:
                assert 'id="done"' in await page.text()

        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            signed_in = await browser.post(rig.url + "/login", data={"token": TOKENS["reader"]}, allow_redirects=False)
            assert signed_in.status == 303
            session_cookie = signed_in.cookies["compensa_session"].value
            assert TOKENS["reader"] not in signed_in.headers["Set-Cookie"]
            async with browser.get(rig.url + "/") as page:
                assert page.status == 200
            await browser.post(rig.url + "/logout", allow_redirects=False)
        async with aiohttp.ClientSession(cookies={"compensa_session": session_cookie}) as replay:
            async with replay.get(rig.url + "/") as page:
                assert page.status == 401


async def test_certificate_scopes_hold_over_mutual_tls_on_the_api_and_the_dashboard(
    pki: Pki, tmp_path: Path, make_postgres_url: Callable[[], str]  # noqa: F811 (test_tls's fixture)
) -> None:
    async with (
        _rig(
            tmp_path, make_postgres_url, tls=pki.server,
            certificate_roles={"client": Role.OPERATOR}, certificate_scopes={"client": frozenset({"other"})},
        ) as rig,
        grpc.aio.secure_channel(rig.orchestrator.address, pki.client.channel_credentials) as channel,
    ):
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await stub.StartSaga(
            pb.StartSagaRequest(saga_id="tls-hidden-1", definition_name="board", input=checkout_input()),
            metadata=bearer("starter"),  # a token over TLS wins over the certificate
        )
        hidden = await _single_saga_answers(stub, "tls-hidden-1", ())
        assert hidden == await _single_saga_answers(stub, "never-was-1", ())
        assert all(code == grpc.StatusCode.NOT_FOUND for code, _ in hidden.values()), hidden
        seen = await stub.ListParticipants(pb.ListParticipantsRequest())
        assert [p.name for p in seen.participants] == ["other-side"]
        refused = await _refusal(stub.SetParticipant(pb.SetParticipantRequest(name="scripted", address="127.0.0.1:1")))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED

        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        async with aiohttp.ClientSession() as session:
            pages = {}
            for saga_id in ("tls-hidden-1", "never-was-1"):
                async with session.get(f"{rig.url}/sagas/{saga_id}", ssl=context) as page:
                    pages[saga_id] = (page.status, (await page.text()).replace(saga_id, "ID"))
            assert pages["tls-hidden-1"] == pages["never-was-1"] and pages["tls-hidden-1"][0] == 404
        # Signing in over TLS: a Secure session cookie that does not hold the token.
        plain = ssl.create_default_context(cafile=str(pki.ca))
        async with aiohttp.ClientSession() as browser:
            signed_in = await browser.post(rig.url + "/login", data={"token": TOKENS["reader"]}, ssl=plain,
                                           allow_redirects=False)
            assert signed_in.status == 303
            cookie = signed_in.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and TOKENS["reader"] not in cookie


def test_the_command_line_scopes_certificates_through_the_same_check(tmp_path: Path) -> None:
    for role in ("client=reader:", "client=reader:bad name!", "client=reader:,"):
        result = subprocess.run(
            [str(COMPENSA), "serve", "--listen", "127.0.0.1:0", "--role", role],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 2 and "'definitions'" in result.stderr, (role, result.stderr)
