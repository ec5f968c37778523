"""Every checker of diaglab.exercises accepts the right answer, rejects typical wrong ones
with a message that names the mistake, and says so when the template is still untouched."""

from __future__ import annotations

import pytest
import torch

import diaglab
from diaglab import exercises, schedule
from diaglab.memory import EPS, associative_read, features


def rejected(verdict, *words):
    """A wrong answer: falsy, and the message contains each of words (case-insensitive)."""
    assert not verdict, f"a wrong answer passed: {verdict.message}"
    assert verdict.message.startswith("✗"), verdict.message
    for w in words:
        assert w.lower() in verdict.message.lower(), f"{w!r} not in {verdict.message!r}"
    return True


def template(*args):
    raise NotImplementedError


# ---- the right answers, written as a learner would --------------------------------------
def segment_lengths(N, n):
    return [n] * (N // n) + ([N % n] if N % n else [])


def memory_bytes(L, d, d_mem, nu, nb):
    dk = 2 * nu * d_mem
    return L * (dk * d + dk) * nb


def phi(u, nu):
    r = torch.cat([u.relu(), (-u).relu()], dim=-1)
    return torch.cat([r * r.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def write(k, v, beta, W_mem, z, first, correction=True, delta_rule=True, clip=True, strength=True):
    if first:
        v_bar, gamma = torch.zeros_like(v), torch.ones(k.shape[:-1])
    else:
        delta = (k @ z[..., None]).squeeze(-1) + EPS
        v_bar = (k @ W_mem) / delta[..., None] if delta_rule else torch.zeros_like(v)
        gamma = 1 - delta / ((k * k).sum(-1) + EPS)
        gamma = gamma.clamp(0, 1) if clip else gamma
        gamma = gamma if correction else torch.ones_like(gamma)
    b = beta if strength else torch.ones_like(beta)
    return W_mem + k.transpose(-1, -2) @ (b * (v - v_bar)), z + (gamma[..., None] * k).sum(-2)


def antidiagonal(t, L, S):
    return [(l, t - l) for l in range(max(0, t - S + 1), min(t, L - 1) + 1)]


def inbox(t, L, S):
    return {(l + 1, s) for l, s in antidiagonal(t, L, S) if l < L - 1}


def read(h, layer, W_mem, z):
    q = features(layer.W_mq(h), layer.nu, layer.normalize)
    return (q @ W_mem) / (q @ z[..., None] + EPS)


# ---- the tests -----------------------------------------------------------------------------
def test_segment_lengths():
    assert exercises.check_segment_lengths(segment_lengths)
    rejected(exercises.check_segment_lengths(lambda N, n: [n] * (N // n)), "drops the last")
    rejected(exercises.check_segment_lengths(lambda N, n: [n] * -(-N // n)), "full last segment")
    rejected(exercises.check_segment_lengths(lambda N, n: segment_lengths(N, n)[::-1]), "wrong order")
    rejected(exercises.check_segment_lengths(lambda N, n: [n] * (N // n) + [N % n]), "empty segment")


def test_memory_bytes():
    assert exercises.check_memory_bytes(memory_bytes)
    assert memory_bytes(4, 128, 16, 3, 4) == 198144          # notebook 01's measured figure
    rejected(exercises.check_memory_bytes(lambda L, d, dm, nu, nb: L * 2 * nu * dm * d * nb), "keeps z")
    rejected(exercises.check_memory_bytes(lambda L, d, dm, nu, nb: L * (nu * dm * d + nu * dm) * nb), "2 · nu · d_mem")
    rejected(exercises.check_memory_bytes(lambda L, d, dm, nu, nb: memory_bytes(1, d, dm, nu, nb)), "L layers")
    rejected(exercises.check_memory_bytes(lambda L, d, dm, nu, nb: memory_bytes(L, d, dm, nu, 1)), "bytes per number")


def test_dpfp():
    assert exercises.check_dpfp(phi)
    assert exercises.check_dpfp(diaglab.dpfp)
    only_pos = lambda u, nu: torch.cat([u.relu() * u.relu().roll(j, -1) for j in range(1, nu + 1)], -1)
    rejected(exercises.check_dpfp(only_pos), "kept only one half")
    rejected(exercises.check_dpfp(lambda u, nu: torch.cat([u.relu(), (-u).relu()], -1)), "concatenate the nu products")

    def wrong_way(u, nu):
        r = torch.cat([u.relu(), (-u).relu()], dim=-1)
        return torch.cat([r * r.roll(-j, dims=-1) for j in range(1, nu + 1)], dim=-1)

    def from_zero(u, nu):
        r = torch.cat([u.relu(), (-u).relu()], dim=-1)
        return torch.cat([r * r.roll(j, dims=-1) for j in range(nu)], dim=-1)

    rejected(exercises.check_dpfp(wrong_way), "wrong way")
    rejected(exercises.check_dpfp(from_zero), "j runs from 1")
    rejected(exercises.check_dpfp(lambda u, nu: torch.cat([u, -u] * nu, -1)), "negative")


def test_write():
    assert exercises.check_write(write)
    assert exercises.check_write(lambda *a: diaglab.associative_write(*a[:5], torch.full((a[0].shape[0],), a[5])))
    rejected(exercises.check_write(lambda *a: write(*a, delta_rule=False)), "naive write", "v − v̄")
    rejected(exercises.check_write(lambda *a: write(*a, correction=False)), "no correction", "γ")
    rejected(exercises.check_write(lambda *a: write(*a, clip=False)), "clip")
    rejected(exercises.check_write(lambda *a: write(*a, strength=False)), "beta")


def test_write_inputs_exercise_the_clip():
    """The checker's memory must clip gamma for some keys and not others, or 'no clip' would pass."""
    k, v, beta, W_mem, z = exercises._write_inputs()
    gamma = 1 - ((k @ z[..., None]).squeeze(-1) + EPS) / ((k * k).sum(-1) + EPS)
    assert (gamma < 0).any() and ((gamma > 0) & (gamma < 1)).any()


def test_antidiagonal():
    assert exercises.check_antidiagonal(antidiagonal)
    assert exercises.check_antidiagonal(lambda t, L, S: schedule.diagonal(L, S)[t])
    rejected(exercises.check_antidiagonal(lambda t, L, S: [(l, t - l) for l in range(t + 1)]), "inside the grid")
    rejected(exercises.check_antidiagonal(lambda t, L, S: [(s, l) for l, s in antidiagonal(t, L, S)]), "layer first")
    rejected(exercises.check_antidiagonal(lambda t, L, S: antidiagonal(t, L, S)[::-1]), "increasing layer")
    rejected(exercises.check_antidiagonal(lambda t, L, S: [(l, t - l - 1) for l in range(L)]), "layer + segment = t")


def test_predictions():
    assert exercises.check_prediction("steps_L16_S4", 16 + 4 - 1)
    assert len(schedule.diagonal(16, 4)) == 19
    rejected(exercises.check_prediction("steps_L16_S4", 64), "L · S")
    rejected(exercises.check_prediction("steps_L16_S4", 20), "one step too many")
    rejected(exercises.check_prediction("steps_L16_S4", 7), "draw the grid")   # any other number: a generic hint
    groups = [len(step) for step in schedule.diagonal(16, 4)]
    assert exercises.check_prediction("groups_L16_S4", groups)
    rejected(exercises.check_prediction("groups_L16_S4", [*range(1, 17), *range(15, 0, -1)]), "min(L, S)")
    rejected(exercises.check_prediction("groups_L16_S4", [4] * 16), "ramps")
    with pytest.raises(KeyError, match="the exercises are"):
        exercises.check_prediction("steps", 19)


def test_inbox():
    assert exercises.check_inbox(inbox)
    rejected(exercises.check_inbox(lambda t, L, S: set(antidiagonal(t, L, S))), "inputs")
    rejected(exercises.check_inbox(lambda t, L, S: {(l + 1, s) for l, s in antidiagonal(t, L, S)}), "LM head")
    rejected(exercises.check_inbox(lambda t, L, S: {(l, s + 1) for l, s in antidiagonal(t, L, S) if s + 1 < S}),
             "memory")
    rejected(exercises.check_inbox(lambda t, L, S: set(antidiagonal(t + 1, L, S))), "layer 0")


def test_read():
    assert exercises.check_read(read)
    rejected(exercises.check_read(lambda h, a, W, z: h + read(h, a, W, z)), "residual")
    rejected(exercises.check_read(lambda h, a, W, z: associative_read(diaglab.dpfp(a.W_mq(h)), W, z)), "unit length")
    rejected(exercises.check_read(lambda h, a, W, z: associative_read(features(a.W_mk(h), 3, a.normalize), W, z)),
             "W_mq")
    rejected(exercises.check_read(lambda h, a, W, z: features(a.W_mq(h), 3, a.normalize) @ W), "q · z")


@pytest.mark.parametrize("check", [exercises.check_segment_lengths, exercises.check_memory_bytes, exercises.check_dpfp,
                                   exercises.check_write, exercises.check_antidiagonal, exercises.check_inbox,
                                   exercises.check_read])
def test_untouched_template_and_errors(check):
    untouched = check(template)
    assert not untouched and "not attempted yet" in untouched.message and "collapsed cell" in untouched.message
    assert not check(lambda *a: None)

    def broken(*args):
        return 1 / 0

    crashed = check(broken)
    assert not crashed and "ZeroDivisionError" in crashed.message
    assert "not attempted" in exercises.check_prediction("steps_L16_S4", None).message


# answers of the wrong form: each checker says what came back and what it expected, and never raises
CHECKERS = [exercises.check_segment_lengths, exercises.check_memory_bytes, exercises.check_dpfp, exercises.check_write,
            exercises.check_antidiagonal, exercises.check_inbox, exercises.check_read]
WRONG_FORMS = {
    "an int": 3,
    "a 3-tuple": (1, 2, 3),
    "3-tuples": [(0, 0, 0), (1, 1, 1)],
    "a list of ints": [1, 2, 3],
    "a set": {(0, 1), 5},
    "a tensor": torch.ones(2, 3),
    "a complex tensor": torch.ones(2, 3, dtype=torch.complex64),
    "a pair of mis-shaped tensors": (torch.ones(3), torch.ones(3)),
    "a string": "32, 32",
    "a dict": {"W_mem": 1},
    "not a number": float("nan"),
}


@pytest.mark.parametrize("answer", WRONG_FORMS.values(), ids=list(WRONG_FORMS))
@pytest.mark.parametrize("check", CHECKERS, ids=lambda c: c.__name__)
def test_wrong_forms_are_told_not_raised(check, answer):
    verdict = check(lambda *a: answer)
    assert isinstance(verdict, exercises.Verdict) and not verdict and verdict.message.startswith("✗"), verdict


def _complex(t):
    return t.to(torch.complex64) + 1j            # the right real part, and an imaginary one


@pytest.mark.parametrize("check, fn, words", [
    (exercises.check_dpfp, lambda u, nu: _complex(phi(u, nu)), ["complex64 tensor", "a real torch.Tensor"]),
    (exercises.check_write, lambda *a: tuple(map(_complex, write(*a))), ["complex64 tensor", "the pair (W_mem, z)"]),
    (exercises.check_write, lambda *a: list(write(*a)) + [None], ["list", "the pair (W_mem, z)"]),
    (exercises.check_read, lambda *a: _complex(read(*a)), ["complex64 tensor", "shape (2, 5, 16)"]),
    (exercises.check_segment_lengths, lambda N, n: len(segment_lengths(N, n)), ["an int 4", "a list of ints"]),
    (exercises.check_memory_bytes, lambda *a: torch.tensor([memory_bytes(*a)] * 2), ["tensor of shape (2,)", "bytes"]),
    (exercises.check_antidiagonal, lambda t, L, S: [(l, s, 0) for l, s in antidiagonal(t, L, S)], ["pairs of ints"]),
    (exercises.check_inbox, lambda t, L, S: [l for l, _ in inbox(t, L, S)] or [0], ["list", "pairs of ints"]),
])
def test_wrong_forms_of_right_values_say_what_came_back(check, fn, words):
    rejected(check(fn), *words)


def test_right_values_in_other_forms_still_pass():
    assert exercises.check_segment_lengths(lambda N, n: torch.tensor(segment_lengths(N, n), dtype=torch.long))
    assert exercises.check_memory_bytes(lambda *a: float(memory_bytes(*a)))
    assert exercises.check_write(lambda *a: list(write(*a)))
    assert exercises.check_antidiagonal(lambda t, L, S: [list(cell) for cell in antidiagonal(t, L, S)])
    assert exercises.check_inbox(lambda t, L, S: list(inbox(t, L, S)))
    assert exercises.check_prediction("steps_L16_S4", torch.tensor(19))


@pytest.mark.parametrize("name, answer", [("steps_L16_S4", {19}), ("steps_L16_S4", torch.tensor([19, 19])),
                                          ("steps_L16_S4", "19"), ("steps_L16_S4", 19 + 0j),
                                          ("groups_L16_S4", {1, 2, 3}), ("groups_L16_S4", [[1, 2], [3]]),
                                          ("groups_L16_S4", {"a": 1}), ("groups_L16_S4", 19)])
def test_predictions_of_the_wrong_form(name, answer):
    rejected(exercises.check_prediction(name, answer), "you said", "the answer is a")
