"""Checkers for the notebooks' "your turn" exercises.

Each checker runs the learner's answer on inputs of its own, compares it with diaglab's
version and returns a Verdict: truthy when right; otherwise it says what differs and gives
a hint. Typical mistakes are recognised by name (the remainder dropped, relu(-u) forgotten,
the correction left out, ...). An answer that is still the template (it raises
NotImplementedError or returns None) is told so, and where to find the solution: the
collapsed cell under the exercise. Nothing here prints or raises on a wrong answer, so a
learner's half-done notebook still runs top to bottom: an answer of the wrong form (an int
for a list, 3-tuples for pairs, a complex tensor, ...) is told what it was and what is expected.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from . import schedule
from .memory import EPS, associative_read, associative_write, dpfp, features

SOLUTION_WHERE = "the solution is in the collapsed cell below (click the '…' to show it)"


@dataclass(frozen=True)
class Verdict:
    """The result of a check: ok, and a message that says why (shown as the cell's output)."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.message


def _right(what: str) -> Verdict:
    return Verdict(True, f"✓ correct: {what}")


def _wrong(what: str, hint: str) -> Verdict:
    return Verdict(False, f"✗ not yet: {what}\n  hint: {hint}")


def _call(fn: Callable, *args, form: tuple[Callable, str] | None = None) -> tuple[object, Verdict | None]:
    """fn(*args), or a Verdict saying the template is untouched or the code raised; with
    form = (convert, wanted), the result converted by _form (a Verdict when it has another form)."""
    try:
        result = fn(*args)
    except NotImplementedError:
        result = None
    except Exception as err:  # the learner's code: any error becomes a message, never a crash
        return None, _wrong(f"your function raised {type(err).__name__}: {err}",
                            "run it on a small input by hand and read the traceback")
    if result is None:
        return None, Verdict(False, f"… not attempted yet: fill in the body and run the cell again; {SOLUTION_WHERE}")
    return (result, None) if form is None else _form(result, *form)


def _close(a, b, tol: float = 1e-5) -> bool:
    return (isinstance(a, torch.Tensor) and not a.is_complex() and a.shape == b.shape
            and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol))


# ---- the form of an answer: converted here, or told what it was -----------------------
def _describe(x) -> str:
    """What the learner returned, in a few words: a tensor's dtype and shape, else type and value."""
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)) and 0 < len(x) <= 4 and any(isinstance(i, torch.Tensor) for i in x):
        return f"a {type(x).__name__} of {len(x)}: " + ", ".join(_describe(i) for i in x)
    try:
        text = repr(x)
    except Exception:  # the learner's object: even its repr may fail
        text = "(no repr)"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} {text if len(text) <= 60 else text[:57] + '...'}"


def _form(got, convert: Callable, wanted: str) -> tuple[object, Verdict | None]:
    """(convert(got), None), or (None, a Verdict saying what came back and what was expected)
    when convert raises: the answer does not have the form `wanted`."""
    try:
        return convert(got), None
    except Exception:  # whatever the learner returned: a message, never a crash
        return None, _wrong(f"you returned {_describe(got)}", f"the checker expects {wanted}")


