"""Diagonal batching is exact: the executor equals the sequential ARMT (design §3-6).

fp32: relative error <= 1e-5 on logits, loss, every layer's W_mem and z, and on the gradient
of each parameter group (<= 1e-4 per single tensor); float64, memory included: <= 1e-10 per
parameter (the algorithm, not rounding, is what is compared); bf16: <= 2e-2 on logits up to
64 segments, the last 16 segments included. Every model here has
random non-zero W_mv and distinct per-layer W_mb biases, so the memory path is live.
"""

import pytest
import torch
from conftest import live_model, random_ids, rel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diaglab
from diaglab import DiagonalExecutor


def assert_same(seq, diag, tol, real=None):
    """Logits (only where `real`, a (B, N) bool mask of non-padding tokens, if given), loss,
    every layer's W_mem and z, and is_first."""
    if real is None:
        assert rel(diag.logits, seq.logits) <= tol
    else:
        assert rel(diag.logits[real], seq.logits[real]) <= tol
    if seq.loss is not None:
        assert rel(diag.loss, seq.loss) <= tol
    for l in range(seq.state.W_mem.shape[0]):      # every layer's memory, not only logits
        assert rel(diag.state.W_mem[l], seq.state.W_mem[l]) <= tol, f"W_mem of layer {l}"
        assert rel(diag.state.z[l], seq.state.z[l]) <= tol, f"z of layer {l}"
    assert torch.equal(diag.state.is_first, seq.state.is_first)


@pytest.mark.parametrize("layers,N,B", [
    (4, 8, 1),     # S = 1
    (4, 20, 2),    # S = 3 < L, partial last segment
    (4, 32, 1),    # S == L
    (3, 77, 3),    # S > L, partial
    (2, 160, 1),   # S >> L
])
@pytest.mark.parametrize("order", ["diagonal", "sequential"])
def test_fp32_equivalence(layers, N, B, order):
    model = live_model(layers=layers)
    ids = random_ids(B, N, seed=N)
    with torch.no_grad():
        seq = model(ids, labels=ids)
        diag = DiagonalExecutor(model, order=order)(ids, labels=ids)
    assert_same(seq, diag, 1e-5)


@pytest.mark.parametrize("correction", [True, False])
def test_correction_flag(correction):
    model = live_model(layers=3, correction=correction)
    ids = random_ids(2, 45)
    with torch.no_grad():
        assert_same(model(ids, labels=ids), DiagonalExecutor(model)(ids, labels=ids), 1e-5)


def test_padding_mask_and_state_continuation(model):
    ids = random_ids(3, 30)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ex = DiagonalExecutor(model)
    with torch.no_grad():
        seq = model(ids, attention_mask=mask, labels=labels)
        diag = ex(ids, attention_mask=mask, labels=labels)
        assert_same(seq, diag, 1e-5, real=mask.bool())
        # continue from a state
        s1 = model(ids[:, :16], state=None).state
        assert_same(model(ids[:, 16:], state=s1), ex(ids[:, 16:], state=s1), 1e-5)


def _grads(fn, model, ids):
    model.zero_grad()
    fn(ids, labels=ids).loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def test_fp32_gradients_match():
    model = live_model(layers=3)
    ids = random_ids(2, 37)
    g_seq = _grads(model, model, ids)
    g_diag = _grads(DiagonalExecutor(model), model, ids)
    assert set(g_seq) == set(g_diag)
    groups = {"memory": ["memory"], "assoc": [k for k in g_seq if k.startswith("assoc")],
              "base": [k for k in g_seq if k.startswith("base")]}
    for name, keys in groups.items():   # every parameter group (memory, assoc, base)
        a = torch.cat([g_diag[k].flatten() for k in keys])
        b = torch.cat([g_seq[k].flatten() for k in keys])
        assert b.norm() > 0 and rel(a, b) <= 1e-5, name
    worst = max(rel(g_diag[k], g_seq[k]) for k in g_seq)
    assert worst <= 1e-4  # per tensor: only tiny, cancellation-dominated biases come near this


