"""Who calls, and what they may do: roles for the gRPC API and the dashboard.

Three roles, each including the one before: reader (get, list, watch, status,
the dashboard), starter (+ StartSaga, CompleteStep) and operator (+ cancel,
retry, resolve, register definitions and participant addresses). An identity comes from a verified client
certificate (its common name or a DNS subject alternative name, given a role by
`serve --operator NAME` or `--role NAME=ROLE`; see `certificates`) or from a
bearer token: listed in a token file (`serve --tokens FILE`), or a JWT signed
by a key of a configured key set (`serve --jwt-keys FILE`) carrying `sub`,
`role` and optionally `definitions` claims; tokens may be scoped to definition
names (`check_scope`, one check for every way of naming a scope), certificates
with `--role NAME=ROLE:DEFINITIONS`. Each kind is an identity of its own: the JWT subject alice is not the
token-file identity alice nor the certificate alice, in the saga log
(`jwt:alice`, `token:alice`, `cert:alice`) as in the stream limit and the
dashboard's form token.

A caller limited to some definitions learns nothing of the others: a saga of
another definition is answered exactly as one that does not exist
(`require_visible`), and participants are shown and changed only within the
definitions that name them. Refused calls are logged (rate-limited, never a
token) and counted by reason (`RefusedCalls`).

With none of this configured the API is open, as it always was: every caller
may do everything (the server warns at start). Both faces, gRPC and HTTP, ask
the same `AccessPolicy`, so one rule holds everywhere. Tokens are compared by
their SHA-256 and never logged or put in a message.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compensa.orchestrator.api.certificates import CertificateNames, read_certificate
from compensa.orchestrator.definitions import NAME_PATTERN
from compensa.orchestrator.shared.errors import (
    CompensaError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    quote,
    saga_not_found,
)
from compensa.orchestrator.shared.limits import MAX_ACTOR_CHARS, MAX_STORED_ACTOR_CHARS, check_text

log = logging.getLogger("compensa.access")

__all__ = [
    "REQUIRED_ROLE",
    "AccessPolicy",
    "Identity",
    "JwtKeys",
    "OutOfScope",
    "RefusedCalls",
    "Role",
    "StreamLimit",
    "TokenGrant",
    "check_scope",
    "load_jwt_keys",
    "load_token_file",
    "parse_role",
]


class Role(enum.IntEnum):
    """What a caller may do; a higher role includes every lower one."""

    READER = 1
    STARTER = 2
    OPERATOR = 3

    @property
    def label(self) -> str:
        return self.name.lower()


#: The least role each action needs: the RPCs by name, and the dashboard.
REQUIRED_ROLE: Mapping[str, Role] = {
    "GetSaga": Role.READER,
    "GetSagaHistory": Role.READER,
    "PlanMigration": Role.READER,
    "ListSagas": Role.READER,
    "SummarizeSagas": Role.READER,
    "WatchSaga": Role.READER,
    "WatchSagas": Role.READER,
    "WatchAlerts": Role.READER,
    "GetDefinition": Role.READER,
    "ListDefinitions": Role.READER,
    "GetDefinitionHistory": Role.READER,
    "ListParticipants": Role.READER,
    "Dashboard": Role.READER,
    "StartSaga": Role.STARTER,
    "CompleteStep": Role.STARTER,
    "CancelSaga": Role.OPERATOR,
    "RetrySaga": Role.OPERATOR,
    "ResolveSaga": Role.OPERATOR,
    "RegisterDefinition": Role.OPERATOR,
    "PromoteDefinition": Role.OPERATOR,
    "SetParticipant": Role.OPERATOR,
    "StartBulkAction": Role.OPERATOR,
    "GetBulkAction": Role.OPERATOR,
    "ListBulkActions": Role.OPERATOR,
    "PauseBulkAction": Role.OPERATOR,
    "ResumeBulkAction": Role.OPERATOR,
    "CancelBulkAction": Role.OPERATOR,
    "AuditSagas": Role.OPERATOR,
    "SetParticipantLimits": Role.OPERATOR,
    "HoldParticipant": Role.OPERATOR,
    "ReleaseParticipant": Role.OPERATOR,
}


def parse_role(text: str) -> Role:
    """"reader", "starter" or "operator" (any case); InvalidArgument otherwise."""
    try:
        return Role[text.strip().upper()]
    except KeyError:
        raise InvalidArgument(f"role {text!r} is not one of reader, starter, operator") from None


def check_scope(holder: Mapping[str, object], where: str) -> frozenset[str]:
    """The definitions `holder`'s `definitions` names: the one check of a
    token file entry's, a JWT's and a certificate's scope. No `definitions`
    key means every definition; anything else (null included) must be a
    non-empty list of definition names, so that a scope that is empty,
    malformed or names nothing is refused rather than read as "every
    definition". InvalidArgument starting with `where` otherwise."""
    if "definitions" not in holder:
        return frozenset()
    names = holder["definitions"]
    if (
        not isinstance(names, list) or not names
        or not all(isinstance(name, str) and NAME_PATTERN.fullmatch(name) for name in names)
    ):
        raise InvalidArgument(
            f"{where}: 'definitions' must be a non-empty list of definition names (lowercase letters, digits,"
            " '_' and '-'); leave it out for every definition"
        )
    return frozenset(names)


