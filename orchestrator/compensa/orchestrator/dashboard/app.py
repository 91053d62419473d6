"""The web dashboard: aiohttp in the orchestrator's own event loop.

Pages are rendered on the server (Jinja2, autoescaped); a small script keeps
the saga list live from `/live`, a server-sent event stream of the global log
that resumes after a reconnect from the browser's Last-Event-ID (the log
position of the last batch it got; with sagas partitioned over several
databases, a resume token holding one per database), through the same log
tails as WatchSagas.
Who may look and act is the `AccessPolicy` of the gRPC API: a bearer token
(header, or a sign-in session of the login form: sessions.py) or a client
certificate over TLS. Operator actions are POSTed forms carrying a
per-identity token, and refused from another origin (an Origin or Referer
header that is not the dashboard's own, `null` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from google.protobuf import any_pb2, descriptor_pool

from compensa.common.tls import TlsFiles
from compensa.orchestrator.api.auth import AccessPolicy, Identity, RefusedCalls, Role, StreamLimit
from compensa.orchestrator.api.log_tails import DeploymentLogs
from compensa.orchestrator.api.queries import SagaQueries
from compensa.orchestrator.api.streams import READ_BATCH
from compensa.orchestrator.dashboard import gantt
from compensa.orchestrator.dashboard.sessions import SESSION_COOKIE, Sessions
from compensa.orchestrator.definitions import NAME_PATTERN, shorthand_to_json
from compensa.orchestrator.engine.audit import finding_sides
from compensa.orchestrator.engine.bulk import JOB_COMMANDS, bulk_action_message, bulk_item_message, command_bulk_job
from compensa.orchestrator.engine.engine import DEFAULT_STUCK_SECONDS, SagaEngine
from compensa.orchestrator.engine.operations import operator_event
from compensa.orchestrator.shared import payloads, records
from compensa.orchestrator.shared.errors import (
    CompensaError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    http_status_of,
    quote,
)
from compensa.orchestrator.shared.limits import (
    MAX_SAGA_ID_CHARS,
    MAX_STUCK_FOR_SECONDS,
    check_filter,
    check_text,
)
from compensa.orchestrator.shared.selection import ACTIONS, for_action, parse_filter
from compensa.orchestrator.shared.timeline import event_type_name, saga_state_name, short_duration, step_state_name
from compensa.orchestrator.store import StoredEvent
from compensa.v1 import bulk_pb2, saga_pb2

log = logging.getLogger("compensa.dashboard")

__all__ = ["Dashboard", "server_ssl_context"]

#: Sagas the list shows (newest first).
LIST_SIZE = 100
#: Sagas a bulk action's dry run shows.
_PREVIEW_SIZE = 10
#: A live list gets one message per this many seconds at most, with the
#: latest event of each saga that changed meanwhile: a busy log costs a few
#: small messages a second per open list, not one per event.
LIVE_WINDOW_SECONDS = 0.25
#: How long a live list's reader lets events gather before it takes them.
LIVE_READ_WINDOW_SECONDS = 0.05

#: The caller, once known, for the error page's header.
_IDENTITY = web.RequestKey("identity", Identity)
_ERROR_TITLES = {
    400: "Cannot do that",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible now",
    429: "Too many open streams",
}
#: Scripts and styles from the dashboard itself only (the timeline places its
#: boxes with inline style attributes); never framed by another site.
_CONTENT_SECURITY_POLICY = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
_ACTIONS = {"cancel": "CancelSaga", "retry": "RetrySaga", "resolve": "ResolveSaga"}
#: What a saga page may say was done (`?done=` after an action): only these,
#: never text from the link.
_DONE_NOTICES = {action: action for action in _ACTIONS}
#: The bulk action commands a job page offers, with the call each is.
_JOB_COMMANDS = {"pause": "PauseBulkAction", "resume": "ResumeBulkAction", "cancel": "CancelBulkAction"}
#: Skipped and failed sagas a job page shows, most recent first.
_JOB_PROBLEMS_SHOWN = 100
_STATES = [state for state in saga_pb2.SagaState.values() if state]
_HERE = Path(__file__).parent


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """The server's certificate; with a CA, client certificates it signed are
    asked for and verified, but optional: a browser without one signs in with
    a token instead."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate (DER), when one was presented and verified."""
    connection = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    if not isinstance(connection, ssl.SSLObject) or not connection.getpeercert():
        return None
    return connection.getpeercert(binary_form=True)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _payload_json(payload: any_pb2.Any, pool: descriptor_pool.DescriptorPool) -> str:
    """A payload as indented JSON, decoded with its definition's registered types."""
    if not payload.type_url:
        return ""
    return json.dumps(payloads.to_json_dict(payload, pool), indent=2, ensure_ascii=False)