def test_float64_gradients_match_per_parameter():
    model = live_model(layers=3, memory_dtype=torch.float64).double()
    assert model.empty_state(1).W_mem.dtype == torch.float64          # the memory too, not only the weights
    ids = random_ids(2, 37)
    g_seq = _grads(model, model, ids)
    g_diag = _grads(DiagonalExecutor(model), model, ids)
    for k in g_seq:
        assert g_seq[k].norm() > 0, f"{k} gets no gradient"
        assert rel(g_diag[k], g_seq[k]) <= 1e-10, k


def test_training_step_reaches_tied_weights():
    """After an optimiser step the executor sees the new weights (no stale copies)."""
    model = live_model(layers=2)
    ex = DiagonalExecutor(model)
    ids = random_ids(1, 24)
    with torch.no_grad():
        ex(ids)                                     # ties the stacks
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    ex(ids, labels=ids).loss.backward()
    opt.step()
    moved = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert any(k.startswith("base.model.layers") for k in moved) and any(k.startswith("assoc") for k in moved)
    with torch.no_grad():
        assert_same(model(ids), ex(ids), 1e-5)


def test_inference_copies_no_weights():
    model = live_model(layers=3)
    ex = DiagonalExecutor(model)
    with torch.no_grad():
        ex(random_ids(1, 20))
        stacks = {k: v.data_ptr() for k, v in ex.stacked_weights().items()}
        ex(random_ids(1, 20))
        assert {k: v.data_ptr() for k, v in ex.stacked_weights().items()} == stacks
        qkv = ex.stacked_weights()["qkv_proj.weight"]
    q1 = model.base.model.layers[1].self_attn.q_proj.weight
    assert q1.data_ptr() == qkv[1].data_ptr()   # the layer's own weight lives in the stack


def test_executor_follows_model_moves(model):
    ex = DiagonalExecutor(model)
    ids = random_ids(1, 20)
    with torch.no_grad():
        ex(ids)
        model.double()                              # new storages: the executor re-ties
        assert ex.stacked_weights()["qkv_proj.weight"].dtype == torch.float64
        assert_same(model(ids), ex(ids), 1e-6)   # W_mem, z stay float32 (memory_dtype)


def test_executor_from_loaded_checkpoint(tmp_path):
    model = live_model(seed=5)     # not seed 0: from_pretrained builds its skeleton from seed 0 before loading
    model.save_pretrained(tmp_path / "m")
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "m")
    ids = random_ids(2, 33)
    with torch.no_grad():
        assert_same(model(ids), DiagonalExecutor(loaded)(ids), 1e-5)


def test_generate_same_tokens(model):
    ex = DiagonalExecutor(model)
    for N in (8, 16, 21):
        ids = random_ids(2, N, seed=N)
        assert torch.equal(ex.generate(ids, max_new_tokens=10), model.generate(ids, max_new_tokens=10))


def test_bf16_error_bounded_up_to_64_segments():
    model = live_model(layers=4, segment_size=8).to(torch.bfloat16)
    ex = DiagonalExecutor(model)
    errs = {}
    for S in (1, 4, 16, 64):
        ids = random_ids(1, 8 * S, seed=S)
        with torch.no_grad():
            d, s = ex(ids).logits, model(ids).logits
        errs[S] = rel(d, s)
    assert max(errs.values()) <= 2e-2, errs
    # per segment over the 64-segment run: the last segments are no worse than the bound
    per_segment = [rel(d[:, 8 * k:8 * k + 8], s[:, 8 * k:8 * k + 8]) for k in range(64)]
    assert max(per_segment[48:]) <= 2e-2, per_segment


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(1, 4), n=st.integers(1, 6), M=st.integers(1, 4), B=st.integers(1, 3),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1)]), extra=st.integers(0, 20),
       pad=st.lists(st.integers(0, 10), min_size=3, max_size=3), correction=st.booleans(),
       seed=st.integers(0, 10_000))