class OutOfScope(NotFound):
    """A saga outside the caller's definitions: answered exactly as a saga
    that does not exist (NotFound's code, reason and message); `why`, for the
    refusals' log only, says whose scope left it out."""

    def __init__(self, saga_id: str, why: str) -> None:
        super().__init__(str(saga_not_found(saga_id)))
        self.why = why


@dataclass(frozen=True)
class Identity:
    """A caller as the deployment knows it.

    `how` is "certificate", "token" (the token file), "jwt" or "open"
    (nothing configured: whoever calls is trusted as the name it claims);
    two identities are the same only when both `how` and `name` are.
    `definitions` limits the caller to sagas of those definitions; empty
    means every definition.
    """

    name: str
    role: Role
    how: str
    definitions: frozenset[str] = frozenset()

    def describe(self) -> str:
        """For messages: "token alice (role reader)"."""
        if self.how == "open":
            return f"{self.name or 'anonymous'} (open API)"
        return f"{self.how} {self.name} (role {self.role.label})"

    def actor(self, claimed: str) -> str:
        """Who acted, for the saga's log: the verified identity as KIND:NAME
        (`cert:ops-console`, `token:alice`, `jwt:alice`), then the actor the
        request claims when it differs from the name, always quoted
        (`token:alice as "ops desk"`). A name is quoted too unless it is plain
        (letters, digits, `._@+=/:~-`), so that no name and no claim reads as
        another identity. On an open API the claim is all there is, and is
        recorded as it is. InvalidArgument if the claim cannot be stored or
        begins with a kind prefix."""
        check_text(claimed, "actor", max_chars=MAX_ACTOR_CHARS)
        if _KIND_PREFIX.match(claimed):
            raise InvalidArgument(
                f"actor {quote(claimed)} begins with {claimed.partition(':')[0]!r}: the saga log keeps 'cert:',"
                " 'token:' and 'jwt:' for verified identities; claim a name without it"
            )
        if self.how == "open":
            return claimed or self.name
        identity = f"{_LOG_KINDS[self.how]}:{_logged(self.name, _NAME_ROOM, bare_if_plain=True)}"
        if not claimed or claimed == self.name:
            return identity
        room = MAX_STORED_ACTOR_CHARS - len(identity) - len(" as ")
        return f"{identity} as {_logged(claimed, room, bare_if_plain=False)}"

    def may_see(self, definition_name: str) -> bool:
        return not self.definitions or definition_name in self.definitions


#: How the saga log writes each kind of verified identity.
_LOG_KINDS = {"certificate": "cert", "token": "token", "jwt": "jwt"}
_KIND_PREFIX = re.compile(r"(?:cert|token|jwt):")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._@+=/:~-]+")
#: At most this much of the log's actor column goes to the identity's name;
#: the claimed actor keeps the rest.
_NAME_ROOM = 128


