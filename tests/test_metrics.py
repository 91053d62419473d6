"""The Prometheus endpoint of `compensa serve --metrics-listen`, scraped over
HTTP after real checkouts."""

from __future__ import annotations

from collections.abc import Callable

from harness import checkout_stack, scrape

from compensa.v1 import saga_pb2

S = saga_pb2


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def test_metrics_count_events_calls_commits_and_saga_durations(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url, metrics_listen="127.0.0.1:0") as stack:
        port = stack.orchestrator.metrics_port
        assert port is not None and port > 0
        succeeded = await stack.start(saga_id="metrics-ok")
        declined = await stack.start(saga_id="metrics-declined", card_token="flagged-card")
        assert (await stack.wait_final(succeeded)).state == S.SAGA_STATE_SUCCEEDED
        assert (await stack.wait_final(declined)).state == S.SAGA_STATE_COMPENSATED
        samples = await scrape(port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, _labels(**labels)), 0.0)

    assert value("compensa_saga_events_total", type="EVENT_TYPE_SAGA_STARTED") == 2
    assert value("compensa_saga_events_total", type="EVENT_TYPE_SAGA_SUCCEEDED") == 1
    assert value("compensa_saga_events_total", type="EVENT_TYPE_SAGA_COMPENSATED") == 1
    assert value("compensa_saga_duration_seconds_count", definition="checkout", end="succeeded") == 1
    assert value("compensa_saga_duration_seconds_count", definition="checkout", end="compensated") == 1
    assert value("compensa_saga_duration_seconds_sum", definition="checkout", end="succeeded") > 0
    call = "compensa_participant_call_seconds_count"
    assert value(call, participant="inventory", method="Execute", outcome="ok") == 2
    assert value(call, participant="payment", method="Execute", outcome="ok") == 1
    assert value(call, participant="payment", method="Execute", outcome="failed") == 1
    assert value(call, participant="inventory", method="Compensate", outcome="ok") == 1
    assert value(call, participant="shipping", method="Execute", outcome="ok") == 1
    # Every event was written by some group commit, each commit carrying at least one transition.
    commits = value("compensa_group_commit_transitions_count")
    transitions = value("compensa_group_commit_transitions_sum")
    assert 1 <= commits <= transitions
    assert value("compensa_group_commit_seconds_count") == commits
    assert value("compensa_sagas_driven") == 0
    assert value("compensa_alerts_total", definition="checkout", reason="saga") == 0
    assert value("compensa_alerts_total", definition="", reason="participant_unhealthy") == 0
