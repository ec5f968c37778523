"""The grid's schedules: every cell once, after its dependencies; step counts; the
multi-request ring; ScheduleStats on hand-checked examples."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diaglab.schedule import (
    active_layers,
    back_to_back,
    dependencies,
    diagonal,
    ideal_even_load,
    ramps_over_ideal,
    ring,
    sequential,
    stats,
    validate,
    validate_ring,
)

sizes = st.integers(min_value=1, max_value=12)
request_lengths = st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=5)


def cell_step(steps):
    """{cell: step index}; duplicates would collapse, so the caller also counts cells."""
    return {cell: t for t, step in enumerate(steps) for cell in step}


@pytest.mark.parametrize("order", [sequential, diagonal])
@given(L=sizes, S=sizes)
def test_every_cell_once_after_its_dependencies(order, L, S):
    steps = order(L, S)
    validate(steps, L, S)
    cells = [cell for step in steps for cell in step]
    assert sorted(cells) == [(l, s) for l in range(L) for s in range(S)]
    when = cell_step(steps)
    for cell, t in when.items():
        assert all(when[dep] < t for dep in dependencies(*cell))


@given(L=sizes, S=sizes)
def test_diagonal_steps_and_group_ramp(L, S):
    steps = diagonal(L, S)
    assert len(steps) == L + S - 1
    sizes_ = [len(step) for step in steps]
    top = min(L, S)
    ramp = list(range(1, top)) + [top] * (max(L, S) - top + 1) + list(range(top - 1, 0, -1))
    assert sizes_ == ramp
    for t, step in enumerate(steps):
        assert all(l + s == t for l, s in step)
        lo, hi = active_layers(t, L, S)
        assert [l for l, _ in step] == list(range(lo, hi + 1))


@given(L=sizes, S=sizes)
def test_sequential_has_one_cell_per_step(L, S):
    steps = sequential(L, S)
    assert len(steps) == S * L
    assert all(len(step) == 1 for step in steps)


def test_validate_rejects_a_cell_run_twice():
    steps = diagonal(3, 3)
    steps[-1].append((0, 0))
    with pytest.raises(ValueError, match="twice"):
        validate(steps, 3, 3)


def test_validate_rejects_a_dependency_violation():
    steps = diagonal(3, 3)
    steps[1], steps[2] = steps[2], steps[1]
    with pytest.raises(ValueError, match="before its dependency"):
        validate(steps, 3, 3)


def test_validate_rejects_a_missing_cell_and_a_cell_off_the_grid():
    with pytest.raises(ValueError, match="never run"):
        validate(diagonal(3, 3)[:-1], 3, 3)
    with pytest.raises(ValueError, match="outside"):
        validate(diagonal(3, 3) + [[(3, 0)]], 3, 3)


def test_same_step_is_not_early_enough():
    # (1, 0) needs (0, 0) from a strictly earlier step, not the same one
    steps = [[(0, 0), (1, 0)]]
    with pytest.raises(ValueError, match="before its dependency"):
        validate(steps, 2, 1)


@pytest.mark.parametrize("L, S", [(0, 3), (3, 0), (-1, 2), (2.0, 3), (True, 3)])
def test_bad_sizes_raise(L, S):
    for build in (sequential, diagonal):
        with pytest.raises(ValueError):
            build(L, S)
    with pytest.raises(ValueError):
        ring(L, [S])


@pytest.mark.parametrize("lengths", [[], [0], [2, -1], [2, 1.5]])
def test_bad_request_lengths_raise(lengths):
    with pytest.raises(ValueError):
        ring(3, lengths)


def test_active_layers_rejects_a_step_off_the_schedule():
    with pytest.raises(ValueError):
        active_layers(4, 2, 2)


# --- the ring ------------------------------------------------------------------------


@given(L=sizes, lengths=request_lengths)
def test_ring_runs_each_request_cell_once_after_its_dependencies(L, lengths):
    steps = ring(L, lengths)
    validate_ring(steps, L, lengths)
    assert len(steps) == sum(lengths) + L - 1
    for r, n in enumerate(lengths):
        mine = [[(l, s) for l, rr, s in step if rr == r] for step in steps]
        validate(mine, L, n)  # the request alone is a valid schedule of its own grid
    for step in steps:
        layers = [l for l, _, _ in step]
        assert len(set(layers)) == len(layers)  # one cell per slot


@given(L=sizes, lengths=request_lengths)
def test_ring_beats_back_to_back_diagonals(L, lengths):
    ringed, baseline = stats(ring(L, lengths), L), stats(back_to_back(L, lengths), L)
    validate_ring(back_to_back(L, lengths), L, lengths)
    assert baseline.n_steps == sum(n + L - 1 for n in lengths)
    assert ringed.n_cells == baseline.n_cells == L * sum(lengths)
    if len(lengths) > 1 and L > 1:
        assert ringed.utilisation > baseline.utilisation
    else:
        assert ringed.utilisation == pytest.approx(baseline.utilisation)


def test_ring_by_hand():
    assert ring(2, [2, 1]) == [
        [(0, 0, 0)],
        [(0, 0, 1), (1, 0, 0)],
        [(0, 1, 0), (1, 0, 1)],
        [(1, 1, 0)],
    ]


def test_validate_ring_rejects_bad_schedules():
    steps = ring(2, [2, 1])
    twice = [list(step) for step in steps] + [[(0, 0, 0)]]
    with pytest.raises(ValueError, match="twice"):
        validate_ring(twice, 2, [2, 1])
    early = [steps[0], steps[2], steps[1], steps[3]]  # (1, 0, 1) before (0, 0, 1)
    with pytest.raises(ValueError, match="before its dependency"):
        validate_ring(early, 2, [2, 1])
    with pytest.raises(ValueError, match="before its dependency"):  # same step is not early enough
        validate_ring([[(0, 0, 0), (1, 0, 0)]], 2, [1])
    crowded = [steps[0] + [(0, 1, 0)], steps[1], [(1, 0, 1)], steps[3]]  # slot 0 twice in step 0
    with pytest.raises(ValueError, match="two cells on one layer"):
        validate_ring(crowded, 2, [2, 1])
    with pytest.raises(ValueError, match="never run"):
        validate_ring(steps[:-1], 2, [2, 1])
    with pytest.raises(ValueError, match="outside"):
        validate_ring(steps + [[(0, 2, 0)]], 2, [2, 1])


# --- stats ---------------------------------------------------------------------------


def test_stats_diagonal_by_hand():
    # L=2, S=3: group sizes 1, 2, 2, 1; 6 cells in 4 steps of 2 slots
    got = stats(diagonal(2, 3), 2)
    assert got.n_steps == 4
    assert got.n_cells == 6
    assert got.group_sizes == (1, 2, 2, 1)
    assert got.utilisation == pytest.approx(6 / 8)
    assert got.ideal_speedup == pytest.approx(6 / 4)


def test_stats_sequential_is_the_baseline():
    got = stats(sequential(2, 3), 2)
    assert (got.n_steps, got.n_cells, got.utilisation, got.ideal_speedup) == (6, 6, 0.5, 1.0)


def test_stats_with_a_compute_bound_cost():
    # cost(G) = 1 + G: singles cost 2 each (12 for 6 cells); grouped steps 2 + 3 + 3 + 2 = 10
    got = stats(diagonal(2, 3), 2, cost=lambda g: 1 + g)
    assert got.ideal_speedup == pytest.approx(12 / 10)
    # purely linear cost: grouping saves nothing
    assert stats(diagonal(4, 9), 4, cost=lambda g: 3.0 * g).ideal_speedup == pytest.approx(1.0)


def test_stats_of_a_ring():
    got = stats(ring(2, [2, 1]), 2)
    assert got.group_sizes == (1, 2, 2, 1)
    assert got.utilisation == pytest.approx(6 / 8)


def test_stats_rejects_empty_schedules_and_bad_costs():
    with pytest.raises(ValueError):
        stats([], 2)
    with pytest.raises(ValueError):
        stats([[(0, 0)], []], 2)
    with pytest.raises(ValueError):
        stats(diagonal(2, 2), 2, cost=lambda g: 0.0)


def test_ideal_even_load():
    # a full group of 4 layers takes 2 ms: 0.5 ms a cell, 8 segments x 4 layers = 32 cells
    assert ideal_even_load(2.0, 4, 8) == pytest.approx(16.0)
    with pytest.raises(ValueError):
        ideal_even_load(2.0, 0, 8)


def test_adjacent_runs_split_where_layers_skip():
    from diaglab.schedule import adjacent_runs
    cells = [(0, 1, 4), (1, 1, 3), (3, 2, 0), (4, 2, 1)]
    assert adjacent_runs(cells) == [cells[:2], cells[2:]]
    by_second = [("a", 0), ("b", 1), ("c", 3)]
    assert adjacent_runs(by_second, layer=lambda r: r[1]) == [by_second[:2], by_second[2:]]
    assert adjacent_runs([(2, 2)]) == [[(2, 2)]]


def test_adjacent_runs_refuses_unsorted_items_and_takes_none():
    from diaglab.schedule import adjacent_runs
    assert adjacent_runs([]) == []
    for bad in ([(2,), (0,), (1,)], [(0, 2), (0, 3)]):
        with pytest.raises(ValueError, match="sorted by layer"):
            adjacent_runs(bad)


def test_ramps_over_ideal_by_hand():
    """The ramps' floor under diagonal / ideal, from step costs: 1 when a step costs in
    proportion to its group; L = 3, S = 4 with cost(G) = 1 + G: steps G = 1, 2, 3, 3, 2, 1,
    so (2 + 3 + 4 + 4 + 3 + 2) / (4 * 4) = 18 / 16."""
    assert ramps_over_ideal(lambda G: 0.5 * G, 8, 32) == pytest.approx(1.0)
    assert ramps_over_ideal(lambda G: 1.0 + G, 3, 4) == pytest.approx(18 / 16)
    # S < L: the plateau is never reached; the sum still runs over every step
    assert ramps_over_ideal(lambda G: 1.0, 4, 2) == pytest.approx(5 / 2)
    # an affine cost f + c G: about 1 + (L - 1) f / (S (f + c L)), exactly so here
    f, c, L, S = 0.36, 0.15, 8, 32
    assert ramps_over_ideal(lambda G: f + c * G, L, S) == pytest.approx(1 + (L - 1) * f / (S * (f + c * L)))


@pytest.mark.parametrize("L,S", [(1, 1), (1, 5), (4, 1), (4, 2), (4, 4), (3, 7), (8, 32)])
def test_ramps_over_ideal_prices_the_diagonal_schedules_own_steps(L, S):
    """The closed form against the schedule itself: cost(G) summed over diagonal(L, S)'s steps."""
    cost = lambda G: 0.3 + G ** 1.5   # noqa: E731
    steps = diagonal(L, S)
    assert ramps_over_ideal(cost, L, S) == pytest.approx(sum(cost(len(c)) for c in steps) / (S * cost(L)))


def test_ramps_over_ideal_refuses_bad_costs():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"cost\(1\)"):
            ramps_over_ideal(lambda G, bad=bad: bad, 4, 8)
    with pytest.raises(ValueError):
        ramps_over_ideal(lambda G: 1.0, 0, 8)