def _logged(text: str, room: int, *, bare_if_plain: bool) -> str:
    """`text` for the log in at most `room` characters: bare when plain (and
    allowed), else in double quotes with `"` and `\\` escaped and non-printing
    characters as escapes; cut short with "…" inside the quotes."""
    if bare_if_plain and len(text) <= room and _PLAIN_NAME.fullmatch(text):
        return text
    pieces = [
        "\\" + character if character in '"\\'
        else character if character.isprintable() else character.encode("unicode_escape").decode()
        for character in text
    ]
    if sum(map(len, pieces)) + 2 > room:
        kept: list[str] = []
        size = 3  # the quotes and "…"
        for piece in pieces:
            size += len(piece)
            if size > room:
                break
            kept.append(piece)
        pieces = [*kept, "…"]
    return '"' + "".join(pieces) + '"'


@dataclass(frozen=True)
class TokenGrant:
    """What one bearer token stands for."""

    identity: str
    role: Role
    definitions: frozenset[str] = frozenset()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_file(path: Path) -> dict[str, TokenGrant]:
    """Reads a token file (YAML or JSON) into grants keyed by the token's
    SHA-256 (hex). Each entry has `identity`, `role`, optionally `definitions`
    (a list of names), and either `sha256` (the token's digest: the file then
    holds no secret) or `token` itself. A bad file raises InvalidArgument
    naming the entry, never the token."""
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidArgument(f"cannot read token file {path}: {error.strerror}") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise InvalidArgument(f"token file {path} is not valid YAML or JSON: {error}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f"token file {path}: expected a top-level 'tokens' list")
    grants: dict[str, TokenGrant] = {}
    for index, entry in enumerate(entries, start=1):
        where = f"token file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}: expected a mapping with identity, role and token or sha256")
        identity = entry.get("identity")
        if not isinstance(identity, str) or not identity.strip():
            raise InvalidArgument(f"{where}: 'identity' (a name for the saga log) is required")
        role = parse_role(str(entry.get("role", "")))
        definitions = check_scope(entry, where)
        if "sha256" in entry:
            digest = str(entry["sha256"]).strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidArgument(f"{where}: 'sha256' must be 64 hex digits (sha256sum of the token)")
        elif isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
            digest = _digest(entry["token"])
        else:
            raise InvalidArgument(f"{where}: give 'sha256' (of the token) or 'token' (at least 16 characters)")
        if digest in grants:
            raise InvalidArgument(f"{where}: the same token is listed twice")
        grants[digest] = TokenGrant(identity.strip(), role, definitions)
    return grants


@dataclass(frozen=True)
class JwtKeys:
    """JWTs accepted as bearer tokens: signed by a key of this JSON Web Key
    Set, unexpired, and for `audience` and from `issuer` when those are set.
    The claims name the caller (`sub`), its role (`role`) and optionally the
    definitions it is limited to (`definitions`, a list)."""

    key_set: Any  # jwt.PyJWKSet
    audience: str | None = None
    issuer: str | None = None

    def verify(self, token: str) -> TokenGrant:
        """The grant a valid JWT carries; Unauthenticated saying why otherwise
        (never quoting the token)."""
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
            keys = [key for key in self.key_set.keys if kid is None or key.key_id == kid]
            if not keys:
                raise Unauthenticated(
                    f"the bearer token's key {quote(str(kid))} is not in the key set of serve --jwt-keys"
                )
            claims = jwt.decode(
                token,
                keys[0].key,
                algorithms=[keys[0].algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token (a JWT) has expired") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the bearer token (a JWT) is not valid here: {error}") from None
        try:
            role = parse_role(str(claims.get("role", "")))
        except InvalidArgument as error:
            raise Unauthenticated(f"the bearer token's 'role' claim: {error}") from None
        try:
            definitions = check_scope(claims, "the bearer token (a JWT)")
        except InvalidArgument as error:
            raise Unauthenticated(str(error)) from None
        return TokenGrant(str(claims["sub"]), role, definitions)


def load_jwt_keys(path: Path, *, audience: str | None = None, issuer: str | None = None) -> JwtKeys:
    """Reads a JSON Web Key Set (public keys) from `path`."""
    try:
        import jwt
    except ImportError:
        raise InvalidArgument("--jwt-keys needs PyJWT: install compensa[jwt]") from None
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidArgument(f"cannot read JWT key set {path}: {error.strerror}") from None
    try:
        key_set = jwt.PyJWKSet.from_json(text)
    except (jwt.PyJWKSetError, jwt.PyJWKError, ValueError) as error:
        raise InvalidArgument(f"JWT key set {path} is not a usable JSON Web Key Set: {error}") from None
    return JwtKeys(key_set, audience, issuer)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an "Authorization: Bearer TOKEN" value; None without one."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer TOKEN'")
    return token.strip()


