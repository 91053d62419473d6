"""One identity per caller, read the same way by the gRPC API and the
dashboard: which certificate names count, which certificates are refused as
ambiguous, and how the saga log names who acted (a kind prefix that no name
can forge). Certificates come from the test's own CA (the `cryptography`
package); the token file and JWTs are the dashboard rig's."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dashboard_rig import BOARD, TOKEN_FILE, TOKENS, bearer, dashboard_rig
from harness import checkout_input
from scripted_participant import ScriptedParticipant, serve_scripted
from test_access import _jwt_signer

from compensa.common.tls import TlsFiles
from compensa.orchestrator.api.auth import AccessPolicy, Identity, Role
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import RunningOrchestrator, start_orchestrator
from compensa.orchestrator.shared.errors import InvalidArgument, Unauthenticated
from compensa.orchestrator.shared.limits import MAX_STORED_ACTOR_CHARS
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

S = saga_pb2


class _Authority:
    """A CA of the test's own that issues certificates with any names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "identities test CA")])
        self.certificate = self._sign(self._name, self._key.public_key(), [], authority=True)
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def _sign(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, names: Sequence[x509.GeneralName],
        *, authority: bool = False, usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self._name).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        if not authority:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue(
        self, stem: str, common_names: Sequence[str], names: Sequence[x509.GeneralName] = (),
        *, usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    ) -> TlsFiles:
        """A certificate with these common names (in this order) and
        alternative names, as PEM files trusting this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names])
        certificate = self._sign(subject, key.public_key(), names, usage=usage)
        (self.directory / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (self.directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        return TlsFiles(cert=self.directory / f"{stem}.pem", key=self.directory / f"{stem}.key", ca=self.path)

    def der(self, common_names: Sequence[str], names: Sequence[x509.GeneralName] = ()) -> bytes:
        """A certificate's DER bytes, for the access policy alone."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names])
        return self._sign(subject, key.public_key(), names).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> _Authority:
    return _Authority(tmp_path_factory.mktemp("identities-pki"))


#: Certificate names given roles in the deployment below.
_CERTIFICATE_ROLES = {
    "ops-console": Role.OPERATOR,
    "alice": Role.OPERATOR,
    "ops desk (token alice)": Role.OPERATOR,
}


@dataclass
class _Deployment:
    orchestrator: RunningOrchestrator
    participant: ScriptedParticipant
    authority: _Authority

    @property
    def url(self) -> str:
        assert self.orchestrator.dashboard is not None
        return self.orchestrator.dashboard.url.rstrip("/")

    @contextlib.asynccontextmanager
    async def stub(self, files: TlsFiles) -> AsyncIterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
        async with grpc.aio.secure_channel(self.orchestrator.address, files.channel_credentials) as channel:
            yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

    def session(self, files: TlsFiles, **headers: str) -> aiohttp.ClientSession:
        context = ssl.create_default_context(cafile=str(self.authority.path))
        context.load_cert_chain(str(files.cert), str(files.key))
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), headers=headers, timeout=aiohttp.ClientTimeout(total=30)
        )

    async def running_saga(self, saga_id: str, files: TlsFiles) -> None:
        """A saga whose first steps take long, so that it is running when cancelled."""
        self.participant.script("execute", "reserve", ("sleep", 20.0))
        self.participant.script("execute", "notify", ("sleep", 20.0))
        async with self.stub(files) as stub:
            await stub.StartSaga(
                orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="board", input=checkout_input())
            )

    async def cancel_actors(self, saga_id: str, files: TlsFiles) -> list[str]:
        async with self.stub(files) as stub:
            request = orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True)
            return [
                update.event.actor async for update in stub.WatchSaga(request)
                if update.event.type == S.EVENT_TYPE_CANCEL_REQUESTED
            ]