def _whole(x) -> int:
    """x as an int: an int, a whole float or a one-element real tensor; anything else raises."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex():
            raise TypeError(f"not one real number: {_describe(x)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or x != int(x):
        raise TypeError(f"not a whole number: {x!r}")
    return int(x)


def _sequence(x) -> list:
    """The items of x, a list, tuple, 1-d tensor or other ordered iterable (not a set, dict or string)."""
    if isinstance(x, (str, bytes, dict, set, frozenset)) or (isinstance(x, torch.Tensor) and x.dim() != 1):
        raise TypeError(f"not a sequence: {_describe(x)}")
    return list(x)


def _whole_list(x) -> list[int]:
    return [_whole(v) for v in _sequence(x)]


def _pairs(x) -> list[tuple[int, int]]:
    """x as (layer, segment) pairs of ints: any collection of pairs but a string or a dict."""
    if isinstance(x, (str, bytes, dict)) or (isinstance(x, torch.Tensor) and x.dim() != 2):
        raise TypeError(f"not a collection of pairs: {_describe(x)}")
    cells = [tuple(_whole(v) for v in _sequence(cell)) for cell in x]
    if any(len(cell) != 2 for cell in cells):
        raise ValueError("a cell is not a pair")
    return cells


def _real_tensor(shape: tuple[int, ...] | None = None) -> Callable:
    """A converter that passes a real (not complex) tensor, of the given shape if one is given."""
    def convert(x):
        if not isinstance(x, torch.Tensor) or x.is_complex() or (shape is not None and tuple(x.shape) != shape):
            raise TypeError(f"not a real tensor of shape {shape}: {_describe(x)}")
        return x
    return convert


def _tensor_pair(*shapes: tuple[int, ...]) -> Callable:
    """A converter that passes a pair (a tuple or list) of real tensors of the two shapes."""
    def convert(x):
        items = _sequence(x)
        if len(items) != 2:
            raise TypeError(f"not a pair: {_describe(x)}")
        return tuple(_real_tensor(shape)(t) for t, shape in zip(items, shapes))
    return convert


# ---- notebook 01 ----------------------------------------------------------------------
def check_segment_lengths(fn: Callable[[int, int], list[int]]) -> Verdict:
    """fn(N, n) -> the lengths of ARMT's segments of N tokens: chunks of n from the left."""
    for N, n in ((100, 32), (64, 32), (5, 32), (1, 1), (33, 8)):
        expected = [n] * (N // n) + ([N % n] if N % n else [])
        got, verdict = _call(fn, N, n, form=(_whole_list, "a list of ints, e.g. [32, 32, 32, 4]"))
        if verdict is not None:
            return verdict
        if got == expected:
            continue
        if got == [n] * (N // n):
            return _wrong(f"N={N}, n={n}: you returned {got}, which drops the last {N % n} tokens",
                          "keep a shorter last segment: its length is N % n")
        if got == [n] * -(-N // n):
            return _wrong(f"N={N}, n={n}: you returned {got}, a full last segment",
                          "segments are not padded: the last one has only the N % n tokens left over")
        if sorted(got) == sorted(expected):
            return _wrong(f"N={N}, n={n}: you returned {got}: the right lengths in the wrong order",
                          "cut from the left: full segments first, the short one last")
        if got == expected + [0] or (N % n == 0 and got[-1:] == [0]):
            return _wrong(f"N={N}, n={n}: you returned {got}, with an empty segment", "there is no segment of 0 tokens")
        return _wrong(f"N={N}, n={n}: expected {expected}, you returned {got}",
                      "N // n full segments of n, then one of N % n if that is not 0")
    return _right("full segments of n from the left, then the N % n tokens left over")


def check_memory_bytes(fn: Callable[[int, int, int, int, int], int]) -> Verdict:
    """fn(L, d, d_mem, nu, bytes_per_number) -> bytes of ARMT's memory state (W_mem and z of every layer)."""
    for L, d, d_mem, nu, nb in ((3, 128, 16, 3, 4), (16, 2048, 64, 3, 2), (2, 64, 8, 2, 4)):
        dk = 2 * nu * d_mem
        expected = L * (dk * d + dk) * nb
        got, verdict = _call(fn, L, d, d_mem, nu, nb, form=(_whole, "one whole number of bytes (an int)"))
        if verdict is not None:
            return verdict
        if got == expected:
            continue
        case = f"L={L}, d={d}, d_mem={d_mem}, nu={nu}, {nb} bytes: expected {expected}, you returned {got}"
        if got == L * dk * d * nb:
            return _wrong(case, "each layer keeps z (dk numbers) next to W_mem (dk × d)")
        if got in (L * (nu * d_mem * d + nu * d_mem) * nb, L * (d_mem * d + d_mem) * nb):
            return _wrong(case, "the key size is dk = 2 · nu · d_mem: DPFP doubles d_mem (relu(u), relu(−u)) "
                                "and multiplies by nu")
        if got == (dk * d + dk) * nb:
            return _wrong(case, "every one of the L layers has its own W_mem and z")
        if got == L * (dk * d + dk):
            return _wrong(case, "multiply the count of numbers by the bytes per number")
        return _wrong(case, "per layer: W_mem (dk × d) and z (dk), dk = 2 · nu · d_mem; times L layers, times bytes")
    return _right("L · (dk · d + dk) numbers, dk = 2 · nu · d_mem, whatever the text length")


# ---- notebook 02 ----------------------------------------------------------------------
def check_dpfp(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Verdict:
    """fn(u, nu) -> phi(u): u (..., d_mem) -> (..., 2 * nu * d_mem), the DPFP feature map."""
    u = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    for nu in (3, 2):
        expected = dpfp(u, nu)
        got, verdict = _call(fn, u.clone(), nu, form=(_real_tensor(), "a real torch.Tensor (float, not complex)"))
        if verdict is not None:
            return verdict
        d_mem = u.shape[-1]
        if got.shape != expected.shape:
            hint = "keep the leading dimensions and work on the last axis (dim=-1)"
            if got.shape[:-1] == u.shape[:-1]:
                hint = {nu * d_mem: "r = [relu(u); relu(−u)] has 2 · d_mem entries: you kept only one half",
                        2 * d_mem: "concatenate the nu products r · roll_j(r), j = 1 … nu"}.get(got.shape[-1], hint)
            return _wrong(f"nu={nu}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}", hint)
        if (got < 0).any():
            return _wrong(f"nu={nu}: some features are negative", "take r = [relu(u); relu(−u)]: both halves ≥ 0")
        if _close(got, expected):
            continue
        r = torch.cat([u.relu(), (-u).relu()], -1)
        blocks = got.split(2 * d_mem, dim=-1)
        for j, block in enumerate(blocks, start=1):
            if _close(block, expected.split(2 * d_mem, dim=-1)[j - 1]):
                continue
            if _close(block, r * r.roll(-j, -1)):
                return _wrong(f"nu={nu}: block {j} is rolled the wrong way",
                              "roll_j(r)_i = r_(i−j): torch.roll(r, j, dims=-1), a positive shift")
            if _close(block, r * r.roll(j - 1, -1)):
                return _wrong(f"nu={nu}: block {j} uses a shift of {j - 1}", "j runs from 1 to nu; j = 0 would give r · r")
            return _wrong(f"nu={nu}: block {j} (entries {(j - 1) * 2 * d_mem}…{j * 2 * d_mem - 1}) differs",
                          "block j is r · torch.roll(r, j, dims=-1) with r = [relu(u); relu(−u)]")
    return _right("phi(u) = concat_j r · roll_j(r), non-negative and 2 · nu · d_mem wide")


def _write_inputs(B=2, M=4, d_mem=2, d=6):
    """Keys, values, strengths and a non-empty memory where gamma is clipped for some keys and not others."""
    g = torch.Generator().manual_seed(1)
    k = dpfp(torch.randn(B, M, d_mem, generator=g))                              # (B, M, dk)
    v, beta = torch.randn(B, M, d, generator=g), torch.rand(B, M, 1, generator=g)
    W_mem = torch.randn(B, 6 * d_mem, d, generator=g)                            # (B, dk, d)
    z = dpfp(torch.randn(B, 3, d_mem, generator=g)).sum(-2) * torch.rand(B, 1, generator=g) * 3   # (B, dk)
    return k, v, beta, W_mem, z


def check_write(fn: Callable) -> Verdict:
    """fn(k, v, beta, W_mem, z, first) -> (W_mem, z): the delta-rule write with correction.

    k (B, M, dk), v (B, M, d), beta (B, M, 1), W_mem (B, dk, d), z (B, dk); first: bool.
    """
    k, v, beta, W_mem, z = _write_inputs()
    for first in (False, True):
        if first:
            W_mem, z = torch.zeros_like(W_mem), torch.zeros_like(z)
        flags = torch.full((k.shape[0],), first)
        exp_W, exp_z = associative_write(k, v, beta, W_mem, z, flags)
        shapes = tuple(W_mem.shape), tuple(z.shape)
        got, verdict = _call(fn, k, v, beta, W_mem.clone(), z.clone(), first, form=(
            _tensor_pair(*shapes), f"the pair (W_mem, z): real tensors of shapes {shapes[0]} and {shapes[1]}"))
        if verdict is not None:
            return verdict
        got_W, got_z = got
        when = "on the first segment" if first else "on a later segment"
        if not _close(got_W, exp_W):
            if _close(got_W, W_mem + k.transpose(-1, -2) @ (beta * v)):
                return _wrong(f"W_mem {when}: you add beta · outer(k, v), the naive write",
                              "write only the difference v − v̄, with v̄ = k W_mem / (k · z + ε): what memory returns now")
            if _close(got_W, associative_write(k, v, torch.ones_like(beta), W_mem, z, flags)[0]):
                return _wrong(f"W_mem {when}: each write has full strength", "scale v_j − v̄_j by beta_j")
            return _wrong(f"W_mem {when} differs from the delta rule (max |Δ| = {float((got_W - exp_W).abs().max())})",
                          "W_mem + Σ_j beta_j · outer(k_j, v_j − v̄_j); on the first segment v̄ = 0")
        if not _close(got_z, exp_z):
            if _close(got_z, z + k.sum(-2)):
                return _wrong(f"z {when}: you add every key in full (γ = 1), with no correction",
                              "add γ_j · k_j with γ_j = clip(1 − δ_j / (|k_j|² + ε), 0, 1), δ_j = k_j · z + ε")
            delta = (k @ z[..., None]).squeeze(-1) + EPS
            unclipped = (1 - delta / ((k * k).sum(-1) + EPS))[..., None]
            if _close(got_z, z + (unclipped * k).sum(-2)):
                return _wrong(f"z {when}: γ goes below 0 for keys z already counts", "clip γ to [0, 1] (clamp(0, 1))")
            return _wrong(f"z {when} differs from the corrected update", "z + Σ_j γ_j · k_j; on the first segment γ = 1")
    return _right("W_mem += Σ beta · outer(k, v − v̄) and z += Σ γ · k, with v̄ = 0 and γ = 1 on the first segment")


# ---- notebook 03 ----------------------------------------------------------------------
def check_antidiagonal(fn: Callable[[int, int, int], list[tuple[int, int]]]) -> Verdict:
    """fn(t, L, S) -> the cells (layer, segment) of anti-diagonal t, by increasing layer."""
    cases = []                                                                  # (t, L, S, expected, answer)
    for L, S in ((4, 6), (16, 4), (1, 3), (3, 1)):
        for t, expected in enumerate(schedule.diagonal(L, S)):
            got, verdict = _call(fn, t, L, S, form=(
                _pairs, "a list of (layer, segment) pairs of ints, e.g. [(0, 2), (1, 1)]"))
            if verdict is not None:
                return verdict
            cases.append((t, L, S, expected, got))
    wrong = [c for c in cases if c[3] != c[4]]
    if not wrong:
        return _right("cells (l, t − l) for l = max(0, t − S + 1) … min(t, L − 1)")
    if all(sorted((s, l) for l, s in got) == expected for *_, expected, got in cases):
        return _wrong("your cells are (segment, layer)", "a cell is (layer, segment): layer first")
    t, L, S, expected, got = wrong[0]
    case = f"t={t}, L={L}, S={S}: expected {expected}, you returned {got}"
    if any(l + s != t for l, s in got):
        return _wrong(case, "on anti-diagonal t every cell has layer + segment = t")
    if any(not (0 <= l < L and 0 <= s < S) for l, s in got):
        return _wrong(case, "keep the cells inside the grid: layers lo = max(0, t − S + 1) … hi = min(t, L − 1)")
    if sorted(got) == expected:
        return _wrong(case, "list the cells by increasing layer, as schedule.diagonal does")
    return _wrong(case, "layer l runs segment t − l, for every layer l with 0 ≤ t − l < S")


PREDICTIONS = {
    # name: (question, right answer, {typical wrong answer: hint})
    "steps_L16_S4": ("how many diagonal steps for L = 16, S = 4?", 19, {
        64: "64 = L · S is the number of cells, the sequential order's step count",
        20: "L + S counts one step too many: the first and the last anti-diagonal share no cell, t = 0 … L + S − 2",
        16: "each segment must pass all 16 layers, but segments enter one step apart: the last one starts at step S − 1",
        4: "a step holds at most min(L, S) cells, so 64 cells need more than 4 steps",
    }),
    "groups_L16_S4": ("what is the group size G of every diagonal step for L = 16, S = 4?", [1, 2, 3] + [4] * 13 + [3, 2, 1], {
        tuple([*range(1, 17), *range(15, 0, -1)]): "a step holds one cell per *segment* in flight too: G ≤ min(L, S) = 4",
        tuple([4] * 16): "the pipeline fills and drains: G ramps 1, 2, 3 up and 3, 2, 1 down",
        tuple([1, 2, 3] + [4] * 14 + [3, 2, 1]): "the sizes must add up to L · S = 64 cells",
    }),
}


def check_prediction(name: str, answer) -> Verdict:
    """A predict-then-run exercise: compare the learner's answer with PREDICTIONS[name]."""
    if name not in PREDICTIONS:
        raise KeyError(f"no exercise {name!r}; the exercises are {sorted(PREDICTIONS)}")
    question, right, hints = PREDICTIONS[name]
    if answer is None or answer is ...:
        return Verdict(False, f"… not attempted yet: {question} Set your answer and run the cell; {SOLUTION_WHERE}")
    wanted = "a list of whole numbers" if isinstance(right, list) else "a whole number"
    try:
        key = tuple(_whole_list(answer)) if isinstance(right, list) else _whole(answer)
    except Exception:  # the learner's answer: told its form, never a crash
        return _wrong(f"{question} You said {_describe(answer)}", f"the answer is {wanted}")
    if key == (tuple(right) if isinstance(right, list) else right):
        return _right(f"{question} {right}")
    hint = hints.get(key, "draw the grid (schedule.diagonal) and count; notebook 03 has the formula")
    return _wrong(f"{question} You said {answer}", hint)


# ---- notebook 04 ----------------------------------------------------------------------
def check_inbox(fn: Callable[[int, int, int], set[tuple[int, int]]]) -> Verdict:
    """fn(t, L, S) -> the keys (layer, segment) waiting in the executor's inbox right after step t."""
    for L, S in ((4, 8), (3, 2), (1, 4)):
        steps = schedule.diagonal(L, S)
        for t, cells in enumerate(steps):
            expected = {(l + 1, s) for l, s in cells if l < L - 1}
            got, verdict = _call(fn, t, L, S, form=(
                lambda x: set(_pairs(x)), "a set of (layer, segment) pairs of ints, e.g. {(1, 0), (2, 1)}"))
            if verdict is not None:
                return verdict
            if got == expected:
                continue
            case = f"t={t}, L={L}, S={S}: expected {sorted(expected)}, you returned {sorted(got)}"
            if got == set(cells):
                return _wrong(case, "the inbox holds the *inputs* of the next step: cell (l, s) leaves its output "
                                    "for (l + 1, s), the layer above")
            if any(l == L for l, _ in got):
                return _wrong(case, "a segment leaving the last layer goes to the final norm and LM head, "
                                    "not to the inbox")
            if t + 1 < len(steps) and got == set(steps[t + 1]) and any(l == 0 for l, _ in got):
                return _wrong(case, "layer 0's input is the next embedded segment, built when it is needed: "
                                    "it never waits in the inbox")
            if any((l, s - 1) in cells for l, s in got):
                return _wrong(case, "the next segment of the same layer gets the layer's memory (W_mem, z), "
                                    "not its rows: rows go up, to (l + 1, s)")
            return _wrong(case, "after step t the inbox holds (l + 1, s) for every cell (l, s) of step t below "
                                "the last layer")
    return _right("after step t the inbox holds exactly the inputs of step t + 1 above layer 0")


# ---- notebook 06 ----------------------------------------------------------------------
@torch.no_grad()
def check_read(fn: Callable) -> Verdict:
    """fn(h, layer, W_mem, z) -> A(h): the associative read of an AssociativeLayer, h (B, T, d) -> (B, T, d)."""
    from .armt import AssociativeLayer
    g = torch.Generator().manual_seed(2)
    d, d_mem, nu = 16, 4, 3
    for normalize in (True, False):
        with torch.random.fork_rng():                                           # leave the caller's RNG alone
            torch.manual_seed(3)
            layer = AssociativeLayer(d, d_mem, nu, normalize=normalize)
        h = torch.randn(2, 5, d, generator=g)                                   # (B, T, d)
        W_mem, z = torch.randn(2, 2 * nu * d_mem, d, generator=g), torch.rand(2, 2 * nu * d_mem, generator=g)
        q = features(layer.W_mq(h), nu, normalize)                              # (B, T, dk)
        expected = associative_read(q, W_mem, z)                                # (B, T, d)
        got, verdict = _call(fn, h, layer, W_mem, z, form=(
            _real_tensor(tuple(expected.shape)), f"a real tensor of shape {tuple(expected.shape)}, like h"))
        if verdict is not None:
            return verdict
        if _close(got, expected, 1e-4):
            continue
        case = f"normalize={normalize}: your read differs"
        if _close(got, h + expected, 1e-4):
            return _wrong(case, "return A(h) alone; the layer adds the residual h + A(h) itself")
        if normalize and _close(got, associative_read(dpfp(layer.W_mq(h), nu), W_mem, z), 1e-4):
            return _wrong(case, "this layer has normalize=True: scale phi(q) to unit length "
                                "(features(..., normalize=layer.normalize))")
        if _close(got, associative_read(features(layer.W_mk(h), nu, normalize), W_mem, z), 1e-4):
            return _wrong(case, "a read uses the query projection W_mq; W_mk makes the write keys")
        if _close(got, q @ W_mem, 1e-4):
            return _wrong(case, "divide by q · z + ε: the read is normalised like softmax")
        return _wrong(case, "q = features(layer.W_mq(h), layer.nu, layer.normalize); A = q W_mem / (q · z + ε)")
    return _right("A(h) = q W_mem / (q · z + ε) with q = phi(h W_mq^T), unit length when the layer normalises")