@dataclass(frozen=True)
class AccessPolicy:
    """The deployment's access rules; `open` when nothing is configured.

    `certificate_roles` gives certificate names their roles and
    `certificate_scopes` (checked with `check_scope`) limits some of them to
    definitions; `other_certificates` is the role of a verified certificate
    not named there (None: such a certificate is refused), by default
    starter, as before roles existed.
    """

    certificate_roles: Mapping[str, Role] = field(default_factory=dict)
    certificate_scopes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    tokens: Mapping[str, TokenGrant] = field(default_factory=dict)
    other_certificates: Role | None = Role.STARTER
    jwt: JwtKeys | None = None

    @property
    def open(self) -> bool:
        return not self.certificate_roles and not self.tokens and self.jwt is None

    def identify(self, certificate: bytes | None, authorization: str | None, *, anonymous: str = "") -> Identity:
        """The caller, from a bearer token (checked first: a gateway with a
        certificate of its own may forward its users' tokens) or a verified
        client certificate (DER, as the peer presented it); Unauthenticated
        if neither is accepted. Every face calls this, so a certificate means
        the same everywhere."""
        # An open API has nothing to check a token against: it is ignored.
        token = None if self.open else bearer_token(authorization)
        if token is not None:
            # The token file first: one of its tokens may look like a JWT.
            grant = self._grant(token)
            if grant is not None:
                return Identity(grant.identity, grant.role, "token", grant.definitions)
            if self.jwt is not None and token.count(".") == 2:
                signed = self.jwt.verify(token)
                return Identity(signed.identity, signed.role, "jwt", signed.definitions)
            raise Unauthenticated("the bearer token is not recognised: check the token file of serve --tokens")
        if certificate is not None:
            return self._certificate_identity(read_certificate(certificate))
        if self.open:
            return Identity(anonymous, Role.OPERATOR, "open")
        raise Unauthenticated(
            "this deployment needs a caller identity: a bearer token ('authorization: Bearer TOKEN')"
            " or a client certificate it knows"
        )

    def _certificate_identity(self, names: CertificateNames) -> Identity:
        """A certificate's identity: the one name of it given a role (the
        common name or a DNS name: the log records the name that holds the
        role), else its common name (or first DNS name) with the role of
        other certificates. Unauthenticated, in one line, when that is
        ambiguous: a granted name where names count for nothing, or two
        granted names."""
        if not names.counted:
            raise Unauthenticated(
                "the client certificate has no common name or DNS name to name it by: ask its CA for one"
            )
        for where, text in names.elsewhere:
            if text in self.certificate_roles:
                raise Unauthenticated(
                    f"the client certificate carries {quote(text)}, a name given a role, as its {where};"
                    " only its common name and DNS names count: ask its CA to name it there alone"
                )
        granted = [name for name in names.counted if name in self.certificate_roles]
        if len(granted) > 1:
            raise Unauthenticated(
                f"the client certificate has {len(granted)} names given roles"
                f" ({', '.join(quote(name) for name in granted)}): ask its CA for a certificate with one"
            )
        if granted:
            name = granted[0]
            scope = self.certificate_scopes.get(name, frozenset())
            return Identity(name, self.certificate_roles[name], "certificate", scope)
        if self.open:
            return Identity(names.counted[0], Role.OPERATOR, "certificate")
        if self.other_certificates is not None:
            return Identity(names.counted[0], self.other_certificates, "certificate")
        raise PermissionDenied(f"client certificate {names.counted[0]} has no role: give it one with serve --role")

    def _grant(self, token: str) -> TokenGrant | None:
        digest = _digest(token)
        for known, grant in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return grant
        return None

    @staticmethod
    def authorize(identity: Identity, action: str, definition_name: str = "") -> None:
        """PermissionDenied naming what is missing unless `identity` may run
        `action` (a key of REQUIRED_ROLE) on sagas of `definition_name`."""
        required = REQUIRED_ROLE[action]
        if identity.role < required:
            raise PermissionDenied(
                f"{action} needs role {required.label}; {identity.describe()} lacks it"
            )
        if definition_name and not identity.may_see(definition_name):
            raise PermissionDenied(
                f"{action} on definition {definition_name!r}: {identity.describe()} is limited to"
                f" {', '.join(sorted(identity.definitions))}"
            )

    @staticmethod
    def require_visible(identity: Identity | None, saga_id: str, definition_name: str) -> None:
        """For a saga of `definition_name`: NotFound, worded as for a saga
        that does not exist, unless `identity` (None: an open API) may see it."""
        if identity is not None and not identity.may_see(definition_name):
            raise OutOfScope(
                saga_id, f"its definition {definition_name!r} is outside the scope of {identity.describe()}"
            )

    @staticmethod
    def visible_participants(identity: Identity, named: Mapping[str, frozenset[str]]) -> frozenset[str] | None:
        """The participants `identity` may see and set, given the participants
        each definition names (every version): those of its definitions; None
        for an identity of the whole deployment (every participant)."""
        if not identity.definitions:
            return None
        return frozenset().union(*(named.get(name, frozenset()) for name in identity.definitions))

    @staticmethod
    def require_settable_participant(
        identity: Identity, participant: str, named: Mapping[str, frozenset[str]]
    ) -> None:
        """A caller limited to some definitions may change only a participant
        that no other definition names (a new one included): the address of
        one another definition calls would receive that definition's calls."""
        if identity.definitions and any(
            participant in participants for name, participants in named.items() if name not in identity.definitions
        ):
            raise PermissionDenied(
                f"SetParticipant {quote(participant)}: a definition outside the scope of {identity.describe()}"
                " names this participant; an identity not limited to definitions must change it"
            )

    @staticmethod
    def require_whole_deployment(identity: Identity, action: str) -> None:
        """For what belongs to no definition (the alert log, participants'
        health): a caller limited to some definitions may not see it."""
        if identity.definitions:
            raise PermissionDenied(
                f"{action}: {identity.describe()} is limited to definitions"
                f" {', '.join(sorted(identity.definitions))}; the alert log is the whole deployment's"
            )

    @staticmethod
    def require_scope(identity: Identity, action: str, definition_name: str) -> None:
        """For calls over many sagas: a caller limited to some definitions
        must name one of them."""
        if identity.definitions and definition_name not in identity.definitions:
            raise PermissionDenied(
                f"{action}: {identity.describe()} is limited to definitions"
                f" {', '.join(sorted(identity.definitions))}; pass definition_name"
            )