def test_property_equivalence(layers, n, M, B, heads, extra, pad, correction, seed):
    model = live_model(layers=layers, segment_size=n, num_mem_tokens=M, hidden=32, heads=heads[0],
                       kv_heads=heads[1], d_mem=4, vocab=64, seed=seed % 7, correction=correction)
    N = n + extra
    ids = random_ids(B, N, vocab=64, seed=seed)
    mask = torch.ones(B, N, dtype=torch.long)
    for b in range(1, B):
        mask[b, max(1, N - pad[b]):] = 0
    with torch.no_grad():
        seq = model(ids, attention_mask=mask)
        diag = DiagonalExecutor(model)(ids, attention_mask=mask)
    assert_same(seq, diag, 1e-5, real=mask.bool())


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_equals_per_layer_loop(bias):
    from diaglab.grouped import grouped_linear, grouped_linear_ref
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 7, 16, generator=g), torch.randn(5, 16, 24, generator=g)   # (G, in, out)
    b = torch.randn(5, 24, generator=g) if bias else None
    ref = grouped_linear_ref(x, W, b)
    assert rel(grouped_linear(x, W, b), ref) <= 1e-6
    if hasattr(torch, "_grouped_mm"):
        assert rel(grouped_linear(x, W, b, kernel="grouped_mm"), ref) <= 1e-6


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch")
def test_grouped_mm_kernel_equivalence(model):
    ids = random_ids(2, 30)
    with torch.no_grad():
        assert_same(model(ids), DiagonalExecutor(model, kernel="grouped_mm")(ids), 1e-5)
    with pytest.raises(ValueError, match="kernel"):
        DiagonalExecutor(model, kernel="cutlass")


