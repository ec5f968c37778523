"""The layer x segment grid and the orders in which its cells can run (pure Python).

Cell (l, s) is decoder layer l processing segment s. It depends on (l-1, s) — the
layer below, same segment (vertical edge) — and on (l, s-1) — the same layer's
associative memory after the previous segment (horizontal edge). Both lie on
anti-diagonal l + s - 1, so every anti-diagonal is a set of independent cells
(design §3). A *schedule* is a list of steps; each step is a list of cells that
run together. No torch here: the executor, the figures and the tests share it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ._checks import check_int

Cell = tuple[int, int]  # (layer, segment)
Schedule = list[list[Cell]]


def _check_sizes(L: int, S: int) -> None:
    check_int("L (layers)", L, 1)
    check_int("S (segments)", S, 1)


def dependencies(layer: int, segment: int) -> list[Cell]:
    """Cells that must finish before (layer, segment): below and to the left."""
    deps = []
    if layer > 0:
        deps.append((layer - 1, segment))  # vertical: same segment, layer below
    if segment > 0:
        deps.append((layer, segment - 1))  # horizontal: same layer's memory
    return deps


def iter_sequential(L: int, S: int) -> Iterator[list[Cell]]:
    """The steps of `sequential`, one at a time."""
    _check_sizes(L, S)
    return ([(l, s)] for s in range(S) for l in range(L))


def adjacent_runs(items: list, layer: Callable = lambda x: x[0]) -> list[list]:
    """Split items sorted by layer (each holds one, layer(item); cells by default) into runs whose
    layers follow one another. No items, no runs; items out of layer order or a layer twice raise
    a ValueError."""
    runs: list[list] = []
    for item in items:
        if runs and layer(item) <= layer(runs[-1][-1]):
            raise ValueError(f"adjacent_runs needs items sorted by layer, each layer once: {item!r} comes after "
                             f"{runs[-1][-1]!r}")
        if runs and layer(item) == layer(runs[-1][-1]) + 1:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def sequential(L: int, S: int) -> Schedule:
    """S * L steps of one cell each: segment by segment, layer by layer."""
    return list(iter_sequential(L, S))


def active_layers(t: int, L: int, S: int) -> tuple[int, int]:
    """(lo, hi), inclusive, of the layers busy at diagonal step t; layer l holds segment t - l."""
    _check_sizes(L, S)
    if not 0 <= t < L + S - 1:
        raise ValueError(f"step t must be in [0, {L + S - 2}] for L={L}, S={S}, got {t}")
    return max(0, t - S + 1), min(t, L - 1)


def iter_diagonal(L: int, S: int) -> Iterator[list[Cell]]:
    """The steps of `diagonal`, one at a time (memory stays flat however large S is)."""
    _check_sizes(L, S)
    for t in range(L + S - 1):
        lo, hi = active_layers(t, L, S)
        yield [(l, t - l) for l in range(lo, hi + 1)]


def diagonal(L: int, S: int) -> Schedule:
    """L + S - 1 steps; step t holds the cells with layer + segment == t, by layer."""
    return list(iter_diagonal(L, S))


def validate(steps: Schedule, L: int, S: int) -> None:
    """Raise ValueError unless every cell of the L x S grid runs exactly once and
    after all of its dependencies (in a strictly earlier step)."""
    _check_sizes(L, S)
    when: dict[Cell, int] = {}
    for t, step in enumerate(steps):
        for cell in step:
            l, s = cell
            if not (0 <= l < L and 0 <= s < S):
                raise ValueError(f"cell {cell} at step {t} is outside the {L} x {S} grid")
            if cell in when:
                raise ValueError(f"cell {cell} runs twice (steps {when[cell]} and {t})")
            when[cell] = t
    missing = [(l, s) for l in range(L) for s in range(S) if (l, s) not in when]
    if missing:
        raise ValueError(f"{len(missing)} cells never run, e.g. {missing[:3]}")
    for cell, t in when.items():
        for dep in dependencies(*cell):
            if when[dep] >= t:
                raise ValueError(f"cell {cell} at step {t} runs before its dependency {dep} (step {when[dep]})")


# --- Several requests through one pipeline (the serving ring, design §3) -------------

RingCell = tuple[int, int, int]  # (layer, request, segment)
RingSchedule = list[list[RingCell]]


def _check_lengths(lengths: list[int]) -> None:
    if len(lengths) == 0:
        raise ValueError("lengths must name at least one request")
    for r, n in enumerate(lengths):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"request {r} must have an int >= 1 segments, got {n!r}")


def ring(L: int, lengths: list[int]) -> RingSchedule:
    """Stream requests through L slots; slot k is always layer k.

    The queue holds every request's segments in order, request after request. Each
    step shifts the segments one slot down the pipeline and feeds the next queued
    segment into slot 0, so queue item q sits in slot k at step q + k. Segment s of a
    request enters one step after segment s-1, which keeps the horizontal edge; when
    a new request reaches layer k, that layer's memory state starts fresh. The ramp
    up and down is paid once for the whole queue: sum(lengths) + L - 1 steps.
    """
    _check_sizes(L, 1)
    _check_lengths(lengths)
    queue = [(r, s) for r, n in enumerate(lengths) for s in range(n)]
    steps = []
    for t in range(len(queue) + L - 1):
        steps.append([(k, *queue[t - k]) for k in range(L) if 0 <= t - k < len(queue)])
    return steps


def back_to_back(L: int, lengths: list[int]) -> RingSchedule:
    """The ring's baseline: each request's diagonal schedule, one request after another
    (sum(lengths[r] + L - 1) steps, every ramp paid again)."""
    _check_lengths(lengths)
    return [[(l, r, s) for l, s in step] for r, n in enumerate(lengths) for step in diagonal(L, n)]


def validate_ring(steps: RingSchedule, L: int, lengths: list[int]) -> None:
    """Raise ValueError unless every (request, layer, segment) runs exactly once, after
    its request's (l-1, s) and (l, s-1) in a strictly earlier step, and no layer (slot)
    holds two cells in one step."""
    _check_sizes(L, 1)
    _check_lengths(lengths)
    when: dict[RingCell, int] = {}
    for t, step in enumerate(steps):
        layers = [l for l, _, _ in step]
        if len(set(layers)) != len(layers):
            raise ValueError(f"step {t} puts two cells on one layer: {step}")
        for l, r, s in step:
            if not (0 <= r < len(lengths) and 0 <= l < L and 0 <= s < lengths[r]):
                raise ValueError(f"cell (layer {l}, request {r}, segment {s}) at step {t} is outside the grid")
            if (r, l, s) in when:
                raise ValueError(f"request {r} cell ({l}, {s}) runs twice (steps {when[(r, l, s)]} and {t})")
            when[(r, l, s)] = t
    n_cells = L * sum(lengths)
    if len(when) != n_cells:
        raise ValueError(f"{n_cells - len(when)} cells never run")
    for (r, l, s), t in when.items():
        for dl, ds in dependencies(l, s):
            if when[(r, dl, ds)] >= t:
                raise ValueError(
                    f"request {r} cell ({l}, {s}) at step {t} runs before its dependency "
                    f"({dl}, {ds}) (step {when[(r, dl, ds)]})"
                )


# --- What a schedule costs ----------------------------------------------------------


@dataclass(frozen=True)
class ScheduleStats:
    n_steps: int  # grouped calls (one per step)
    n_cells: int  # layer calls in all, L * S for one request
    group_sizes: tuple[int, ...]  # G of each step, in order
    utilisation: float  # n_cells / (n_steps * L): share of layer slots busy
    ideal_speedup: float  # time of n_cells single calls / time of the grouped steps


def stats(steps: Schedule | RingSchedule, L: int, cost: Callable[[int], float] | None = None) -> ScheduleStats:
    """Count a schedule (plain or ring) and its ideal speed-up over one-cell-at-a-time.

    cost(G) is the time of one grouped call of G cells. The default cost(G) = 1 is the
    overhead-bound limit (launches dominate), where the speed-up is n_cells / n_steps;
    a cost that grows with G (compute-bound) shrinks it towards 1.
    """
    _check_sizes(L, 1)
    if len(steps) == 0 or any(len(step) == 0 for step in steps):
        raise ValueError("a schedule needs at least one step and no empty steps")
    _check_grid(steps, L)
    cost = cost or (lambda g: 1.0)
    group_sizes = tuple(len(step) for step in steps)
    n_cells = sum(group_sizes)
    grouped_time = sum(cost(g) for g in group_sizes)
    if cost(1) <= 0 or grouped_time <= 0:
        raise ValueError("cost(G) must be positive")
    return ScheduleStats(
        n_steps=len(steps),
        n_cells=n_cells,
        group_sizes=group_sizes,
        utilisation=n_cells / (len(steps) * L),
        ideal_speedup=n_cells * cost(1) / grouped_time,
    )


def _check_grid(steps: Schedule | RingSchedule, L: int) -> None:
    """Refuse a schedule that is not of an L-layer grid: a cell off the grid, a cell run
    twice, or a layer never used (built for another L, its utilisation would be wrong)."""
    seen, layers = set(), set()
    for t, step in enumerate(steps):
        for cell in step:
            if not (isinstance(cell, tuple) and len(cell) in (2, 3)
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cell)):
                raise ValueError(f"step {t} holds {cell!r}; cells are (layer, segment) or (layer, request, "
                                 "segment) tuples of ints >= 0, as schedule.diagonal and schedule.ring build them")
            if cell[0] >= L:
                raise ValueError(f"cell {cell} at step {t} has layer {cell[0]}, outside L = {L}: "
                                 "pass the L the schedule was built for")
            if cell in seen:
                raise ValueError(f"cell {cell} runs twice (again at step {t}); check the schedule with validate")
            seen.add(cell)
            layers.add(cell[0])
    if len(layers) != L:
        raise ValueError(f"the schedule uses {len(layers)} of L = {L} layers: it was built for another L; "
                         "pass the L it was built for")


def ideal_even_load(full_group_time: float, L: int, S: int) -> float:
    """The paper's yardstick (design §3): a full group of L cells costs full_group_time,
    so one cell costs full_group_time / L under even load, and the grid has S * L cells."""
    _check_sizes(L, S)
    if isinstance(full_group_time, bool) or not isinstance(full_group_time, numbers.Real) \
            or not math.isfinite(full_group_time) or full_group_time < 0:
        raise ValueError(f"full_group_time must be a finite time >= 0, got {full_group_time!r}; "
                         "a nan or inf usually means the measurement failed")
    return full_group_time / L * S * L


def ramps_over_ideal(cost: Callable[[int], float], L: int, S: int) -> float:
    """What the diagonal schedule costs against the ideal even load, predicted from cost(G),
    the time of one grouped step of G busy layers (measured by scripts/step_costs.py): the
    sum of cost(G_t) over the schedule's L + S - 1 steps over S full steps, S * cost(L).

    With costs of bare steps (scripts/step_costs.py) the executor's own work is not in it: this
    predicts the floor under diagonal / ideal that the anti-diagonal order sets on a machine with
    these step costs (a prediction: one run's ratio can land a little either side of it, as much
    as the machine's noise). It is 1 when a step costs in
    proportion to its G, and about 1 + (L - 1) f / (S cost(L)) when each step also pays a
    fixed f (its launches), whatever the executor does: the ramps run 2 (L - 1) partial steps
    where the ideal runs L - 1 full ones holding the same cells.
    """
    _check_sizes(L, S)
    costs = {}
    for G in range(1, L + 1):
        c = cost(G)
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"cost({G}) = {c!r}; a step's time must be a finite number > 0")
        costs[G] = c
    # the steps' group sizes: 1, 2, ..., m - 1, then |L - S| + 1 steps of m = min(L, S), then m - 1, ..., 1
    m = min(L, S)
    total = 2 * sum(costs[G] for G in range(1, m)) + (abs(L - S) + 1) * costs[m]
    return total / (S * costs[L])