@contextlib.asynccontextmanager
async def _deployment(authority: _Authority, tmp_path: Path) -> AsyncIterator[_Deployment]:
    """Mutual TLS with roles by certificate name, the token file beside it,
    and the dashboard over the same TLS."""
    server = authority.issue(
        "server", ["server"], [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    participant = ScriptedParticipant()
    scripted, address = await serve_scripted(participant)
    (tmp_path / "board.yaml").write_text(BOARD)
    (tmp_path / "tokens.yaml").write_text(TOKEN_FILE)
    try:
        orchestrator = await start_orchestrator(ServerConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
            definition_paths=(tmp_path / "board.yaml",),
            participants={"scripted": address},
            tls=server,
            certificate_roles=_CERTIFICATE_ROLES,
            token_file=tmp_path / "tokens.yaml",
            http_listen="127.0.0.1:0",
        ))
        try:
            yield _Deployment(orchestrator, participant, authority)
        finally:
            await orchestrator.stop(0)
    finally:
        await scripted.stop(0)


async def _refused_on_both_faces(deployment: _Deployment, files: TlsFiles) -> str:
    """The one-line refusal a certificate gets, the same from the gRPC API
    (UNAUTHENTICATED, for a reader's call as for an operator's) and from the
    dashboard (401); nothing is changed."""
    async with deployment.stub(files) as stub:
        answers = []
        for call in (
            lambda: stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="target")),
            lambda: stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="target", reason="probe")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
            answers.append(refused.value.details() or "")
    async with deployment.session(files, Accept="application/json") as session, session.get(deployment.url) as page:
        assert page.status == 401
        answers.append((await page.json())["error"])
    assert len(set(answers)) == 1, answers
    assert "\n" not in answers[0]
    async with deployment.stub(deployment.authority.issue("reader-probe", ["probe"])) as stub:
        target = (await stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id="target"))).saga
    assert target.state == S.SAGA_STATE_RUNNING
    return answers[0]


async def test_a_granted_name_as_a_uri_or_e_mail_name_refuses_the_certificate_on_both_faces(
    authority: _Authority, tmp_path: Path
) -> None:
    """Only the common name and DNS names count; an operator's name as a URI
    or an e-mail name (which gRPC used to count, the dashboard not) makes the
    certificate ambiguous."""
    async with _deployment(authority, tmp_path) as deployment:
        await deployment.running_saga("target", authority.issue("starter", ["shop"]))
        for kind, name in {
            "URI": x509.UniformResourceIdentifier("ops-console"),
            "e-mail": x509.RFC822Name("ops-console"),
        }.items():
            message = await _refused_on_both_faces(
                deployment, authority.issue(f"as-{kind}", ["nobody"], [x509.DNSName("nobody.example"), name])
            )
            assert "ops-console" in message and kind in message and "common name and DNS" in message, message


async def test_a_common_name_with_a_nul_or_control_character_is_refused_on_both_faces(
    authority: _Authority, tmp_path: Path
) -> None:
    async with _deployment(authority, tmp_path) as deployment:
        await deployment.running_saga("target", authority.issue("starter", ["shop"]))
        message = await _refused_on_both_faces(deployment, authority.issue("nul", ["ops-console\x00.evil"]))
        assert "ops-console\\x00.evil" in message and "control" in message, message
        message = await _refused_on_both_faces(
            deployment, authority.issue("newline", ["nobody"], [x509.DNSName("ops-console\n.evil")])
        )
        assert "control" in message, message


async def test_a_certificate_with_two_common_names_is_refused_on_both_faces(
    authority: _Authority, tmp_path: Path
) -> None:
    async with _deployment(authority, tmp_path) as deployment:
        await deployment.running_saga("target", authority.issue("starter", ["shop"]))
        message = await _refused_on_both_faces(deployment, authority.issue("two", ["nobody", "ops-console"]))
        assert "2 common names" in message and "nobody" in message and "ops-console" in message, message


