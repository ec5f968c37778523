"""The fast path and its naive twin, side by side: grouped.grouped_layer (stacked weights,
one batched matmul per projection) against grouped.grouped_layer_ref (the model's own
decoder and associative layers, one at a time), on the same inputs — fp32 <= 1e-6 on
every output, with live memory (random non-zero W_mv, a state after real segments)."""

import pytest
import torch
from conftest import live_model, random_ids, rel

import diaglab
from diaglab import DiagonalExecutor
from diaglab.grouped import grouped_layer, grouped_layer_ref
from diaglab.segments import segment_rows, stack_rows


def _step_inputs(model, B, lo, hi, padded, partial, seed=0):
    """Arguments of one step of layers lo..hi: G different segments (padded rows and a partial
    segment if asked), memory after two real segments, one row still on its first segment."""
    n, G = model.config.segment_size, hi - lo + 1
    N = n * G - (3 if partial else 0)
    ids = random_ids(B, N, seed=seed)
    mask = None
    if padded:
        mask = torch.ones(B, N, dtype=torch.long)
        mask[-1, N - n - 2:] = 0                      # the last row ends inside segment G-2
    seg, _ = model.prepare(ids, attention_mask=mask)
    rows = [segment_rows(model, seg, s, pad=True) for s in range(G)]
    cos, sin, mask, wmask = stack_rows(rows)
    g = torch.Generator().manual_seed(seed)
    X = torch.stack([r.X for r in rows]) + 0.3 * torch.randn(G, B, n + model.config.num_mem_tokens,
                                                            model.hidden_size, generator=g)   # (G, B, T, d)
    state = model(random_ids(B, 2 * n, seed=seed + 1)).state
    W_mem, z, first = state.layers(lo, hi)
    first = first.clone()
    first[0, 0] = True                                # layer lo, row 0: its first segment (no read, vbar = 0)
    return X, dict(lo=lo, hi=hi, n_text=n, cos=cos, sin=sin, mask=mask, W_mem=W_mem, z=z, is_first=first,
                   write_mask=wmask, read=True)


@pytest.mark.parametrize("lo,hi", [(0, 0), (1, 2), (0, 3), (2, 3)])          # group sizes 1, 2, 4, 2
@pytest.mark.parametrize("variant", ["plain", "bias", "gqa4", "mha", "padded", "partial", "no_correction"])
def test_grouped_layer_equals_its_twin(lo, hi, variant):
    kw = {"bias": dict(attention_bias=True, mlp_bias=True), "gqa4": dict(heads=4, kv_heads=1),
          "mha": dict(heads=4, kv_heads=4), "no_correction": dict(correction=False)}.get(variant, {})
    model = live_model(layers=4, **kw)
    if variant == "bias":
        with torch.no_grad():
            for p in model.base.parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
    X, args = _step_inputs(model, 3, lo, hi, padded=variant == "padded", partial=variant == "partial")
    layers, step = DiagonalExecutor(model).layer_stack()
    assert step is grouped_layer
    with torch.no_grad():
        fast = grouped_layer(X, layers=layers, **args)
        ref = grouped_layer_ref(X, layers=layers, **args)
    for name, a, b in zip(("Y", "W_mem", "z"), fast, ref):
        assert a.shape == b.shape, name
        assert rel(a, b) <= 1e-6, (name, rel(a, b))
    writes = torch.ones(X.shape[:2], dtype=torch.bool) if args["write_mask"] is None else args["write_mask"]
    if writes.any():                                   # the write really changed the memory ...
        assert rel(fast[1][writes], args["W_mem"][writes]) > 1e-3
    if not writes.all():                               # ... and a row that does not fill its segment keeps it
        kept = args["W_mem"].masked_fill(args["is_first"][..., None, None], 0)   # (empty on a first segment)
        assert torch.equal(fast[1][~writes], kept[~writes])


def test_twins_take_the_same_keyword_only_arguments():
    import inspect
    a, b = inspect.signature(grouped_layer), inspect.signature(grouped_layer_ref)
    assert list(a.parameters) == list(b.parameters)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(a.parameters.values())[1:])


def test_sequential_model_is_the_twin_on_one_layer():
    """ARMT.forward runs grouped_layer_ref on (l, l): patching the twin to fail shows it is called."""
    import diaglab.armt as armt
    model = live_model(layers=2)
    calls = []
    real = armt.grouped_layer_ref

    def spy(X, **kw):
        calls.append((kw["lo"], kw["hi"]))
        return real(X, **kw)
    armt.grouped_layer_ref = spy
    try:
        with torch.no_grad():
            model(random_ids(1, 20))
    finally:
        armt.grouped_layer_ref = real
    assert calls == [(l, l) for _ in range(3) for l in range(2)]