def test_attention_and_mlp_biases():
    """LLaMA variants with attention_bias / mlp_bias are grouped too (biases stacked)."""
    model = live_model(layers=2, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for p in model.base.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    ids = random_ids(2, 21)
    with torch.no_grad():
        assert_same(model(ids), DiagonalExecutor(model)(ids), 1e-5)


def test_executors_share_one_copy_of_the_weights(model):
    a, b = DiagonalExecutor(model), DiagonalExecutor(model, order="sequential")
    ids = random_ids(1, 20)
    with torch.no_grad():
        first = a(ids)
        ptrs = {k: v.data_ptr() for k, v in a.stacked_weights().items()}
        second = b(ids)
        assert {k: v.data_ptr() for k, v in b.stacked_weights().items()} == ptrs   # adopted, not re-copied
        assert {k: v.data_ptr() for k, v in a.stacked_weights().items()} == ptrs   # a stays valid
    assert_same(first, second, 1e-5)


def test_steps_are_the_schedule(model):
    for order, reference in (("diagonal", diaglab.schedule.diagonal), ("sequential", diaglab.schedule.sequential)):
        ex = DiagonalExecutor(model, order=order)
        for S in (1, 2, 5):
            assert list(ex.iter_steps(S)) == reference(model.num_layers, S)


def test_llama_1b_shapes_exact_on_cpu():
    """The GPU benchmark's model at CPU cost: LLaMA-3.2-1B's attention (32 query heads over
    8 KV heads of 64, llama3 RoPE scaling, tied embeddings, 131,072 positions) with two
    layers, a narrow MLP and a small vocabulary; diagonal == sequential in fp32."""
    model = diaglab.randomize_memory_(diaglab.from_preset(
        "llama_1b", layers=2, vocab=512, intermediate=256, segment_size=48, num_mem_tokens=16, d_mem=16))
    cfg = model.base.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (32, 8, 2048)
    assert cfg.max_position_embeddings == 131072 and cfg.rope_parameters["rope_type"] == "llama3"
    assert model.base.lm_head.weight.data_ptr() == model.base.model.embed_tokens.weight.data_ptr()
    ids = random_ids(2, 48 * 3 + 20, vocab=512)
    with torch.no_grad():
        seq, diag = model.eval()(ids), DiagonalExecutor(model)(ids)
    assert_same(seq, diag, 1e-5)
    assert seq.state.W_mem.abs().amax(dim=(1, 2, 3)).min() > 0                    # every layer wrote


def test_normalize_keys_flag(tmp_path):
    """normalize_keys=True (unit-length DPFP queries and keys, as the reference ARMT code):
    executor == sequential, features of length 1, the flag survives save/load, and it does
    change the model (default off: design §2's equations exactly)."""
    model = live_model(layers=3, normalize_keys=True, seed=5)   # not seed 0: see the save/load below
    assert model.config.normalize_keys and all(a.normalize for a in model.assoc)
    ids = random_ids(2, 45)
    with torch.no_grad():
        out = model(ids, labels=ids)
        assert_same(out, DiagonalExecutor(model)(ids, labels=ids), 1e-5)
        u = torch.randn(5, 4)
        k = diaglab.memory.features(u, 3, normalize=True)
        assert torch.allclose(k.norm(dim=-1), torch.ones(5))
        assert torch.allclose(k * diaglab.dpfp(u, 3).norm(dim=-1, keepdim=True), diaglab.dpfp(u, 3))
        assert torch.equal(diaglab.memory.features(u, 3), diaglab.dpfp(u, 3))          # off: plain DPFP
        model.save_pretrained(tmp_path)
        loaded = diaglab.ARMT.from_pretrained(tmp_path)
        assert loaded.config.normalize_keys and torch.equal(loaded(ids).logits, out.logits)
        plain = live_model(layers=3, seed=5)
        assert rel(plain(ids).logits, out.logits) > 1e-3
    with pytest.raises(ValueError, match="normalize_keys must be True or False"):
        diaglab.ARMTConfig(normalize_keys=1)


def test_untie_lets_transformers_save_the_base(tmp_path):
    """The tied stacks make the layers' weights strided views (transposed, shared storage);
    transformers' save_pretrained cannot take those, diaglab's own save can, and untie()
    gives them their own storage back — after which the executor re-ties and still agrees."""
    from transformers import LlamaForCausalLM
    from diaglab.grouped import untie
    model = live_model(layers=2)
    ex = DiagonalExecutor(model)
    ids = random_ids(1, 20)
    with torch.no_grad():
        before = ex(ids)
    assert not model.base.model.layers[0].self_attn.q_proj.weight.is_contiguous()
    model.save_pretrained(tmp_path / "armt")                  # diaglab's save copies: fine while tied
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "armt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert_same(loaded(ids), before, 1e-6)
    with pytest.raises(RuntimeError):
        model.base.save_pretrained(tmp_path / "tied")
    assert untie(model) > 0 and untie(model) == 0
    assert all(p.is_contiguous() for p in model.parameters())
    model.base.save_pretrained(tmp_path / "base")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), model.base.parameters()))
    with torch.no_grad():
        assert_same(model(ids), before, 1e-6)
        assert_same(ex(ids), before, 1e-6)                    # re-tied on this call
    assert not model.base.model.layers[0].self_attn.q_proj.weight.is_contiguous()


