"""Who calls, and what they may do: roles for the gRPC API and the dashboard.

Three roles, each including the one before: reader (get, list, watch, status,
the dashboard), starter (+ StartSaga, CompleteStep) and operator (+ cancel,
retry, resolve, register definitions and participant addresses). An identity comes from a verified client
certificate (its common name or a subject alternative name, given a role by
`serve --operator NAME` or `--role NAME=ROLE`) or from a bearer token: listed in
a token file (`serve --tokens FILE`), or a JWT signed by a key of a configured
key set (`serve --jwt-keys FILE`) carrying `sub`, `role` and optionally
`definitions` claims; tokens may be scoped to definition names.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compensa.orchestrator.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated

__all__ = [
    "REQUIRED_ROLE",
    "AccessPolicy",
    "Identity",
    "JwtKeys",
    "Role",
    "StreamLimit",
    "TokenGrant",
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
}


def parse_role(text: str) -> Role:
    """"reader", "starter" or "operator" (any case); InvalidArgument otherwise."""
    try:
        return Role[text.strip().upper()]
    except KeyError:
        raise InvalidArgument(f"role {text!r} is not one of reader, starter, operator") from None


@dataclass(frozen=True)
class Identity:
    """A caller as the deployment knows it.

    `how` is "certificate", "token" or "open" (nothing configured: whoever
    calls is trusted as the name it claims). `definitions` limits the caller
    to sagas of those definitions; empty means every definition.
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
        """Who acted, for the saga's log: the verified name, next to the
        actor the request claims when that differs."""
        if self.how == "open" or not self.name:
            return claimed or self.name
        if claimed and claimed != self.name:
            return f"{claimed} ({self.how} {self.name})"
        return self.name

    def may_see(self, definition_name: str) -> bool:
        return not self.definitions or definition_name in self.definitions


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
        definitions = entry.get("definitions", [])
        if not isinstance(definitions, list) or not all(isinstance(name, str) and name for name in definitions):
            raise InvalidArgument(f"{where}: 'definitions' must be a list of definition names")
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
        grants[digest] = TokenGrant(identity.strip(), role, frozenset(definitions))
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
                raise Unauthenticated(f"the bearer token's key {kid!r} is not in the key set of serve --jwt-keys")
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
        definitions = claims.get("definitions", [])
        if not isinstance(definitions, list) or not all(isinstance(name, str) for name in definitions):
            raise Unauthenticated("the bearer token's 'definitions' claim must be a list of definition names")
        return TokenGrant(str(claims["sub"]), role, frozenset(definitions))


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

    `certificate_roles` gives certificate names their roles;
    `other_certificates` is the role of a verified certificate not named
    there (None: such a certificate is refused), by default starter, as
    before roles existed.
    """

    certificate_roles: Mapping[str, Role] = field(default_factory=dict)
    tokens: Mapping[str, TokenGrant] = field(default_factory=dict)
    other_certificates: Role | None = Role.STARTER
    jwt: JwtKeys | None = None

    @property
    def open(self) -> bool:
        return not self.certificate_roles and not self.tokens and self.jwt is None

    def identify(self, certificate_names: Iterable[str], authorization: str | None, *, anonymous: str = "") -> Identity:
        """The caller, from a bearer token (checked first: a gateway with a
        certificate of its own may forward its users' tokens) or a verified
        client certificate; Unauthenticated if neither is accepted."""
        # An open API has nothing to check a token against: it is ignored.
        token = None if self.open else bearer_token(authorization)
        if token is not None:
            if self.jwt is not None and token.count(".") == 2:
                signed = self.jwt.verify(token)
                return Identity(signed.identity, signed.role, "token", signed.definitions)
            grant = self._grant(token)
            if grant is None:
                raise Unauthenticated("the bearer token is not recognised: check the token file of serve --tokens")
            return Identity(grant.identity, grant.role, "token", grant.definitions)
        names = list(certificate_names)
        if names:
            if self.open:
                return Identity(names[0], Role.OPERATOR, "certificate")
            # Named in the log by its first name (the common name), whichever
            # of its names holds the role.
            roles = [self.certificate_roles[name] for name in names if name in self.certificate_roles]
            if roles:
                return Identity(names[0], max(roles), "certificate")
            if self.other_certificates is not None:
                return Identity(names[0], self.other_certificates, "certificate")
            raise PermissionDenied(f"client certificate {names[0]} has no role: give it one with serve --role")
        if self.open:
            return Identity(anonymous, Role.OPERATOR, "open")
        raise Unauthenticated(
            "this deployment needs a caller identity: a bearer token ('authorization: Bearer TOKEN')"
            " or a client certificate it knows"
        )

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