# ---- the small fast twins inside grouped_layer: the same numbers, bit for bit ----------
@pytest.mark.parametrize("d_mem,nu", [(4, 1), (16, 3), (32, 3), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpfp_fast_is_dpfp_bit_for_bit(d_mem, nu, dtype):
    from diaglab.memory import dpfp, dpfp_fast, features
    u = torch.randn(3, 2, 5, d_mem, generator=torch.Generator().manual_seed(d_mem)).to(dtype)
    assert torch.equal(dpfp_fast(u, nu), dpfp(u, nu))
    assert torch.equal(features(u, nu, True, fast=True), features(u, nu, True))


def test_dpfp_fast_pairs_each_entry_with_its_roll_by_j():
    """By hand on distinct entries, so a wrong shift or order of the rolls shows."""
    from diaglab.memory import dpfp_fast
    u = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r = torch.cat([u, torch.zeros(4)])
    want = torch.cat([r * torch.roll(r, j) for j in (1, 2)])
    assert torch.equal(dpfp_fast(u, 2), want)
    assert not torch.equal(dpfp_fast(u, 2), torch.cat([r * torch.roll(r, j) for j in (2, 1)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_rolled_is_rotate_bit_for_bit(dtype):
    from diaglab.grouped import rotate, rotate_rolled, signed_sin
    model = live_model(layers=1)
    cos, sin = model.base.model.rotary_emb(torch.zeros(1), torch.arange(40)[None])   # (1, T, hd)
    x = torch.randn(6, 4, 40, cos.shape[-1], generator=torch.Generator().manual_seed(0)).to(dtype)   # (G*B, H, T, hd)
    cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    assert sin.abs().max() > 0.5
    assert torch.equal(rotate_rolled(x, cos, signed_sin(sin)), rotate(x, cos, sin))


@pytest.mark.parametrize("lo,hi", [(0, 0), (1, 3)])
def test_no_first_rows_given_as_none_is_the_same_step(lo, hi):
    """is_first=None (the host knows no row is on its first segment) skips the masks and gives
    exactly what an all-False is_first gives, in both twins."""
    model = live_model(layers=4)
    X, args = _step_inputs(model, 2, lo, hi, padded=False, partial=False)
    args["is_first"] = torch.zeros_like(args["is_first"])
    layers, _ = DiagonalExecutor(model).layer_stack()
    with torch.no_grad():
        for twin in (grouped_layer, grouped_layer_ref):
            masked, skipped = twin(X, layers=layers, **args), twin(X, layers=layers, **{**args, "is_first": None})
            for a, b in zip(masked, skipped):
                assert torch.equal(a, b), twin.__name__


def test_executor_skips_first_segment_masks_only_where_every_row_has_written(monkeypatch):
    """The executor passes is_first=None only for groups whose layers have written for every row:
    not on a layer's first segment, and not while one row of a continued state has never
    written, although other rows have (has_memory is then True)."""
    import diaglab.diagonal as diagonal
    model = live_model(layers=3)
    n = model.config.segment_size
    ids = random_ids(2, 2 * n, seed=5)
    seen = []
    real = diagonal.grouped_layer

    def spy(X, *, lo, hi, is_first, **kw):
        seen.append((lo, hi, None if is_first is None else is_first.clone()))
        return real(X, lo=lo, hi=hi, is_first=is_first, **kw)
    monkeypatch.setattr(diagonal, "grouped_layer", spy)
    ex = DiagonalExecutor(model)
    with torch.no_grad():
        ex(ids)                                          # a fresh state
        fresh, seen[:] = list(seen), []
        before = ex(ids[:, :n]).state
        first = before.is_first.clone()
        first[:, 1] = True                               # row 1 has never written, at any layer
        W_mem, z = before.W_mem.clone(), before.z.clone()
        W_mem[:, 1], z[:, 1] = 0, 0
        seen.clear()
        ex(ids, state=diaglab.MemoryState(W_mem, z, first))
    # fresh: steps (0,0) (0,1) (1,2) (2,2): a layer's first segment needs the mask, later steps do not
    assert [(lo, hi, f is None) for lo, hi, f in fresh] == [(0, 0, False), (0, 1, False), (1, 2, False),
                                                            (2, 2, True)]
    assert [(lo, hi, f is None) for lo, hi, f in seen] == [(0, 0, False), (0, 1, False), (1, 2, False),
                                                           (2, 2, True)]
    assert seen[0][2].tolist() == [[False, True]]        # layer 0, segment 0: row 1 is first, row 0 is not


def test_grouped_cells_refuses_settled_with_an_is_first():
    """settled=True (no row is first) and an is_first tensor contradict each other: refused, not stored."""
    from diaglab.grouped import grouped_cells
    model = live_model(layers=4)
    X, args = _step_inputs(model, 2, 0, 1, padded=False, partial=False)
    layers, _ = DiagonalExecutor(model).layer_stack()
    with pytest.raises(ValueError, match="contradicts"):
        grouped_cells(grouped_layer, layers, X, [], model.empty_state(2), 0, 1, args["n_text"], True,
                      settled=True, is_first=args["is_first"])


def _in_place_case(variant, case):
    """A model and one step's (X, arguments) for the in-place tests: `case` picks the step's
    flags — 'read' (a row on its first segment, the read on), 'settled' (is_first=None),
    'first' (every layer on its first segment: no read, so X itself feeds the norms and the
    first residual sum), 'zeroed' (the same on a zero memory)."""
    kw = dict(attention_bias=True, mlp_bias=True) if variant == "bias" else {}
    model = live_model(layers=4, **kw)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    X, args = _step_inputs(model, 2, 0, 3, padded=False, partial=False)
    X = X.detach().to(model.dtype)
    if case == "settled":
        args["is_first"] = None
    elif case in ("first", "zeroed"):
        args.update(read=False, is_first=torch.ones_like(args["is_first"]))
        if case == "zeroed":
            args.update(W_mem=torch.zeros_like(args["W_mem"]), z=torch.zeros_like(args["z"]))
    return model, X, args


@pytest.mark.parametrize("case", ["read", "settled", "first", "zeroed"])
@pytest.mark.parametrize("variant", ["plain", "bias", "bf16"])
def test_grouped_layer_in_place_only_without_a_graph(variant, case):
    """Under no_grad or inference mode grouped_layer writes some temporaries in place (the MLP's
    SiLU and product, the norms' weight, the residual sums): the same numbers bit for bit as
    with autograd recording, the caller's X, memory and weights untouched (with the read off, X
    itself goes into the first residual sum), and under autograd the gradients still flow (no
    in-place op on a saved tensor)."""
    model, X, args = _in_place_case(variant, case)
    layers, _ = DiagonalExecutor(model).layer_stack()
    kept = [t.clone() for t in (X, args["W_mem"], args["z"], *layers.W.values())]
    with torch.no_grad():
        quiet = grouped_layer(X, layers=layers, **args)
    with torch.inference_mode():
        inferred = grouped_layer(X, layers=layers, **args)
    Xg = X.clone().requires_grad_(True)   # a leaf: X is detached
    graphed = grouped_layer(Xg, layers=layers, **args)
    for a, b, c in zip(quiet, inferred, graphed):
        assert a.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c.detach())
    for before, now in zip(kept, (X, args["W_mem"], args["z"], *layers.W.values())):
        assert torch.equal(before, now)
    graphed[0].float().square().sum().backward()
    assert Xg.grad is not None and torch.isfinite(Xg.grad).all() and Xg.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_grouped_layer_in_place_keeps_autocast_and_vmap_results():
    """Under autocast a projection comes out in bf16 while X stays float32: X + o promotes where
    o.add_(X) would keep bf16, so no_grad must give what autograd gives (dtype and values);
    under torch.func.vmap over the weights an unbatched temporary cannot take them in place."""
    model, X, args = _in_place_case("plain", "first")
    layers, _ = DiagonalExecutor(model).layer_stack()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            quiet = grouped_layer(X, layers=layers, **args)
        graphed = grouped_layer(X.clone().requires_grad_(True), layers=layers, **args)
    for a, c in zip(quiet, graphed):
        assert a.dtype == c.dtype and torch.equal(a, c.detach())
    assert quiet[0].dtype == torch.float32
    from dataclasses import replace
    W = layers.W

    def one(norm_w):   # the step with the attention norm's weight swapped for a batched one
        return grouped_layer(X, layers=replace(layers, W={**W, "input_layernorm.weight": norm_w}, _slices={}),
                             **args)[0]
    with torch.no_grad():
        batched = torch.func.vmap(one)(torch.stack([W["input_layernorm.weight"]] * 2))
        assert torch.equal(batched[0], one(W["input_layernorm.weight"]))