def test_padded_batch_keeps_plain_segments_plain():
    """In a right-padded batch, a segment every row fills has positions 0.. and a causal mask:
    it needs no mask and shares the RoPE tables (only the segment where a row ends is masked);
    per-row tables of a masked step are not kept on the executor after the call."""
    from diaglab.segments import segment_rows
    model = live_model(layers=2)                           # segment 8
    ids = random_ids(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0                                       # row 1 ends inside segment 2
    seg, _ = model.prepare(ids, mask)
    rows = [segment_rows(model, seg, s, pad=True) for s in range(seg.num_segments)]
    assert [r.mask is None for r in rows] == [True, True, False, False]
    assert rows[0].cos is rows[1].cos
    ex = DiagonalExecutor(model)
    with torch.no_grad():
        assert_same(model(ids, attention_mask=mask), ex(ids, attention_mask=mask), 1e-5)
    kept = ex.layer_stack()[0]._slices.get("rope")
    assert kept is None or kept[0].shape[0] == 1


@pytest.mark.parametrize("layers", [1, 3])   # one layer: the memory comes back as one block, not joined
def test_no_grad_call_returns_ordinary_tensors(layers):
    """Under no_grad the executor runs its steps in inference mode, but what it returns is
    ordinary: logits and loss, and a memory a later call under autograd can start from (the
    continuation's gradients equal the sequential model's; with one layer the memory comes
    back as the very tensors the last step wrote). A padded batch run the same way under
    autograd afterwards, and frozen weights with a memory that needs a gradient, work too."""
    from diaglab import segments
    model = live_model(layers=layers)
    ex = DiagonalExecutor(model)
    ids, more = random_ids(2, 45, seed=3), random_ids(2, 24, seed=4)
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, 30:] = 0                                      # a padded row: the masked tables are cached
    segments._CAUSAL.clear()
    with torch.no_grad():
        out = ex(ids, attention_mask=mask, labels=ids)
        ref = model(ids, attention_mask=mask, labels=ids)
    assert not out.logits.is_inference() and not out.loss.is_inference()
    assert_same(ref, out, 1e-5, real=mask.bool())
    # the same padded shapes again, under autograd
    ex(ids, attention_mask=mask, labels=ids).loss.backward()
    with torch.no_grad():
        out = ex(ids, labels=ids)                         # no padding: a state to continue from
    # continue from the no_grad state under autograd: gradients equal the sequential model's
    grads = []
    for fn in (model, ex):
        model.zero_grad()
        fn(more, labels=more, state=out.state).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rel(grads[1], grads[0]) <= 1e-5
    assert not any(t.is_inference() for t in (out.state.W_mem, out.state.z, out.state.is_first))
    # frozen weights, a memory that needs a gradient: the tied stacks with the tables cached above
    for p in model.parameters():
        p.requires_grad_(False)
    W = out.state.W_mem.clone().requires_grad_(True)
    state = diaglab.MemoryState(W, out.state.z, out.state.is_first)
    ex(more, labels=more, state=state).loss.backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_segments", [1, 2, 3, 64])
def test_segment_feed_gives_segment_rows_own_values(monkeypatch, chunk_segments):
    """The executor's feed makes runs of plain segments with one embedding call; each segment's
    rows equal segment_rows' bit for bit — around a padded row's segment, a short last segment
    and a segment carried over from an earlier call — and a feed made in chunks of any size
    leaves the executor equal to the sequential model."""
    from diaglab import segments
    model = live_model(layers=3)
    monkeypatch.setattr(segments.SegmentFeed, "MAX_SEGMENTS", chunk_segments)
    B, n = 2, model.config.segment_size
    ids = random_ids(B, 9 * n + 5, seed=7)
    mask = torch.ones_like(ids)
    mask[1, 6 * n + 2:] = 0                               # row 1 ends inside a segment: masked rows from there
    with torch.no_grad():
        first = model(ids[:, :n + 3])                     # an open segment of 3 tokens to carry over
        seg, _ = model.prepare(ids, mask, None, first.state, "all")
        feed = segments.SegmentFeed(model, seg)
        for s in range(seg.num_segments):
            got, want = feed.rows(s), segments.segment_rows(model, seg, s, pad=True)
            assert torch.equal(got.X, want.X) and got.n_text == want.n_text
            assert torch.equal(got.cos, want.cos) and torch.equal(got.sin, want.sin)
            for a, b in ((got.mask, want.mask), (got.write_mask, want.write_mask)):
                assert (a is None and b is None) or torch.equal(a, b)
        short = torch.ones(B, 7 * n, dtype=torch.long)
        short[1, 5 * n + 2:] = 0                          # row 1 ends inside segment 5: masked rows from there
        for m in (None, short):
            seq = model(ids[:, :7 * n], attention_mask=m, labels=ids[:, :7 * n])
            diag = DiagonalExecutor(model)(ids[:, :7 * n], attention_mask=m, labels=ids[:, :7 * n])
            assert_same(seq, diag, 1e-5, real=None if m is None else m.bool())