class _LiveItems:
    """Each event's JSON for the live lists, encoded once however many lists
    send it (keyed by saga and log position, as EventViews; the oldest are
    dropped first)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: dict[tuple[str, int], str] = {}

    def of(self, stored: StoredEvent) -> str:
        key = (stored.saga_id, stored.position)
        item = self._items.get(key)
        if item is None:
            if len(self._items) >= self._size:
                del self._items[next(iter(self._items))]
            event = stored.event
            item = self._items[key] = json.dumps(
                {
                    "saga_id": stored.saga_id,
                    "definition": stored.definition_name,
                    "state": saga_state_name(event.saga_state),
                    "sequence": event.sequence,
                    "event": event_type_name(event.type).lower(),  # type: ignore[arg-type]
                    "step": event.step_name,
                    "time": event.time,
                    "position": stored.position,
                },
                separators=(",", ":"),
            )
        return item

    def message(self, latest: Iterable[StoredEvent], seen: str) -> bytes:
        """One server-sent message of these events, with `seen` (where the
        list stands in the log: DeploymentLogs.cursor_text) as its id, where
        a reconnect resumes."""
        data = ",".join(self.of(stored) for stored in latest)
        return f"id: {seen}\ndata: [{data}]\n\n".encode()


@dataclass(frozen=True)
class _Filters:
    state: int
    definition: str
    stuck: str
    stuck_seconds: float | None
    search: str

    @classmethod
    def of(cls, request: web.Request, identity: Identity) -> _Filters:
        query = request.query
        state_text = query.get("state", "").strip().upper()
        state = 0
        if state_text:
            try:
                state = saga_pb2.SagaState.Value(f"SAGA_STATE_{state_text}")
            except ValueError:
                raise InvalidArgument(f"state {quote(state_text)} is not a saga state") from None
        stuck = query.get("stuck", "").strip()
        stuck_seconds = None
        if stuck:
            json_text = shorthand_to_json(stuck)
            if json_text is None:
                raise InvalidArgument(f"stuck for {quote(stuck)}: give a duration such as 90s, 10m or 2h")
            stuck_seconds = float(json_text.removesuffix("s"))
            if not 0 < stuck_seconds <= MAX_STUCK_FOR_SECONDS:
                raise InvalidArgument(f"stuck for must be positive and at most {MAX_STUCK_FOR_SECONDS // 86400} days")
        definition = check_filter(query.get("definition", "").strip(), "definition", NAME_PATTERN, "definition")
        if identity.definitions and definition not in identity.definitions:
            # A caller limited to some definitions sees one of them at a time.
            definition = sorted(identity.definitions)[0]
        search = check_text(query.get("q", "").strip(), "q (the saga id searched for)", max_chars=MAX_SAGA_ID_CHARS)
        return cls(state, definition, stuck, stuck_seconds, search)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    """The dashboard's aiohttp application over a running engine."""

    def __init__(
        self,
        engine: SagaEngine,
        logs: DeploymentLogs,
        access: AccessPolicy,
        streams: StreamLimit,
        refused_calls: RefusedCalls,
        *,
        live_buffer_events: int,
        tls: bool,
    ) -> None:
        self._engine = engine
        self._store = engine.store
        self._logs = logs
        self._access = access
        self._queries = SagaQueries(engine, access)
        self._streams = streams
        self._refused_calls = refused_calls
        self._sessions = Sessions()
        self._tls = tls
        self._form_key = os.urandom(32)
        self._live_items = _LiveItems(4 * live_buffer_events)
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._templates.filters.update(
            time=_time, age=lambda seconds: short_duration(max(seconds, 0.0)), state=saga_state_name,
            step_state=step_state_name,
            bulk_kind=lambda kind: bulk_pb2.BulkActionKind.Name(kind).removeprefix("BULK_ACTION_KIND_").lower(),
            bulk_state=lambda state: bulk_pb2.BulkActionState.Name(state).removeprefix("BULK_ACTION_STATE_").lower(),
            bulk_outcome=lambda item: bulk_pb2.BulkItemOutcome.Name(item).removeprefix("BULK_ITEM_OUTCOME_").lower(),
        )
        self.app = web.Application(middlewares=[self._answer_errors])
        self.app.add_routes([
            web.get("/", self._index),
            web.get("/counts", self._counts),
            web.get("/live", self._live),
            web.get("/sagas/{saga_id}", self._saga),
            web.get("/bulk", self._bulk),
            web.get("/bulk/{bulk_action_id}", self._bulk_job),
            web.post("/bulk/{bulk_action_id}/{command}", self._command_bulk_job),
            web.get("/audit", self._audit),
            web.post("/sagas/{saga_id}/{action}", self._act),
            web.get("/login", self._login_form),
            web.post("/login", self._login),
            web.post("/logout", self._logout),
            web.static("/static", str(_HERE / "static")),
        ])

    # -- access

    def _identify(self, request: web.Request) -> Identity:
        authorization = request.headers.get("Authorization")
        if authorization is None:
            token = self._sessions.token(request.cookies.get(SESSION_COOKIE))
            authorization = f"Bearer {token}" if token is not None else None
        identity = self._access.identify(
            _peer_certificate(request), authorization, anonymous=f"dashboard {request.remote or ''}".strip()
        )
        request[_IDENTITY] = identity
        self._access.authorize(identity, "Dashboard")
        return identity

    def _form_token(self, identity: Identity) -> str:
        return hmac.new(self._form_key, f"{identity.how}:{identity.name}".encode(), hashlib.sha256).hexdigest()[:32]

    def _same_origin(self, request: web.Request) -> None:
        """PermissionDenied for a form posted from another page than the
        dashboard's: an Origin other than its own (`null`, sent by sandboxed
        frames and some redirects, included), or else a foreign Referer.
        Browsers send one of them with every form; a client sending neither
        is not a browser and proves itself with its token."""
        own = f"{request.scheme}://{request.host}"
        origin = request.headers.get("Origin")
        referer = request.headers.get("Referer")
        if origin is not None:
            foreign = origin if origin != own else None
        elif referer is not None:
            foreign = referer if referer != own and not referer.startswith(own + "/") else None
        else:
            foreign = None
        if foreign is not None:
            raise PermissionDenied(f"a form from {quote(foreign)} may not act here: use the dashboard's own page")

    @web.middleware
    async def _answer_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as error:
            if isinstance(error, CompensaError):
                self._refused_calls.note(error, f"dashboard {request.method} {request.path}", str(request.remote))
            else:
                log.exception("dashboard %s %s failed", request.method, request.path)
            status, message = http_status_of(error)
            if request.path == "/live" or request.headers.get("Accept", "") == "application/json":
                return web.json_response({"error": message}, status=status)
            if status == 401:
                return self._page("login.html", status=status, message=message, identity=None, title="Sign in")
            saga_id = request.match_info.get("saga_id")
            return self._page(
                "error.html",
                status=status,
                message=message,
                identity=request.get(_IDENTITY),
                title=_ERROR_TITLES.get(status, "Something went wrong"),
                back=f"/sagas/{saga_id}" if saga_id and status != 404 else "",
            )

    def _page(self, template: str, *, status: int = 200, **values: Any) -> web.Response:
        html = self._templates.get_template(template).render(**values)
        response = web.Response(text=html, status=status, content_type="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = _CONTENT_SECURITY_POLICY
        return response

    # -- pages

    async def _summary(self, identity: Identity, definition: str) -> dict[str, Any]:
        now = self._engine.clock.now()
        rows = await self._store.summarize_sagas(
            definition_name=definition, stuck_before=now - DEFAULT_STUCK_SECONDS
        )
        rows = [row for row in rows if identity.may_see(row.definition_name)]
        by_definition: dict[str, dict[str, Any]] = {}
        totals = {"all": 0, "stuck": 0, "unresolved": 0, **{saga_state_name(s): 0 for s in _STATES}}
        for row in rows:
            entry = by_definition.setdefault(
                row.definition_name, {"name": row.definition_name, "states": {}, "stuck": 0, "unresolved": 0}
            )
            name = saga_state_name(row.state)
            entry["states"][name] = row.count
            entry["stuck"] += row.stuck
            entry["unresolved"] += row.unresolved
            totals[name] += row.count
            totals["all"] += row.count
            totals["stuck"] += row.stuck
            totals["unresolved"] += row.unresolved
        # The participants' shared health is the whole deployment's, as the
        # alert log is: not shown to an identity scoped to some definitions.
        stored = [] if identity.definitions else await self._store.list_participants()
        unreachable = [
            {"name": participant.name, "address": participant.address, "since": participant.unhealthy_since,
             "alerted": participant.alerted_at is not None}
            for participant in stored
            if participant.unhealthy_since is not None
        ]
        held = [
            {"name": participant.name, "by": participant.hold.by, "since": participant.hold.at,
             "reason": participant.hold.reason}
            for participant in stored
            if participant.hold is not None
        ]
        return {
            "definitions": list(by_definition.values()),
            "totals": totals,
            "states": [saga_state_name(s) for s in _STATES],
            "stuck_after": short_duration(DEFAULT_STUCK_SECONDS),
            "unreachable": unreachable,
            "held": held,
            "now": now,
        }

    async def _index(self, request: web.Request) -> web.Response:
        identity = self._identify(request)
        filters = _Filters.of(request, identity)
        # What people look at, read where reads may lag; each read in the block
        # is no older than the one before it.
        with self._store.tolerating_lag():
            # The live list resumes from here: whatever commits after this read
            # reaches the page through /live, even if the list below misses it.
            position = await self._logs.cursor_text(await self._logs.heads())
            now = self._engine.clock.now()
            sagas = await self._store.list_sagas(
                state=filters.state,
                definition_name=filters.definition,
                updated_before=None if filters.stuck_seconds is None else now - filters.stuck_seconds,
                page_size=LIST_SIZE,
                after=None,
                id_contains=filters.search,
            )
            last_events = {
                stored.saga_id: stored
                for stored in await self._store.read_events([(saga.saga_id, saga.sequence) for saga in sagas])
            }
            definitions = [
                definition.name for definition in await self._store.list_definitions(1000, "")
                if identity.may_see(definition.name)
            ]
            summary = await self._summary(identity, filters.definition)
        return self._page(
            "index.html",
            title="Sagas",
            identity=identity,
            form_token=self._form_token(identity),
            summary=summary,
            sagas=[_row(saga, last_events.get(saga.saga_id)) for saga in sagas],
            filters=filters,
            definitions=definitions,
            states=[saga_state_name(s) for s in _STATES],
            position=position,
            now=now,
            list_size=LIST_SIZE,
        )

    async def _bulk(self, request: web.Request) -> web.Response:
        """Bulk actions with their progress (operators); with `filter` and
        `action` in the query, what that action would touch (a dry run)."""
        identity = self._identify(request)
        self._access.authorize(identity, "ListBulkActions")
        with self._store.tolerating_lag():
            listed = await self._store.list_bulk_jobs(LIST_SIZE, None)
        jobs = [bulk_action_message(job) for job in listed if identity.may_see(job.definition_name)]
        text = request.query.get("filter", "")
        action = request.query.get("action", "retry")
        preview = None
        if text:
            if action not in ACTIONS:
                raise InvalidArgument(f"action must be one of {', '.join(ACTIONS)}, got {quote(action)}")
            selection = for_action(ACTIONS[action], parse_filter(text))
            self._access.require_scope(identity, "StartBulkAction", selection.definition_name)
            count, sample = await self._store.count_selection(
                selection, now=self._engine.clock.now(), sample_size=_PREVIEW_SIZE
            )
            preview = {"count": count, "sagas": [_row(saga, None) for saga in sample]}
        return self._page(
            "bulk.html", title="Bulk actions", identity=identity, jobs=jobs, actions=list(ACTIONS), action=action,
            filter=text, preview=preview,
        )

    async def _bulk_job(self, request: web.Request) -> web.Response:
        """One bulk action: its progress, the sagas it skipped or failed on
        with each reason, and the commands its state allows."""
        identity = self._identify(request)
        self._access.authorize(identity, "GetBulkAction")
        job = await self._queries.visible_bulk_job(identity, request.match_info["bulk_action_id"], field="job id")
        problems = await self._store.bulk_problems(job.bulk_action_id, _JOB_PROBLEMS_SHOWN)
        commands = [command for command, (allowed_from, _) in JOB_COMMANDS.items() if job.state in allowed_from]
        done = request.query.get("done", "")
        return self._page(
            "bulk_job.html", title=f"Bulk action {job.bulk_action_id}", identity=identity,
            form_token=self._form_token(identity), job=bulk_action_message(job),
            problems=[bulk_item_message(item) for item in problems], problems_shown=_JOB_PROBLEMS_SHOWN,
            commands=commands, done=done if done in _JOB_COMMANDS else "",
        )

    async def _command_bulk_job(self, request: web.Request) -> web.StreamResponse:
        identity = self._identify(request)
        self._same_origin(request)
        command = request.match_info["command"]
        if command not in _JOB_COMMANDS:
            raise NotFound(f"no command {quote(command)}: use {', '.join(_JOB_COMMANDS)}")
        form = await request.post()
        if not hmac.compare_digest(str(form.get("form_token", "")), self._form_token(identity)):
            raise PermissionDenied("the form is stale or not from this dashboard: reload the page and try again")
        self._access.authorize(identity, _JOB_COMMANDS[command])
        job = await self._queries.visible_bulk_job(identity, request.match_info["bulk_action_id"], field="job id")
        await command_bulk_job(self._store, job, command, self._engine.clock.now())
        log.info("%s of bulk action %s by %s from the dashboard", command, job.bulk_action_id, identity.describe())
        raise web.HTTPSeeOther(f"/bulk/{job.bulk_action_id}?done={command}")

    async def _audit(self, request: web.Request) -> web.Response:
        """The audit (`compensa audit`, `serve --audit-interval`): where each
        participant stands, clean up to which saga, and the discrepancies
        found, newest first, with what the log and the participant each say.
        As the alert log whose AUDIT alerts they are: the whole deployment's."""
        identity = self._identify(request)
        self._access.authorize(identity, "WatchAlerts")
        self._access.require_whole_deployment(identity, "The audit page")
        with self._store.tolerating_lag():
            progress = {each.participant: each for each in await self._store.list_audit_progress()}
            counts = await self._store.count_audit_findings()
            addresses = {each.name: each.address for each in await self._store.list_participants()}
            names = sorted(addresses.keys() | progress.keys() | (counts.keys() - {""}))
            wanted = request.query.get("participant", "")
            if wanted and wanted not in names:
                raise NotFound(f"no participant {quote(wanted)} with a stored address or an audit")
            findings = await self._store.list_audit_findings(LIST_SIZE, participant=wanted or None)
        return self._page(
            "audit.html",
            title="Audit",
            identity=identity,
            participants=[
                {
                    "name": name,
                    "address": addresses.get(name, ""),
                    "progress": progress.get(name),
                    "discrepancies": counts.get(name, 0),
                }
                for name in names
            ],
            saga_discrepancies=counts.get("", 0),
            findings=[{"found": found, "sides": finding_sides(found)} for found in findings],
            wanted=wanted,
            list_size=LIST_SIZE,
        )

    async def _counts(self, request: web.Request) -> web.Response:
        identity = self._identify(request)
        filters = _Filters.of(request, identity)
        with self._store.tolerating_lag():
            summary = await self._summary(identity, filters.definition)
        return self._page("counts.html", summary=summary)

    async def _saga(self, request: web.Request) -> web.Response:
        identity = self._identify(request)
        saga_id = request.match_info["saga_id"]
        saga = await self._queries.visible_saga(identity, saga_id, field="saga id")
        view = await self._queries.saga_view(saga)
        pool = payloads.pool_of((await self._queries.plan_of(saga)).definition)
        events: list[StoredEvent] = []
        while True:
            batch = await self._store.read_saga_events(saga_id, events[-1].event.sequence if events else 0, READ_BATCH)
            events += batch
            if len(batch) < READ_BATCH:
                break
        now = self._engine.clock.now()
        chart = gantt.chart([step.name for step in saga.steps], [stored.event for stored in events], now)
        steps = [
            {
                "name": step.name,
                "state": step_state_name(step.state),
                "participant": step.participant,
                "attempts": step.attempts,
                "compensate_attempts": step.compensate_attempts,
                "last_error": step.last_error,
                "waiting_for": step.waiting_for,
                "start": _time(step.start_time.ToNanoseconds() / 1e9) if step.HasField("start_time") else "",
                "finish": _time(step.finish_time.ToNanoseconds() / 1e9) if step.HasField("finish_time") else "",
                "output": _payload_json(step.output, pool) if step.HasField("output") else "",
            }
            for step in view.steps
        ]
        return self._page(
            "saga.html",
            title=f"Saga {saga_id}",
            identity=identity,
            form_token=self._form_token(identity),
            saga=saga,
            state=saga_state_name(view.state),
            input_json=_payload_json(view.input, pool),
            input_type=payloads.type_name_of(view.input),
            steps=steps,
            waiting_for=view.waiting_for,
            events=[_event_row(stored) for stored in events],
            chart=chart,
            actions=_available_actions(saga),
            may_act=identity.role >= Role.OPERATOR,
            position=events[-1].position if events else 0,
            done=_DONE_NOTICES.get(request.query.get("done", ""), ""),
        )

    async def _act(self, request: web.Request) -> web.StreamResponse:
        identity = self._identify(request)
        self._same_origin(request)
        action = _ACTIONS.get(request.match_info["action"])
        if action is None:
            raise NotFound(f"no action {request.match_info['action']!r}: use cancel, retry or resolve")
        form = await request.post()
        if not hmac.compare_digest(str(form.get("form_token", "")), self._form_token(identity)):
            raise PermissionDenied("the form is stale or not from this dashboard: reload the page and try again")
        saga_id = request.match_info["saga_id"]
        text = str(form.get("note" if action == "ResolveSaga" else "reason", ""))
        event = operator_event(action, identity.actor(""), text)
        saga = await self._queries.visible_saga(identity, saga_id, field="saga id")
        self._access.authorize(identity, action, saga.definition_name)
        await self._engine.apply_external(saga_id, event)
        log.info("%s of saga %s by %s from the dashboard", action, saga_id, identity.describe())
        raise web.HTTPSeeOther(f"/sagas/{saga_id}?done={request.match_info['action']}")

    async def _live(self, request: web.Request) -> web.StreamResponse:
        identity = self._identify(request)
        filters = _Filters.of(request, identity)
        resume = await self._logs.read_cursor(
            request.headers.get("Last-Event-ID") or request.query.get("after", "0"), "Last-Event-ID or after"
        )
        wanted = (filters.definition, filters.state)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
        })
        with self._streams.slot(_stream_client(identity, request)):
            await response.prepare(request)
            # Tells the browser to come back after 1 s if the stream breaks.
            await response.write(b"retry: 1000\n\n")
            await self._send_live(response, resume, wanted)
        return response

    async def _send_live(self, response: web.StreamResponse, after: dict[int, int], wanted: tuple[str, int]) -> None:
        """Follows the log (each database's) from `after` and sends, at most
        once per window, the latest event of each saga that changed
        meanwhile. The reader keeps up with the log's tail between messages
        (it never falls a buffer behind and re-reads the database); only the
        sending waits."""
        latest: dict[str, StoredEvent] = {}
        seen = dict(after)
        changed = asyncio.Event()

        async def collect() -> None:
            followed = self._logs.follow_all(
                after, wanted=wanted, max_batch=READ_BATCH,
                # Woken once per window rather than once per group commit
                # (hundreds a second at full load), and well inside the feed's
                # buffer, so it never falls behind into reading the database.
                window=LIVE_READ_WINDOW_SECONDS,
            )
            async with contextlib.aclosing(followed):
                async for index, batch in followed:
                    latest.update((stored.saga_id, stored) for stored in batch)
                    seen[index] = batch[-1].position
                    changed.set()

        collector = asyncio.create_task(collect(), name="compensa-dashboard-live")
        try:
            while True:
                waiting = asyncio.ensure_future(changed.wait())
                await asyncio.wait((waiting, collector), return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if collector.done():
                    collector.result()  # its error, if it failed
                    return
                changed.clear()
                # In log order (commit time across databases): the page puts
                # each new saga on top as it comes.
                in_order = sorted(latest.values(), key=_position if not self._logs.partitioned else _event_time)
                message = self._live_items.message(in_order, await self._logs.cursor_text(seen))
                latest.clear()
                await response.write(message)
                await asyncio.sleep(LIVE_WINDOW_SECONDS)  # a message per window at most
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    async def _login_form(self, request: web.Request) -> web.Response:
        return self._page("login.html", title="Sign in", identity=None, message="")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        self._same_origin(request)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        if not token:
            raise InvalidArgument("paste your access token")
        identity = self._access.identify(None, f"Bearer {token}")
        self._access.authorize(identity, "Dashboard")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            SESSION_COOKIE, self._sessions.open(token), httponly=True, samesite="Strict", secure=self._tls, path="/"
        )
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self._same_origin(request)
        self._sessions.close(request.cookies.get(SESSION_COOKIE))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response