async def test_the_log_names_who_acted_by_kind_and_by_the_name_that_granted_the_role(
    authority: _Authority, tmp_path: Path
) -> None:
    """A certificate named alice is not the token user alice; a common name
    that reads like a token user claiming an actor is not one; a role given
    to a DNS name is logged under that name; the dashboard records and shows
    the same."""
    starter = authority.issue("starter", ["shop"])
    certificate_alice = authority.issue("alice", ["alice"])
    desk = authority.issue("desk", ["ops desk (token alice)"])
    by_dns_name = authority.issue("by-dns", ["someone"], [x509.DNSName("ops-console")])
    async with _deployment(authority, tmp_path) as deployment:
        for saga_id in ("by-cert-alice", "by-token-alice", "by-desk", "by-token-desk", "by-dns", "by-dashboard"):
            await deployment.running_saga(saga_id, starter)
        async with deployment.stub(certificate_alice) as stub:
            await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-cert-alice"))
        async with deployment.stub(desk) as stub:
            await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-desk"))
        async with deployment.stub(by_dns_name) as stub:
            await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-dns"))
        async with deployment.stub(starter) as stub:
            # A token wins over the certificate the call comes with.
            await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-token-alice"),
                                  metadata=bearer("operator"))
            await stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-token-desk", actor="ops desk"),
                                  metadata=bearer("operator"))

        async with deployment.session(by_dns_name) as session:
            async with session.get(deployment.url + "/sagas/by-dashboard") as page:
                html = await page.text()
            assert "certificate ops-console (role operator)" in html
            form_token = html.split('name="form_token" value="')[1].split('"')[0]
            async with session.post(deployment.url + "/sagas/by-dashboard/cancel", allow_redirects=False,
                                    data={"form_token": form_token, "reason": "from the page"}) as answer:
                assert answer.status == 303, await answer.text()
            async with session.get(deployment.url + "/sagas/by-desk") as page:
                assert "cert:&#34;ops desk (token alice)&#34;" in await page.text()

        logged = {
            saga_id: await deployment.cancel_actors(saga_id, starter)
            for saga_id in ("by-cert-alice", "by-token-alice", "by-desk", "by-token-desk", "by-dns", "by-dashboard")
        }
    assert logged == {
        "by-cert-alice": ["cert:alice"],
        "by-token-alice": ["token:alice"],
        "by-desk": ['cert:"ops desk (token alice)"'],
        "by-token-desk": ['token:alice as "ops desk"'],
        "by-dns": ["cert:ops-console"],
        "by-dashboard": ["cert:ops-console"],
    }


def test_the_access_policy_reads_certificate_names_by_one_rule(authority: _Authority) -> None:
    """The one function both faces call, on certificates alone: which names
    count, which name the identity takes, and what is ambiguous."""
    policy = AccessPolicy(certificate_roles={"ops-console": Role.OPERATOR, "grafana": Role.READER})

    def identify(common_names: Sequence[str], names: Sequence[x509.GeneralName] = ()) -> tuple[str, str, Role]:
        identity = policy.identify(authority.der(common_names, names), None)
        return identity.how, identity.name, identity.role

    assert identify(["ops-console"], [x509.DNSName("ops-console")]) == ("certificate", "ops-console", Role.OPERATOR)
    assert identify(["desk"], [x509.DNSName("ops-console")]) == ("certificate", "ops-console", Role.OPERATOR)
    assert identify(["shop"], [x509.DNSName("shop.example")]) == ("certificate", "shop", Role.STARTER)
    assert identify([], [x509.DNSName("shop.example")]) == ("certificate", "shop.example", Role.STARTER)
    # Names of other kinds grant nothing and name nobody, as long as no granted name is among them.
    assert identify(["shop"], [x509.UniformResourceIdentifier("spiffe://shop"), x509.RFC822Name("a@b.example")]) \
        == ("certificate", "shop", Role.STARTER)
    for common_names, names, why in [
        (["grafana"], [x509.DNSName("ops-console")], "2 names given roles"),
        (["a", "b"], [], "2 common names"),
        (["shop\u202eexample"], [], "control"),
        (["shop"], [x509.UniformResourceIdentifier("grafana")], "grafana"),
        ([], [x509.UniformResourceIdentifier("spiffe://shop")], "no common name or DNS name"),
    ]:
        with pytest.raises(Unauthenticated, match=why):
            policy.identify(authority.der(common_names, names), None)