def test_an_embedding_hook_sees_one_segment_per_call_as_in_the_model():
    """The executor embeds runs of segments with one call only for a bare nn.Embedding: a hook
    whose output depends on the call's length (as transformers' NEFTune noise does) is called
    segment by segment, as the sequential model calls it, and the numbers agree."""
    model = live_model(layers=2)
    ids = random_ids(1, 40, seed=2)
    shapes = []

    def by_position(module, args, out):                   # depends on the length of the call
        shapes.append(tuple(out.shape))
        return out + 0.01 * torch.arange(out.shape[1], dtype=out.dtype)[None, :, None]
    model.base.model.embed_tokens.register_forward_hook(by_position)
    with torch.no_grad():
        seq = model(ids)
        n_seq, shapes[:] = list(shapes), []
        diag = DiagonalExecutor(model)(ids)
    assert shapes == n_seq == [(1, 8, 128)] * 5
    assert_same(seq, diag, 1e-5)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("order", ["model", "executor"])
def test_a_returned_state_never_aliases_the_one_passed_in(layers, order):
    """Steps that know no row is on its first segment pass is_first on unchanged; the executor
    works on a copy, so editing a returned state in place (say, to start a row on a new document)
    leaves the state it continued from as it was — as with the sequential model. The
    continuations: whole segments (lean steps) and a part of one (every step general)."""
    model = live_model(layers=layers)
    ids = random_ids(2, 48, seed=6)
    with torch.no_grad():
        run = model if order == "model" else DiagonalExecutor(model)
        first = run(ids[:, :16]).state
        before = first.is_first.clone()
        for rest in (ids[:, 16:], ids[:, 16:21]):
            out = run(rest, state=first)
            out.state.is_first[:, 0] = True
            assert torch.equal(first.is_first, before)
            again = DiagonalExecutor(model)(rest, state=first)
            assert_same(model(rest, state=first), again, 1e-5)


def test_a_wrapped_lm_head_needs_no_out_features():
    """The logits' chunking reads the vocabulary from the config, so an LM head wrapped in another
    module (no out_features) works in both orders, with the same numbers."""
    model = live_model(layers=2)
    model.base.lm_head = torch.nn.Sequential(model.base.lm_head)
    ids = random_ids(2, 30, seed=8)
    with torch.no_grad():
        assert_same(model(ids, labels=ids), DiagonalExecutor(model)(ids, labels=ids), 1e-5)