def _position(stored: StoredEvent) -> int:
    return stored.position


def _event_time(stored: StoredEvent) -> float:
    return stored.event.time


def _stream_client(identity: Identity, request: web.Request) -> str:
    if identity.how != "open":
        return f"{identity.how} {identity.name}"
    return f"client {request.remote}"


def _row(saga: records.SagaRecord, last_event: StoredEvent | None) -> dict[str, Any]:
    active = next(
        (step.name for step in saga.steps if step.state in (records.STEP_RUNNING, records.STEP_WAITING,
                                                            records.STEP_COMPENSATING)),
        "",
    )
    return {
        "saga_id": saga.saga_id,
        "definition": saga.definition_name,
        "version": saga.definition_version,
        "state": saga_state_name(saga.state),
        "sequence": saga.sequence,
        "step": active,
        "created": saga.created_at,
        "updated": saga.updated_at,
        "awaiting_person": records.awaits_a_person(saga),
        # As the live list writes it (_LiveItems).
        "event": event_type_name(last_event.event.type).lower() if last_event else "",  # type: ignore[arg-type]
    }


def _event_row(stored: StoredEvent) -> dict[str, Any]:
    event = stored.event
    return {
        "sequence": event.sequence,
        "position": stored.position,
        "time": _time(event.time),
        "type": event_type_name(event.type),  # type: ignore[arg-type]
        "step": event.step_name,
        "attempt": event.attempt or "",
        "state": saga_state_name(event.saga_state),
        "message": event.message,
        "actor": event.actor,
    }


def _available_actions(saga: records.SagaRecord) -> list[str]:
    if saga.state == records.RUNNING:
        return ["cancel"]
    if records.awaits_a_person(saga):
        return ["retry", "resolve"]
    return []