class StreamLimit:
    """At most `limit` streams open at once per client (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Holds one stream slot of `client`; ResourceExhausted if none is free."""
        if self._limit and self._open.get(client, 0) >= self._limit:
            raise ResourceExhausted(
                f"{client} has {self._limit} streams open, the limit per client"
                " (serve --max-streams-per-client): close one first"
            )
        self._open[client] = self._open.get(client, 0) + 1
        try:
            yield
        finally:
            left = self._open[client] - 1
            if left:
                self._open[client] = left
            else:
                del self._open[client]


class RefusedCalls:
    """Refused calls leave a trace: each is counted by reason (`count`:
    "unauthenticated", "permission_denied", or "out_of_scope" for a saga
    answered as not found), and logged at most once per reason every
    `interval` seconds with how many were refused meanwhile, so that probing
    shows without flooding the log. Messages never hold a token."""

    def __init__(self, count: Callable[[str], None], *, interval: float = 10.0) -> None:
        self._count = count
        self._interval = interval
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def note(self, error: CompensaError, action: str, caller: str) -> None:
        """Counts `error` if it refused the call; logs it if its reason's interval has passed."""
        reason = _refusal_reason(error)
        if reason is None:
            return
        self._count(reason)
        now = time.monotonic()
        if now - self._last_logged.get(reason, -self._interval) < self._interval:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        unlogged = self._unlogged.pop(reason, 0)
        since = f" ({unlogged} more refused for this reason since the last such line)" if unlogged else ""
        why = f" ({error.why})" if isinstance(error, OutOfScope) else ""
        log.warning("refused %s from %s: %s %s%s%s", action, caller, error.code.name, error, why, since)


def _refusal_reason(error: CompensaError) -> str | None:
    if isinstance(error, OutOfScope):
        return "out_of_scope"
    if isinstance(error, (Unauthenticated, PermissionDenied)):
        return error.code.name.lower()
    return None
