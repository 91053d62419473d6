"""The dependency graph of a normalized definition, computed once and cached."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from compensa.v1 import definition_pb2


@dataclass(frozen=True)
class DefinitionGraph:
    """The steps of a normalized definition as a DAG.

    Read with the proto's meaning: an `independent` step has no dependencies; a non-empty
    `depends_on` is the step's dependencies; an empty one on a step that is not independent
    means the step before (none for the first step). A normalized definition (see
    `validate_definition`) spells all of this out, so there the graph is `depends_on` as
    written; an unnormalized one gets the same graph. Every mapping has an entry for every step.
    """

    #: Step names in topological order; among steps that could go in either order, definition order.
    order: tuple[str, ...]
    #: Direct dependencies of each step (its `depends_on`).
    dependencies: Mapping[str, frozenset[str]]
    #: Steps that list each step in their `depends_on`.
    dependents: Mapping[str, frozenset[str]]
    #: Every step that must succeed before each step (transitive dependencies).
    ancestors: Mapping[str, frozenset[str]]
    #: Every step that runs only after each step (transitive dependents).
    descendants: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, definition: definition_pb2.SagaDefinition) -> DefinitionGraph:
        """The graph of `definition`; ValueError on an unknown dependency, a cycle, or an
        `independent` step with a non-empty `depends_on`.

        `validate_definition` reports those as DefinitionErrors first, so a validated
        definition always has a graph. Cheap enough to build once per (name, version) and keep.
        """
        names = [step.name for step in definition.steps]
        dependencies = step_dependencies(definition)
        for name, deps in dependencies.items():
            unknown = sorted(deps - dependencies.keys())
            if unknown:
                raise ValueError(f"step {name!r} depends on unknown step {unknown[0]!r}")
        cycle = find_cycle(names, dependencies)
        if cycle:
            raise ValueError("dependency cycle: " + " -> ".join(cycle))
        order = _topological_order(names, dependencies)
        dependents: dict[str, set[str]] = {name: set() for name in names}
        for name, deps in dependencies.items():
            for dependency in deps:
                dependents[dependency].add(name)
        ancestors: dict[str, frozenset[str]] = {}
        for name in order:
            ancestors[name] = frozenset().union(*(ancestors[d] | {d} for d in dependencies[name]))
        descendants: dict[str, frozenset[str]] = {}
        for name in reversed(order):
            descendants[name] = frozenset().union(*(descendants[d] | {d} for d in dependents[name]))
        return cls(
            order=tuple(order),
            dependencies=MappingProxyType(dependencies),
            dependents=MappingProxyType({name: frozenset(deps) for name, deps in dependents.items()}),
            ancestors=MappingProxyType(ancestors),
            descendants=MappingProxyType(descendants),
        )


def step_dependencies(definition: definition_pb2.SagaDefinition) -> dict[str, frozenset[str]]:
    """The direct dependencies of each step of `definition`, read as `DefinitionGraph` reads them."""
    dependencies: dict[str, frozenset[str]] = {}
    previous = ""
    for step in definition.steps:
        if step.independent:
            if step.depends_on:
                raise ValueError(f"step {step.name!r} is independent but depends on {list(step.depends_on)!r}")
            dependencies[step.name] = frozenset()
        elif step.depends_on:
            dependencies[step.name] = frozenset(step.depends_on)
        else:
            dependencies[step.name] = frozenset({previous}) if previous else frozenset()
        previous = step.name
    return dependencies


def find_cycle(names: Sequence[str], dependencies: Mapping[str, frozenset[str]]) -> list[str]:
    """A dependency cycle as [a, b, ..., a] (a depends on b ...), or [] if there is none.

    Dependencies on names missing from `dependencies` are ignored.
    """
    # Depth-first, with an explicit stack: a long chain of steps must not
    # exhaust Python's recursion limit.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in names:
        if root in state:
            continue
        path = [root]
        state[root] = 1
        pending = [iter(sorted(dependencies[root]))]
        while pending:
            for dependency in pending[-1]:
                if dependency not in dependencies:
                    continue
                if state.get(dependency) == 1:
                    return [*path[path.index(dependency) :], dependency]
                if dependency not in state:
                    state[dependency] = 1
                    path.append(dependency)
                    pending.append(iter(sorted(dependencies[dependency])))
                    break
            else:
                pending.pop()
                state[path.pop()] = 2
    return []


def _topological_order(names: Sequence[str], dependencies: Mapping[str, frozenset[str]]) -> list[str]:
    # Kahn's algorithm, always taking the earliest ready step in definition order, so
    # the order is stable and a linear definition keeps its written order.
    position = {name: index for index, name in enumerate(names)}
    remaining = {name: set(deps) for name, deps in dependencies.items()}
    order: list[str] = []
    while remaining:
        ready = min((name for name, deps in remaining.items() if not deps), key=position.__getitem__)
        order.append(ready)
        del remaining[ready]
        for deps in remaining.values():
            deps.discard(ready)
    return order


@functools.lru_cache(maxsize=256)
def _graph_of_serialized(serialized: bytes) -> DefinitionGraph:
    return DefinitionGraph.of(definition_pb2.SagaDefinition.FromString(serialized))


def definition_graph(definition: definition_pb2.SagaDefinition) -> DefinitionGraph:
    """The graph of a normalized `definition`, cached by content.

    Costs one serialization per call; a caller on a hot path can keep the
    `DefinitionGraph` next to the definition instead.
    """
    return _graph_of_serialized(definition.SerializeToString(deterministic=True))


def step_order(definition: definition_pb2.SagaDefinition) -> list[str]:
    """The step names of a normalized `definition` in topological order, ties in definition order."""
    return list(definition_graph(definition).order)


def ancestors(definition: definition_pb2.SagaDefinition, step: str) -> set[str]:
    """Every step that must succeed before `step` runs (transitive depends_on); KeyError if unknown."""
    return set(definition_graph(definition).ancestors[step])
