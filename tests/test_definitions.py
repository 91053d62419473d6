"""Saga definitions: loading, validation, normalization and the dependency graph."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import compensa.checkout.v1.checkout_pb2  # noqa: F401  (registers CheckoutInput)
from compensa.examples import DEFINITIONS_DIR
from compensa.orchestrator.definitions import (
    DefinitionGraph,
    ancestors,
    backoff_seconds,
    definition_fingerprint,
    duration_seconds,
    load_definition_file,
    load_definitions,
    step_order,
    validate_definition,
)
from compensa.orchestrator.shared.errors import DefinitionError, InvalidArgument
from compensa.v1 import definition_pb2

DEFINITIONS = DEFINITIONS_DIR
COMPENSABLE = definition_pb2.STEP_KIND_COMPENSABLE
PIVOT = definition_pb2.STEP_KIND_PIVOT
RETRIABLE = definition_pb2.STEP_KIND_RETRIABLE

BASE: dict[str, Any] = {
    "name": "order",
    "input_type": "compensa.checkout.v1.CheckoutInput",
    "steps": [
        {"name": "reserve", "participant": "inventory"},
        {"name": "charge", "participant": "payment"},
        {"name": "ship", "participant": "shipping", "kind": "PIVOT"},
    ],
}


def write(tmp_path: Path, content: dict[str, Any], name: str = "order.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content) if name.endswith(".json") else yaml.safe_dump(content))
    return path


def edited(**changes: Any) -> dict[str, Any]:
    """BASE with top-level `changes`; a `steps` change maps step index -> fields to set."""
    content = copy.deepcopy(BASE)
    for key, value in changes.items():
        if key == "steps" and isinstance(value, dict):
            for index, fields in value.items():
                content["steps"][index].update(fields)
        else:
            content[key] = value
    return content


def load_error(tmp_path: Path, content: dict[str, Any]) -> DefinitionError:
    path = write(tmp_path, content)
    with pytest.raises(DefinitionError) as caught:
        load_definition_file(path)
    assert str(path) in str(caught.value)
    return caught.value


# Loading the examples


def test_checkout_example_loads() -> None:
    definition = load_definition_file(DEFINITIONS / "checkout.yaml")
    assert definition.name == "checkout"
    assert [s.name for s in definition.steps] == ["reserve_stock", "charge_card", "ship_order"]
    reserve, charge, ship = definition.steps
    assert (reserve.participant, charge.participant, ship.participant) == ("inventory", "payment", "shipping")
    assert [s.kind for s in definition.steps] == [COMPENSABLE, COMPENSABLE, PIVOT]
    assert duration_seconds(charge.step_timeout) == 1800
    assert duration_seconds(reserve.execute_timeout) == 2
    assert [list(s.depends_on) for s in definition.steps] == [[], ["reserve_stock"], ["charge_card"]]
    assert [s.independent for s in definition.steps] == [True, False, False]


def test_parallel_example_loads_with_two_starting_steps() -> None:
    definition = load_definition_file(DEFINITIONS / "checkout-parallel.yaml")
    assert definition.name == "checkout-parallel"
    depends = {s.name: list(s.depends_on) for s in definition.steps}
    assert depends == {
        "reserve_stock": [],
        "fraud_check": [],
        "charge_card": ["reserve_stock", "fraud_check"],
        "ship_order": ["charge_card"],
    }
    assert step_order(definition) == ["reserve_stock", "fraud_check", "charge_card", "ship_order"]
    assert ancestors(definition, "ship_order") == {"reserve_stock", "fraud_check", "charge_card"}
    assert ancestors(definition, "fraud_check") == set()
    graph = DefinitionGraph.of(definition)
    assert graph.dependents["reserve_stock"] == {"charge_card"}
    assert graph.descendants["fraud_check"] == {"charge_card", "ship_order"}
    assert {s.name for s in definition.steps if s.independent} == {"reserve_stock", "fraud_check"}


@pytest.mark.parametrize("file", ["checkout.yaml", "checkout-parallel.yaml"])
def test_normalization_is_idempotent(file: str) -> None:
    normalized = load_definition_file(DEFINITIONS / file)
    again = validate_definition(normalized)
    assert again == normalized
    assert again.SerializeToString(deterministic=True) == normalized.SerializeToString(deterministic=True)
    assert definition_fingerprint(again) == definition_fingerprint(normalized)
    assert DefinitionGraph.of(again) == DefinitionGraph.of(normalized)
    # What RegisterDefinition receives: the bytes of a normalized definition.
    received = definition_pb2.SagaDefinition.FromString(normalized.SerializeToString())
    assert validate_definition(received) == normalized


def parallel_proto() -> definition_pb2.SagaDefinition:
    """checkout-parallel built in code, as a RegisterDefinition caller would, with `independent`."""
    step = definition_pb2.StepDefinition
    return definition_pb2.SagaDefinition(
        name="parallel",
        input_type="compensa.checkout.v1.CheckoutInput",
        steps=[
            step(name="reserve", participant="inventory"),
            step(name="fraud", participant="fraud", independent=True),
            step(name="charge", participant="payment", depends_on=["reserve", "fraud"]),
            step(name="ship", participant="shipping", kind=PIVOT),
        ],
    )


def test_proto_built_definition_with_independent_steps() -> None:
    request = definition_pb2.SagaDefinition.FromString(parallel_proto().SerializeToString())
    definition = validate_definition(request)
    assert {s.name: list(s.depends_on) for s in definition.steps} == {
        "reserve": [],
        "fraud": [],
        "charge": ["reserve", "fraud"],
        "ship": ["charge"],
    }
    assert [s.independent for s in definition.steps] == [True, True, False, False]
    graph = DefinitionGraph.of(definition)
    assert graph.order == ("reserve", "fraud", "charge", "ship")
    assert graph.dependencies["fraud"] == frozenset()
    assert graph.ancestors["ship"] == {"reserve", "fraud", "charge"}
    assert validate_definition(definition) == definition
    # The graph reads the proto's meaning whether or not the definition is normalized.
    assert DefinitionGraph.of(request) == graph


def test_independent_step_in_a_file_matches_depends_on_empty(tmp_path: Path) -> None:
    flagged = write(tmp_path, edited(steps={1: {"independent": True}, 2: {"kind": "COMPENSABLE"}}), "a.yaml")
    listed = write(tmp_path, edited(steps={1: {"depends_on": []}, 2: {"kind": "COMPENSABLE"}}), "b.yaml")
    assert load_definition_file(flagged) == load_definition_file(listed)
    assert list(load_definition_file(flagged).steps[2].depends_on) == ["charge"]
    assert load_definition_file(listed).steps[1].independent


def test_independent_step_with_dependencies(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"independent": True, "depends_on": ["reserve"]}}))
    assert (error.step, error.field) == ("charge", "independent")
    definition = parallel_proto()
    definition.steps[1].depends_on.append("reserve")
    with pytest.raises(DefinitionError) as caught:
        validate_definition(definition, source="RegisterDefinition")
    assert (caught.value.step, caught.value.field) == ("fraud", "independent")
    with pytest.raises(ValueError, match="independent"):
        DefinitionGraph.of(definition)


def test_empty_depends_on_with_independent_false(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"independent": False, "depends_on": []}}))
    assert (error.step, error.field) == ("charge", "independent")


def test_load_definitions_reads_a_directory_sorted() -> None:
    names = [d.name for d in load_definitions([DEFINITIONS])]
    assert names == ["checkout-parallel", "checkout"]


def test_json_file_loads(tmp_path: Path) -> None:
    assert load_definition_file(write(tmp_path, BASE, "order.json")).name == "order"


def test_same_name_in_two_files_is_rejected(tmp_path: Path) -> None:
    first = write(tmp_path, BASE, "a.yaml")
    second = write(tmp_path, BASE, "b.json")
    with pytest.raises(DefinitionError) as caught:
        load_definitions([tmp_path])
    assert str(second) in str(caught.value) and str(first) in str(caught.value)
    assert "'order'" in str(caught.value)


# Defaults and shorthands


def test_defaults_are_filled() -> None:
    definition = definition_pb2.SagaDefinition(
        name="order",
        input_type="compensa.checkout.v1.CheckoutInput",
        steps=[definition_pb2.StepDefinition(name="a", participant="p")],
    )
    step = validate_definition(definition).steps[0]
    assert step.kind == COMPENSABLE
    assert duration_seconds(step.execute_timeout) == 10
    assert duration_seconds(step.compensate_timeout) == 10
    assert not step.HasField("step_timeout")
    assert (step.retry.max_attempts, step.retry.backoff_multiplier) == (3, 2.0)
    assert duration_seconds(step.retry.initial_backoff) == pytest.approx(0.2)
    assert duration_seconds(step.retry.max_backoff) == 10
    assert not step.retry.HasField("give_up_after") and not step.retry.HasField("alert_after")
    # Compensations try for much longer: no count limit, an alert after 5
    # minutes of retrying, and giving up only after a day.
    assert (step.compensate_retry.max_attempts, step.compensate_retry.backoff_multiplier) == (0, 2.0)
    assert duration_seconds(step.compensate_retry.initial_backoff) == pytest.approx(0.5)
    assert duration_seconds(step.compensate_retry.max_backoff) == 30
    assert duration_seconds(step.compensate_retry.alert_after) == 300
    assert duration_seconds(step.compensate_retry.give_up_after) == 86400


def test_validate_returns_a_copy() -> None:
    definition = definition_pb2.SagaDefinition(
        name="order",
        input_type="compensa.checkout.v1.CheckoutInput",
        steps=[
            definition_pb2.StepDefinition(name="a", participant="p"),
            definition_pb2.StepDefinition(name="b", participant="p"),
        ],
    )
    before = definition.SerializeToString()
    normalized = validate_definition(definition)
    assert definition.SerializeToString() == before
    assert list(normalized.steps[1].depends_on) == ["a"]


def test_partial_retry_policy_inherits_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, edited(steps={0: {"retry": {"max_attempts": 5}}}))
    retry = load_definition_file(path).steps[0].retry
    assert retry.max_attempts == 5 and retry.backoff_multiplier == 2.0
    assert duration_seconds(retry.initial_backoff) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("1.5s", 1.5), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("0.250s", 0.25)],
)
def test_duration_shorthand(tmp_path: Path, written: str, seconds: float) -> None:
    path = write(tmp_path, edited(steps={0: {"execute_timeout": written, "step_timeout": "3d"}}))
    assert duration_seconds(load_definition_file(path).steps[0].execute_timeout) == pytest.approx(seconds)


def test_duration_shorthand_in_nested_policy(tmp_path: Path) -> None:
    written = {"max_attempts": 2, "initialBackoff": "50ms", "max_backoff": "1m"}
    path = write(tmp_path, edited(steps={1: {"compensateRetry": written}}))
    policy = load_definition_file(path).steps[1].compensate_retry
    assert duration_seconds(policy.initial_backoff) == pytest.approx(0.05)
    assert duration_seconds(policy.max_backoff) == 60


def test_duration_without_unit_is_rejected(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={0: {"execute_timeout": 2}}))
    assert (error.step, error.field) == ("reserve", "execute_timeout")


@pytest.mark.parametrize("written", ["PIVOT", "pivot", "STEP_KIND_PIVOT"])
def test_enum_short_name(tmp_path: Path, written: str) -> None:
    content = edited(steps={2: {"kind": written}})
    assert load_definition_file(write(tmp_path, content)).steps[2].kind == PIVOT


def test_unknown_enum_value_lists_the_choices(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={0: {"kind": "UNDOABLE"}}))
    assert (error.step, error.field) == ("reserve", "kind")
    assert "COMPENSABLE, PIVOT, RETRIABLE" in str(error)


# One test per validation error


def test_missing_name(tmp_path: Path) -> None:
    content = edited()
    del content["name"]
    assert load_error(tmp_path, content).field == "name"


@pytest.mark.parametrize("name", ["Order", "1order", "order!", "o" * 64])
def test_bad_name(tmp_path: Path, name: str) -> None:
    assert load_error(tmp_path, edited(name=name)).field == "name"


def test_bad_step_name(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"name": "Charge Card"}}))
    assert (error.step, error.field) == ("Charge Card", "name")


def test_missing_step_name_names_its_position(tmp_path: Path) -> None:
    content = edited()
    del content["steps"][1]["name"]
    error = load_error(tmp_path, content)
    assert (error.step, error.field) == ("#2", "name")


def test_no_steps(tmp_path: Path) -> None:
    assert load_error(tmp_path, edited(steps=[])).field == "steps"


def test_duplicate_step(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"name": "reserve"}}))
    assert (error.step, error.field) == ("reserve", "name")
    assert "unique" in str(error)


def test_missing_participant(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"participant": ""}}))
    assert (error.step, error.field) == ("charge", "participant")


def test_unknown_dependency(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"depends_on": ["nowhere"]}}))
    assert (error.step, error.field) == ("charge", "depends_on")
    assert "'nowhere'" in str(error)


def test_self_dependency(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"depends_on": ["charge"]}}))
    assert (error.step, error.field) == ("charge", "depends_on")
    assert "itself" in str(error)


def test_cycle_names_its_steps(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={0: {"depends_on": ["charge"]}, 2: {"kind": "RETRIABLE"}}))
    assert error.field == "depends_on"
    assert "reserve -> charge -> reserve" in str(error)


def test_non_positive_execute_timeout(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"execute_timeout": "-1s"}}))
    assert str(error).endswith("step 'charge', field 'execute_timeout': must be positive, got -1s")
    zero = load_error(tmp_path, edited(steps={1: {"compensate_timeout": "0s"}}))
    assert (zero.step, zero.field) == ("charge", "compensate_timeout")


def test_step_timeout_below_execute_timeout(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"execute_timeout": "5s", "step_timeout": "2s"}}))
    assert (error.step, error.field) == ("charge", "step_timeout")


def test_non_positive_saga_timeout(tmp_path: Path) -> None:
    assert load_error(tmp_path, edited(saga_timeout="0s")).field == "saga_timeout"


@pytest.mark.parametrize("attempts", [0, -1, 1001])
def test_max_attempts_out_of_range(tmp_path: Path, attempts: int) -> None:
    error = load_error(tmp_path, edited(steps={0: {"retry": {"max_attempts": attempts}}}))
    assert (error.step, error.field) == ("reserve", "retry.max_attempts")


def test_a_compensation_policy_bounded_by_time_needs_no_attempt_count(tmp_path: Path) -> None:
    policy = {"initial_backoff": "100ms", "max_backoff": "5s", "give_up_after": "6h", "alert_after": "1m"}
    step = load_definition_file(write(tmp_path, edited(steps={0: {"compensate_retry": policy}}))).steps[0]
    assert step.compensate_retry.max_attempts == 0
    assert duration_seconds(step.compensate_retry.give_up_after) == 6 * 3600
    assert duration_seconds(step.compensate_retry.alert_after) == 60
    # An Execute policy has no time bound to inherit: its attempts must be counted.
    error = load_error(tmp_path, edited(steps={0: {"retry": {"initial_backoff": "100ms"}}}))
    assert (error.step, error.field) == ("reserve", "retry.max_attempts")
    assert "or 0 with a give_up_after" in str(error)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"give_up_after": "0s"}, "compensate_retry.give_up_after"),
        ({"max_attempts": 5, "alert_after": "-1s"}, "compensate_retry.alert_after"),
        ({"give_up_after": "1h", "initial_backoff": "0s", "max_backoff": "0s"}, "compensate_retry.max_backoff"),
        ({"give_up_after": "366d"}, "compensate_retry.give_up_after"),
    ],
)
def test_retry_time_limits_must_be_positive(tmp_path: Path, policy: dict[str, Any], field: str) -> None:
    error = load_error(tmp_path, edited(steps={0: {"compensate_retry": policy}}))
    assert (error.step, error.field) == ("reserve", field)


def test_multiplier_below_one(tmp_path: Path) -> None:
    written = {"max_attempts": 3, "backoff_multiplier": 0.5}
    error = load_error(tmp_path, edited(steps={0: {"compensate_retry": written}}))
    assert (error.step, error.field) == ("reserve", "compensate_retry.backoff_multiplier")


def test_max_backoff_below_initial(tmp_path: Path) -> None:
    policy = {"max_attempts": 3, "initial_backoff": "2s", "max_backoff": "1s"}
    error = load_error(tmp_path, edited(steps={0: {"retry": policy}}))
    assert (error.step, error.field) == ("reserve", "retry.max_backoff")


def test_negative_initial_backoff(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={0: {"retry": {"max_attempts": 3, "initial_backoff": "-1s"}}}))
    assert error.field == "retry.initial_backoff"


def test_unresolvable_input_type(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(input_type="nowhere.v1.Order"))
    assert error.field == "input_type"
    assert "import" in str(error)
    assert isinstance(error, InvalidArgument)


def test_missing_input_type(tmp_path: Path) -> None:
    content = edited()
    del content["input_type"]
    assert load_error(tmp_path, content).field == "input_type"


def test_unknown_field_in_file(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"timeout": "2s"}}))
    assert (error.step, error.field) == ("charge", "timeout")
    top = load_error(tmp_path, edited(owner="team"))
    assert top.field == "owner"
    nested = load_error(tmp_path, edited(steps={1: {"retry": {"attempts": 3}}}))
    assert (nested.step, nested.field) == ("charge", "retry.attempts")


def test_wrongly_typed_value(tmp_path: Path) -> None:
    error = load_error(tmp_path, edited(steps={1: {"retry": {"max_attempts": "many"}}}))
    assert (error.step, error.field) == ("charge", "retry.max_attempts")


def test_non_zero_version_in_file(tmp_path: Path) -> None:
    assert load_error(tmp_path, edited(version=2)).field == "version"


def test_validate_accepts_any_version() -> None:
    definition = load_definition_file(DEFINITIONS / "checkout.yaml")
    definition.version = 7
    assert validate_definition(definition).version == 7


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="cannot be read"):
        load_definition_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(DefinitionError, match="not valid YAML"):
        load_definition_file(bad)
    with pytest.raises(DefinitionError, match="must end in"):
        load_definition_file(tmp_path / "order.txt")


# The pivot rule


def test_compensable_step_after_pivot(tmp_path: Path) -> None:
    content = edited(steps={1: {"kind": "PIVOT"}, 2: {"kind": "COMPENSABLE"}})
    error = load_error(tmp_path, content)
    assert (error.step, error.field) == ("ship", "kind")
    assert "'charge'" in str(error)


def test_retriable_step_after_pivot_is_allowed(tmp_path: Path) -> None:
    content = edited(steps={1: {"kind": "PIVOT"}, 2: {"kind": "RETRIABLE"}})
    assert load_definition_file(write(tmp_path, content)).steps[2].kind == RETRIABLE


def test_step_parallel_to_pivot(tmp_path: Path) -> None:
    content = edited(steps={2: {"depends_on": ["reserve"]}})
    error = load_error(tmp_path, content)
    assert (error.step, error.field) == ("charge", "depends_on")
    assert "concurrently" in str(error)


def test_retriable_step_parallel_to_pivot_is_rejected_too(tmp_path: Path) -> None:
    content = edited(steps={1: {"kind": "RETRIABLE", "depends_on": []}})
    error = load_error(tmp_path, content)
    assert (error.step, error.field) == ("reserve", "depends_on")


def test_two_pivots(tmp_path: Path) -> None:
    content = edited(steps={1: {"kind": "PIVOT"}})
    error = load_error(tmp_path, content)
    assert (error.step, error.field) == ("ship", "kind")
    assert "'charge'" in str(error)


# Fingerprints


def test_fingerprint_is_stable_under_reserialization() -> None:
    definition = load_definition_file(DEFINITIONS / "checkout.yaml")
    again = definition_pb2.SagaDefinition.FromString(definition.SerializeToString())
    assert definition_fingerprint(again) == definition_fingerprint(definition)
    assert definition_fingerprint(validate_definition(again)) == definition_fingerprint(definition)
    again.version = 3
    assert definition_fingerprint(again) == definition_fingerprint(definition)


def test_fingerprint_ignores_how_the_file_was_written(tmp_path: Path) -> None:
    short = write(tmp_path, edited(steps={0: {"execute_timeout": "500ms"}}), "a.yaml")
    long = write(tmp_path, edited(steps={0: {"executeTimeout": "0.5s", "kind": "STEP_KIND_COMPENSABLE"}}), "b.json")
    assert definition_fingerprint(load_definition_file(short)) == definition_fingerprint(load_definition_file(long))


def test_fingerprint_changes_with_content() -> None:
    definition = load_definition_file(DEFINITIONS / "checkout.yaml")
    changed = definition_pb2.SagaDefinition()
    changed.CopyFrom(definition)
    changed.steps[0].execute_timeout.seconds = 3
    assert definition_fingerprint(changed) != definition_fingerprint(definition)
    assert len(definition_fingerprint(definition)) == 64


# Helpers


def test_backoff_seconds() -> None:
    policy = definition_pb2.RetryPolicy(max_attempts=10, backoff_multiplier=2.0)
    policy.initial_backoff.FromMilliseconds(200)
    policy.max_backoff.FromSeconds(1)
    assert [backoff_seconds(policy, n) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff_seconds(policy, 100_000) == 1.0
    with pytest.raises(ValueError):
        backoff_seconds(policy, 0)


def steps_of(*steps: tuple[str, list[str]]) -> definition_pb2.SagaDefinition:
    return validate_definition(
        definition_pb2.SagaDefinition(
            name="order",
            input_type="compensa.checkout.v1.CheckoutInput",
            steps=[definition_pb2.StepDefinition(name=n, participant="p", depends_on=d) for n, d in steps],
        )
    )


def test_step_order_breaks_ties_by_position() -> None:
    definition = steps_of(("a", []), ("c", ["a"]), ("b", ["a"]), ("d", ["b", "c"]))
    assert step_order(definition) == ["a", "c", "b", "d"]
    assert ancestors(definition, "d") == {"a", "b", "c"}


def test_step_order_follows_a_forward_reference() -> None:
    definition = steps_of(("x", []), ("b", ["a"]), ("a", ["x"]))
    assert step_order(definition) == ["x", "a", "b"]
    assert ancestors(definition, "b") == {"a", "x"}


def test_empty_depends_on_in_a_proto_means_the_step_before() -> None:
    with pytest.raises(DefinitionError, match="cycle: b -> a -> b"):
        steps_of(("b", ["a"]), ("a", []))


def test_a_long_running_step_needs_a_step_timeout() -> None:
    definition = definition_pb2.SagaDefinition(
        name="hold",
        input_type="compensa.checkout.v1.CheckoutInput",
        steps=[definition_pb2.StepDefinition(name="wait", participant="payment", long_running=True)],
    )
    with pytest.raises(DefinitionError) as error:
        validate_definition(definition, source="hold.yaml")
    message = str(error.value)
    assert "hold.yaml" in message and "'wait'" in message and "step_timeout" in message