@pytest.mark.parametrize("case", ["all_first", "some_layers", "some_rows"])
def test_fresh_layers_start_from_zeros_whatever_the_state_holds(case):
    """A state may hold memory where is_first says a row starts afresh (a reused slot, a state
    edited to start a row on a new document): the executor zeroes a fresh layer's memory once
    (its lean steps then skip the masks) without touching the caller's state, and a layer with
    only some rows fresh keeps the masked steps; both equal the sequential model."""
    model = live_model(layers=3)
    ids = random_ids(2, 8 * 6, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        state = model(random_ids(2, 16, seed=5)).state
        state.W_mem = state.W_mem + torch.randn(state.W_mem.shape, generator=g)   # memory everywhere
        state.z = state.z + torch.rand(state.z.shape, generator=g)
        first = state.is_first.clone()
        if case == "all_first":
            first[:] = True
        elif case == "some_layers":
            first[1:] = True
        else:
            first[0, 1] = first[2, :] = True              # layer 0: one row fresh, layer 2: both
        state.is_first = first
        before = (state.W_mem.clone(), state.z.clone(), first.clone())
        diag = DiagonalExecutor(model)(ids, state=state)
        assert_same(model(ids, state=state), diag, 1e-5)
        if case == "all_first":
            assert_same(DiagonalExecutor(model)(ids), diag, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(before, (state.W_mem, state.z, state.is_first)))


def _spied_steps(monkeypatch, ex, ids, state=None, attention_mask=None):
    """Run ex on ids; return its output, the keyword arguments of each grouped step, and the
    (lo, hi) of each step that went through grouped_cells (the general, masked path)."""
    import diaglab.diagonal as dg
    layers, real = ex.layer_stack()
    steps, general = [], []
    real_cells = dg.grouped_cells

    def spy(X, **kw):
        steps.append(kw)
        return real(X, **kw)

    def cells_spy(*a, **kw):
        general.append(a[5:7])
        return real_cells(*a, **kw)
    with monkeypatch.context() as m:
        m.setattr(ex, "layer_stack", lambda: (layers, spy))
        m.setattr(dg, "grouped_cells", cells_spy)
        with torch.no_grad():
            out = ex(ids, state=state, attention_mask=attention_mask)
    return out, steps, general


def test_plain_calls_take_the_lean_steps_ramps_included(monkeypatch):
    """A call on plain segments runs every step lean (no grouped_cells, no state bookkeeping),
    the ramp up included: a fresh layer's first segment passes is_first marking only the top
    layer, every other step none; a continuation from a settled state is lean from
    the start; the steps a padded segment is in go through grouped_cells."""
    model = live_model(layers=3)
    ex = DiagonalExecutor(model)
    L, S = 3, 6
    ids = random_ids(2, 8 * S, seed=1)
    out, steps, general = _spied_steps(monkeypatch, ex, ids)
    assert general == [] and len(steps) == L + S - 1
    for t, kw in enumerate(steps):
        if t < L:            # the ramp up: layer t starts on its first segment
            assert kw["is_first"].tolist() == [[False, False]] * t + [[True, True]]
            assert kw["read"] == (t > 0)
        else:
            assert kw["is_first"] is None and kw["read"]
    with torch.no_grad():
        assert_same(model(ids), out, 1e-5)
        again, steps, general = _spied_steps(monkeypatch, ex, ids, state=out.state)
        assert general == [] and all(kw["is_first"] is None for kw in steps)
        assert_same(model(ids, state=out.state), again, 1e-5)
        mask = torch.ones_like(ids)
        mask[1, 8 * 4 + 3:] = 0                           # row 1 ends inside segment 4
        padded, _, general = _spied_steps(monkeypatch, ex, ids, attention_mask=mask)
        assert general == [(0, 2), (0, 2), (1, 2), (2, 2)]   # the steps segments 4 and 5 are in
        assert_same(model(ids, attention_mask=mask), padded, 1e-5, real=mask.bool())


def test_a_profiler_times_the_lean_steps(monkeypatch):
    """Under torch.profiler a plain call still runs every step lean (a profile times the steps a
    call runs without one), each step one 'diag_step t layers lo-hi' range, with the same numbers
    bit for bit as the same call unprofiled."""
    model = live_model(layers=3)
    ex = DiagonalExecutor(model)
    L, S = 3, 6
    ids = random_ids(2, 8 * S, seed=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, steps, general = _spied_steps(monkeypatch, ex, ids)
    assert general == [] and len(steps) == L + S - 1
    names = [e.name for e in prof.events() if e.name.startswith("diag_step ")]
    assert names == [f"diag_step {t} layers {c[0][0]}-{c[-1][0]}" for t, c in enumerate(diaglab.schedule.diagonal(L, S))]
    quiet, _, _ = _spied_steps(monkeypatch, ex, ids)
    assert torch.equal(out.logits, quiet.logits)
    assert torch.equal(out.state.W_mem, quiet.state.W_mem) and torch.equal(out.state.z, quiet.state.z)
