"""The web dashboard over HTTP (aiohttp's client against `serve --http`):
identities and roles, counts, filters, the live list's server-sent events and
their resumption, the saga page's timeline and payloads, and operator actions
with their form token. A real browser drives it in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from dashboard_rig import TOKENS, dashboard_rig
from harness import REPO, checkout_stack, poll_until

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.v1 import bulk_pb2, orchestrator_pb2, saga_pb2

S = saga_pb2


def _session(who: str | None) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30))


async def _get(url: str, who: str | None = "reader") -> tuple[int, str]:
    async with _session(who) as session, session.get(url) as response:
        return response.status, await response.text()


def _listed(html: str) -> list[str]:
    return re.findall(r'<tr data-saga-id="([^"]+)"', html)


def _form_token(html: str) -> str:
    match = re.search(r'name="form_token" value="([0-9a-f]+)"', html)
    assert match, "no form on the page"
    return match.group(1)


async def _live(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, list[dict[str, object]]]]:
    """(id, events) of each server-sent message of `url`, forever."""
    async with session.get(url, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        message: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line:
                field, _, value = line.partition(": ")
                message[field] = value
            elif "data" in message:
                yield int(message["id"]), json.loads(message["data"])
                message = {}
            else:
                message = {}


async def test_pages_need_an_identity_and_a_reader_may_look_but_not_act(
    tmp_path: Path, make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await rig.failed_for_a_person("page-1")
        status, html = await _get(rig.url + "/", who=None)
        assert status == 401 and 'name="token"' in html and "needs a caller identity" in html
        status, html = await _get(rig.url + "/live", who=None)
        assert status == 401 and "needs a caller identity" in json.loads(html)["error"]
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer not-a-token-at-all"}) as session:
            async with session.get(rig.url + "/") as response:
                assert response.status == 401 and "not recognised" in await response.text()

        status, html = await _get(rig.url + "/sagas/page-1", who="reader")
        assert status == 200 and "token viewer (role reader)" in html
        assert "These need role operator" in html  # the form is shown, and says who may use it
        async with _session("reader") as session:
            answer = await session.post(
                rig.url + "/sagas/page-1/resolve", data={"form_token": _form_token(html), "note": "done by hand"},
                allow_redirects=False,
            )
            assert answer.status == 403
            assert "ResolveSaga needs role operator; token viewer (role reader) lacks it" in await answer.text()
        assert (await rig.saga("page-1")).resolution_note == ""
        # A token limited to another definition does not see this saga.
        status, html = await _get(rig.url + "/sagas/page-1", who="elsewhere")
        assert status == 404 and "saga &#39;page-1&#39; not found" in html
        status, html = await _get(rig.url + "/", who="elsewhere")
        assert status == 200 and _listed(html) == []

        # The login form sets the token as an HttpOnly, same-site cookie.
        # (unsafe: the cookie jar keeps cookies of an IP address only when told to.)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            answer = await browser.post(rig.url + "/login", data={"token": TOKENS["reader"]}, allow_redirects=False)
            assert answer.status == 303
            cookie = answer.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with browser.get(rig.url + "/") as page:
                assert page.status == 200 and _listed(await page.text()) == ["page-1"]
    assert not any(token in record.getMessage() for record in caplog.records for token in TOKENS.values())


async def test_counts_and_filters_by_state_definition_stuck_and_saga_id(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await rig.begin("order-ok-1")
        await rig.final("order-ok-1")
        await rig.failed_for_a_person("order-bad-1")
        rig.participant.script("execute", "reserve", ("sleep", 30.0))
        await rig.begin("slow-1")
        await rig.until("slow-1", lambda saga: saga.steps[0].state == S.STEP_STATE_RUNNING
                        and saga.steps[1].state == S.STEP_STATE_SUCCEEDED)

        status, html = await _get(rig.url + "/")
        assert status == 200
        assert _listed(html) == ["slow-1", "order-bad-1", "order-ok-1"]
        # Each row names its saga's last event, as the live list's updates do.
        last_events = dict(re.findall(
            r'<tr data-saga-id="([^"]+)".*?<td data-field="event" class="muted">([^<]*)</td>', html, re.S
        ))
        assert last_events == {
            "slow-1": "step succeeded", "order-bad-1": "alert raised", "order-ok-1": "saga succeeded"
        }, last_events
        assert re.search(r'Awaiting a person</div><div class="value" id="total-unresolved">1<', html)
        assert re.search(r'<td class="num hot"><a href="/\?definition=board&amp;state=failed">1</a>', html)
        assert _listed((await _get(rig.url + "/?state=failed"))[1]) == ["order-bad-1"]
        assert _listed((await _get(rig.url + "/?q=order-"))[1]) == ["order-bad-1", "order-ok-1"]
        assert _listed((await _get(rig.url + "/?definition=board&q=ok"))[1]) == ["order-ok-1"]
        assert _listed((await _get(rig.url + "/?definition=none"))[1]) == []
        assert _listed((await _get(rig.url + "/?stuck=1h"))[1]) == []
        assert _listed((await _get(rig.url + "/?stuck=1ms"))[1]) == ["slow-1"]
        status, html = await _get(rig.url + "/?stuck=soon")
        assert status == 400 and "give a duration such as 90s, 10m or 2h" in html
        status, html = await _get(rig.url + "/?state=lost")
        assert status == 400 and "state &#39;LOST&#39; is not a saga state" in html
        status, html = await _get(rig.url + "/counts")
        assert status == 200 and 'id="total-all">3<' in html


async def test_the_counts_show_participants_no_replica_reaches_to_those_who_see_the_whole_deployment(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    # Nothing listens at port 1: every health probe of "gone" fails.
    async with dashboard_rig(
        tmp_path, make_postgres_url, participants={"gone": "127.0.0.1:1"},
        participant_health_seconds=0.1, alert_participant_unhealthy_seconds=0.5,
    ) as rig:
        async def shown() -> str | None:
            status, html = await _get(rig.url + "/counts")
            assert status == 200
            return html if 'data-participant="gone"' in html and ">raised<" in html else None

        html = await poll_until(shown, timeout=20)
        assert 'id="participants-unreachable"' in html and "127.0.0.1:1" in html
        assert 'data-participant="scripted"' not in html
        # A token limited to some definitions does not see the deployment's participants.
        status, html = await _get(rig.url + "/counts", who="elsewhere")
        assert status == 200 and "participants-unreachable" not in html
        status, html = await _get(rig.url + "/", who="reader")
        assert 'data-participant="gone"' in html


async def test_the_live_list_streams_the_log_and_resumes_after_its_last_event_id(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        _, html = await _get(rig.url + "/")
        after = int(re.search(r'data-after="(\d+)"', html).group(1))  # type: ignore[union-attr]
        # Slow steps: the saga's changes reach the list in several messages.
        rig.participant.script("execute", "reserve", ("sleep", 0.6))
        rig.participant.script("execute", "charge", ("sleep", 0.6))
        await rig.begin("live-1")
        messages: list[tuple[int, list[dict[str, object]]]] = []
        async with _session("reader") as session:
            async for message_id, events in _live(session, f"{rig.url}/live?after={after}"):
                messages.append((message_id, events))
                if events[-1]["state"] == "SUCCEEDED":
                    break
            ids = [message_id for message_id, _ in messages]
            assert len(ids) >= 3 and ids == sorted(set(ids)) and ids[0] > after
            previous = after
            for message_id, events in messages:
                # One entry per saga and message: its latest event up to the message's id.
                (event,) = events
                assert event["saga_id"] == "live-1" and previous < int(event["position"]) <= message_id  # type: ignore[call-overload]
                previous = message_id
            sequences = [int(events[0]["sequence"]) for _, events in messages]  # type: ignore[call-overload]
            final = (await rig.saga("live-1")).sequence
            assert sequences == sorted(set(sequences)) and sequences[-1] == final

            # Reconnecting with the id of the first message: what came after it, ending at the same final event.
            resumed: list[tuple[int, list[dict[str, object]]]] = []
            async for message_id, events in _live(session, f"{rig.url}/live?after=0", {"Last-Event-ID": str(ids[0])}):
                resumed.append((message_id, events))
                if any(event["state"] == "SUCCEEDED" for event in events):
                    break
            assert resumed[0][0] > ids[0]
            assert all(int(event["position"]) > ids[0] for _, events in resumed for event in events)  # type: ignore[call-overload]
            assert resumed[-1][1][-1]["sequence"] == final and resumed[-1][0] == ids[-1]

            # Filtered on the server: only failed sagas' events.
            await rig.failed_for_a_person("live-3")
            async for _, events in _live(session, f"{rig.url}/live?after={after}&state=failed"):
                assert {event["saga_id"] for event in events} == {"live-3"}
                assert {event["state"] for event in events} == {"FAILED"}
                break
            async with session.get(f"{rig.url}/live", headers={"Last-Event-ID": "x"}) as response:
                assert response.status == 400


async def test_the_saga_page_draws_parallel_steps_retries_and_compensations_with_payloads(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        rig.participant.script("execute", "reserve", "unavailable", ("sleep", 0.3))
        rig.participant.script("execute", "notify", ("sleep", 0.3))
        rig.participant.script("execute", "charge", "fail")
        await rig.begin("drawn-1")
        saga = await rig.final("drawn-1")
        assert saga.state == S.SAGA_STATE_COMPENSATED
        status, html = await _get(rig.url + "/sagas/drawn-1")
        assert status == 200
        boxes = re.findall(
            r'<div class="box (\w+) outcome-(\w+)" style="left: ([\d.]+)%; width: ([\d.]+)%"\s+title="(\w+): ', html
        )
        drawn = [(step, phase, outcome) for phase, outcome, _, _, step in boxes]
        assert drawn == [
            ("reserve", "execute", "retried"),
            ("reserve", "execute", "succeeded"),
            ("reserve", "compensate", "compensated"),
            ("notify", "execute", "succeeded"),
            ("notify", "compensate", "compensated"),
            ("charge", "execute", "failed"),
        ]
        spans = {(step, phase, outcome): (float(left), float(left) + float(width))
                 for phase, outcome, left, width, step in boxes}
        reserve = spans[("reserve", "execute", "succeeded")]
        notify = spans[("notify", "execute", "succeeded")]
        assert notify[0] < reserve[1] and reserve[0] < notify[1], "parallel steps overlap in time"
        assert spans[("charge", "execute", "failed")][0] >= max(reserve[1], notify[1]) - 0.5
        assert "&#34;order_id&#34;: &#34;order-" in html or '"order_id": "order-' in html
        assert "reserve done" in html  # the step's output, as JSON
        assert "scripted business failure" in html  # the failure, in the header and the log
        for sequence in range(1, saga.sequence + 1):
            assert f'<td class="num">{sequence}</td><td class="time">' in html
        status, html = await _get(rig.url + "/sagas/nope")
        assert status == 404 and "saga &#39;nope&#39; not found" in html


async def test_operators_act_from_the_saga_page_with_its_form_token_and_the_log_names_them(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await rig.failed_for_a_person("act-1")
        async with _session("operator") as session:
            async with session.get(rig.url + "/sagas/act-1") as page:
                html = await page.text()
            assert 'id="resolve-form"' in html and 'id="retry-form"' in html and "cancel-form" not in html
            token = _form_token(html)
            refusals = {
                "no form token": ({}, {"note": "fixed"}),
                "another origin": ({"Origin": "http://evil.example"}, {"note": "fixed", "form_token": token}),
            }
            for what, (headers, form) in refusals.items():
                answer = await session.post(rig.url + "/sagas/act-1/resolve", data=form, headers=headers,
                                            allow_redirects=False)
                assert answer.status == 403, what
            answer = await session.post(rig.url + "/sagas/act-1/resolve", data={"form_token": token, "note": " "},
                                        allow_redirects=False)
            assert answer.status == 400 and "note is required" in await answer.text()
            assert (await rig.saga("act-1")).resolution_note == ""

            answer = await session.post(
                rig.url + "/sagas/act-1/resolve", data={"form_token": token, "note": "stock released by hand"},
                headers={"Origin": rig.url}, allow_redirects=False,
            )
            assert answer.status == 303 and answer.headers["Location"] == "/sagas/act-1?done=resolve"
            resolved = await rig.saga("act-1")
            assert resolved.resolution_note == "stock released by hand"
            actors = [
                event.actor for event in await rig.events("act-1") if event.type == S.EVENT_TYPE_OPERATOR_RESOLVED
            ]
            assert actors == ["token:alice"]
            async with session.get(rig.url + "/sagas/act-1?done=resolve") as page:
                html = await page.text()
            # The resolve came after the steps: the chart keeps to the steps and says so.
            assert "Done: resolve." in html and "1 later saga event(s) are in the log below" in html
            assert max(float(end) for end in re.findall(r'style="left: ([\d.]+)%', html)) <= 100.0
            answer = await session.post(rig.url + "/sagas/act-1/resolve", data={"form_token": token, "note": "again"},
                                        allow_redirects=False)
            assert answer.status == 409  # already resolved: FAILED_PRECONDITION

            rig.participant.script("execute", "reserve", ("sleep", 30.0))
            await rig.begin("act-2")
            await rig.until("act-2", lambda saga: saga.steps[0].state == S.STEP_STATE_RUNNING)
            answer = await session.post(rig.url + "/sagas/act-2/cancel",
                                        data={"form_token": token, "reason": "customer called"}, allow_redirects=False)
            assert answer.status == 303
            assert (await rig.saga("act-2")).state in (S.SAGA_STATE_COMPENSATING, S.SAGA_STATE_COMPENSATED)
            cancels = [e for e in await rig.events("act-2") if e.type == S.EVENT_TYPE_CANCEL_REQUESTED]
            assert [(e.actor, e.message) for e in cancels] == [("token:alice", "customer called")]


async def test_the_live_list_counts_against_the_stream_limit_per_client(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, max_streams_per_client=1) as rig:
        async with _session("reader") as session:
            await rig.begin("limit-1")
            stream = _live(session, f"{rig.url}/live?after=0")
            await stream.__anext__()  # the first stream is open
            async with session.get(rig.url + "/live?after=0") as second:
                assert second.status == 429
                assert "token viewer has 1 streams open, the limit per client" in (await second.json())["error"]
            await stream.aclose()


async def test_the_audit_page_lists_each_discrepancy_with_both_sides_and_the_clean_watermarks(
    make_postgres_url: Callable[[], str]
) -> None:
    async with checkout_stack(make_postgres_url, http_listen="127.0.0.1:0") as stack:
        assert stack.orchestrator.dashboard is not None
        url = stack.orchestrator.dashboard.url.rstrip("/")
        status, html = await _get(url + "/audit", who=None)  # no tokens configured: the API is open
        assert status == 200 and 'id="audit-clean"' in html and html.count("not audited clean yet") == 3

        sagas = [await stack.start() for _ in range(3)]
        for saga_id in sagas:
            await stack.wait_final(saga_id)
        # Only sagas older than the audit's commit lag (the database timeout) count as clean.
        await asyncio.sleep(DEFAULT_DATABASE_TIMEOUT + 0.5)  # ok-sleep: a time to pass, not an event to wait for
        inventory = stack.participants["inventory"].participant.barrier
        async with stack.engine_of("inventory").begin() as conn:
            await conn.execute(
                inventory.delete().where(inventory.c.saga_id == sagas[1], inventory.c.operation == "execute")
            )
        answer = await stack.stub.AuditSagas(orchestrator_pb2.AuditSagasRequest())
        found = [(f.kind, f.participant, f.saga_id) for p in answer.participants for f in p.discrepancies]
        assert found == [("EXECUTE_MISSING", "inventory", sagas[1])], answer

        status, html = await _get(url + "/audit", who=None)
        assert status == 200
        (row,) = re.findall(r'<tr data-kind="EXECUTE_MISSING" data-saga-id="([^"]+)">(.*?)</tr>', html, re.S)
        assert row[0] == sagas[1]
        assert re.search(r'<td class="log-says">SUCCEEDED \(sha256:[0-9a-f]{16}\)</td>', row[1]), row[1]
        assert '<td class="participant-says">no rows</td>' in row[1]
        assert "reserve_stock" in row[1] and "audit/" in row[1]
        # The clean watermark per participant: inventory stops before the bad saga, the others passed all three.
        watermarks = dict(re.findall(
            r'<tr data-participant="(\w+)">.*?<a href="/sagas/([^"]+)">', html.split('id="audit-participants"')[1],
            re.S,
        ))
        assert watermarks == {"inventory": sagas[0], "payment": sagas[2], "shipping": sagas[2]}, watermarks
        counts = dict(re.findall(r'<tr data-participant="(\w+)">.*?<td class="num[^"]*">(\d+)</td>', html, re.S))
        assert counts == {"inventory": "1", "payment": "0", "shipping": "0"}

        status, html = await _get(url + "/audit?participant=payment", who=None)
        assert status == 200 and 'id="audit-clean"' in html and "data-kind=" not in html
        status, html = await _get(url + "/audit?participant=nobody", who=None)
        assert status == 404 and "no participant &#39;nobody&#39;" in html


async def test_the_audit_page_is_for_those_who_see_the_whole_deployment(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        status, html = await _get(rig.url + "/audit", who=None)
        assert status == 401
        status, html = await _get(rig.url + "/audit", who="reader")
        assert status == 200 and 'data-participant="scripted"' in html and "not audited clean yet" in html
        assert '<a href="/audit">Audit</a>' in html
        # A token limited to some definitions does not see the audit, nor a link to it.
        status, html = await _get(rig.url + "/audit", who="elsewhere")
        assert status == 403 and "is limited to definitions other" in html
        status, html = await _get(rig.url + "/", who="elsewhere")
        assert status == 200 and '<a href="/audit">' not in html


async def test_the_demo_prints_its_dashboard_and_stays_up_until_interrupted(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        str(REPO / ".venv" / "bin" / "compensa"), "demo", "--stay",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        url = ""
        async with asyncio.timeout(60):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "the demo ended before it said it stays up"
                if line.startswith("the dashboard stays up at "):
                    url = line.removeprefix("the dashboard stays up at ").split(";")[0]
                    break
        status, html = await _get(url, who=None)  # the demo's API is open
        assert status == 200 and len(_listed(html)) == 2 and "(open API)" in html
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_bulk_action_page_shows_why_sagas_were_skipped_and_operators_pause_resume_and_cancel_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        for saga_id in ("f-1", "f-2", "f-3", "f-4"):
            await rig.failed_for_a_person(saga_id)
        operator = (("authorization", f"Bearer {TOKENS['operator']}"),)
        start = bulk_pb2.StartBulkActionRequest(
            kind=bulk_pb2.BULK_ACTION_KIND_RESOLVE, filter="id_prefix=f-", note="refunded", max_sagas_per_second=1,
            request_id="inc-9",
        )
        await rig.stub.StartBulkAction(start, metadata=operator)
        page_url = rig.url + "/bulk/inc-9"
        async with _session("operator") as session:

            async def page(query: str = "") -> str:
                async with session.get(page_url + query) as answer:
                    assert answer.status == 200, await answer.text()
                    return await answer.text()

            async def command(name: str, **headers: str) -> aiohttp.ClientResponse:
                form = {"form_token": _form_token(await page())}
                return await session.post(f"{page_url}/{name}", data=form, headers=headers, allow_redirects=False)

            async with session.get(rig.url + "/bulk") as listed:
                assert 'href="/bulk/inc-9"' in await listed.text()
            html = await page()
            assert 'id="pause-form"' in html and 'id="cancel-form"' in html and 'id="resume-form"' not in html
            token = _form_token(html)  # the same on every page for one identity
            for what, (name, headers, form) in {
                "no form token": ("pause", {}, {}),
                "another origin": ("pause", {"Origin": "http://evil.example"}, {"form_token": _form_token(html)}),
            }.items():
                answer = await session.post(f"{page_url}/{name}", data=form, headers=headers, allow_redirects=False)
                assert answer.status == 403, what
            assert (await command("stop")).status == 404
            answer = await command("pause", Origin=rig.url)
            assert answer.status == 303 and answer.headers["Location"] == "/bulk/inc-9?done=pause"
            html = await page("?done=pause")
            assert "Done: pause." in html and '<strong id="job-state">paused</strong>' in html
            assert 'id="resume-form"' in html and 'id="pause-form"' not in html
            # While it is paused a person resolves f-4: the job skips it, and the page says why.
            await rig.stub.ResolveSaga(
                orchestrator_pb2.ResolveSagaRequest(saga_id="f-4", note="mine", actor="bob"), metadata=operator
            )
            assert (await command("resume")).status == 303

            async def completed() -> str | None:
                html = await page()
                return html if '<strong id="job-state">completed</strong>' in html else None

            html = await poll_until(completed, timeout=30)
            problems = re.findall(r'<tr data-saga="([^"]+)">.*?<td>(\w+)</td>\s*<td>([^<]*)</td>', html, re.S)
            assert [(saga_id, outcome) for saga_id, outcome, _ in problems] == [("f-4", "skipped")]
            assert "changed since it was selected" in problems[0][2]
            assert "OPERATOR_RESOLVED by token:alice as &#34;bob&#34;" in problems[0][2]  # escaped
            assert 'id="job-commands"' not in html
            answer = await session.post(f"{page_url}/cancel", data={"form_token": token}, allow_redirects=False)
            assert answer.status == 409 and "is COMPLETED; it cannot cancel" in await answer.text()

        # Readers may not see jobs; a token limited to another definition finds none.
        assert (await _get(page_url, "reader"))[0] == 403
        assert (await _get(page_url, "elsewhere"))[0] == 404