def test_the_logged_actor_reads_one_way_whatever_the_names_and_claims() -> None:
    alice = Identity("alice", Role.OPERATOR, "token")
    assert alice.actor("") == alice.actor("alice") == "token:alice"
    assert Identity("alice", Role.OPERATOR, "jwt").actor("") == "jwt:alice"
    assert alice.actor('x" as "y') == r'token:alice as "x\" as \"y"'
    assert Identity('a "b"\\', Role.OPERATOR, "certificate").actor("") == r'cert:"a \"b\"\\"'
    assert Identity("ops\u202edesk", Role.OPERATOR, "token").actor("") == r'token:"ops\u202edesk"'
    long = Identity("n" * 300, Role.OPERATOR, "jwt").actor("c" * 128)
    assert len(long) <= MAX_STORED_ACTOR_CHARS and long.startswith('jwt:"nnn') and '…" as "ccc' in long
    assert Identity("", Role.OPERATOR, "open").actor("bob") == "bob"  # an open API trusts the claim
    for who in (alice, Identity("", Role.OPERATOR, "open")):
        with pytest.raises(InvalidArgument, match="keeps 'cert:', 'token:' and 'jwt:' for verified identities"):
            who.actor("token:alice")


async def test_a_jwt_subject_and_a_token_file_identity_of_the_same_name_stay_apart(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    """`sub: alice` in a JWT and `identity: alice` in the token file are two
    identities: their own form tokens, their own stream allowances, their own
    names in the saga log."""
    key_set, sign, _ = _jwt_signer(tmp_path)
    async with dashboard_rig(tmp_path, make_postgres_url, jwt_keys=key_set, jwt_audience="compensa",
                             max_streams_per_client=1) as rig:
        jwt_alice = sign(sub="alice", role="operator")
        as_jwt = (("authorization", f"Bearer {jwt_alice}"),)
        rig.participant.script("execute", "reserve", *[("sleep", 20.0)] * 3)
        for saga_id in ("by-token", "by-jwt", "by-form"):
            await rig.begin(saga_id)

        await rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-token"), metadata=bearer("operator"))
        await rig.stub.CancelSaga(orchestrator_pb2.CancelSagaRequest(saga_id="by-jwt"), metadata=as_jwt)
        actors = {
            saga_id: [event.actor for event in await rig.events(saga_id) if event.type == S.EVENT_TYPE_CANCEL_REQUESTED]
            for saga_id in ("by-token", "by-jwt")
        }
        assert actors == {"by-token": ["token:alice"], "by-jwt": ["jwt:alice"]}

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKENS['operator']}"}) as token_session:
            async with token_session.get(rig.url + "/sagas/by-form") as page:
                html = await page.text()
        assert "token alice (role operator)" in html
        token_alices_form = html.split('name="form_token" value="')[1].split('"')[0]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {jwt_alice}"}) as jwt_session:
            async with jwt_session.get(rig.url + "/sagas/by-form") as page:
                assert "jwt alice (role operator)" in await page.text()
            async with jwt_session.post(rig.url + "/sagas/by-form/cancel", allow_redirects=False,
                                        data={"form_token": token_alices_form, "reason": "x"}) as answer:
                assert answer.status == 403 and "stale" in await answer.text()
        assert (await rig.saga("by-form")).state == S.SAGA_STATE_RUNNING

        token_stream = rig.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="by-form"),
                                          metadata=bearer("operator"))
        assert (await token_stream.read()).snapshot.saga_id == "by-form"
        jwt_stream = rig.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="by-form"), metadata=as_jwt)
        assert (await jwt_stream.read()).snapshot.saga_id == "by-form"
        again = rig.stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id="by-form"), metadata=as_jwt)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await again.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.value.details() or "").startswith("jwt alice has 1 streams open")
        for stream in (token_stream, jwt_stream):
            stream.cancel()
