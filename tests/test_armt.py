"""The sequential ARMT reference (design §1-2, §5): behaviour, persistence, generation."""

import pytest
import torch
from conftest import inert_model, live_model, random_ids, rel

import diaglab


def test_shapes_and_state(model):
    ids = random_ids(2, 29)
    out = model(ids, labels=ids)
    L, d, dk = 3, 128, model.config.d_key
    assert out.logits.shape == (2, 29, 256)
    assert out.state.W_mem.shape == (L, 2, dk, d) and out.state.z.shape == (L, 2, dk)
    assert out.state.W_mem.dtype == torch.float32 and not bool(out.state.is_first.any())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_inert_memory_equals_base_on_each_segment():
    model = inert_model()                           # W_mv = 0 (paper init)
    ids = random_ids(2, 29)
    with torch.no_grad():
        out = model(ids)
        alone = torch.cat([model.base(ids[:, a:a + 8]).logits for a in range(0, 29, 8)], dim=1)
    assert rel(out.logits, alone) < 1e-5
    assert float(out.state.W_mem.abs().max()) == 0.0


def test_live_memory_changes_logits(model):
    """live_model, which every exactness test uses, really exercises the memory: every layer
    writes, later segments' logits move, and the layers' write biases differ."""
    ids = random_ids(2, 29)
    with torch.no_grad():
        out, base = model(ids), inert_model()(ids)
    assert torch.allclose(out.logits[:, :8], base.logits[:, :8], atol=1e-5)   # segment 0 reads nothing
    assert rel(out.logits[:, 8:], base.logits[:, 8:]) > 5e-2                  # later segments read memory
    assert out.state.W_mem.abs().amax(dim=(1, 2, 3)).min() > 0                # every layer wrote
    assert len({float(a.W_mb.bias.detach()) for a in model.assoc}) == model.num_layers


def test_no_state_leaks_between_calls(model):
    ids = random_ids(2, 20)
    with torch.no_grad():
        a, b = model(ids), model(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.state.W_mem, b.state.W_mem)


def test_batch_rows_equal_rows_alone(model):
    ids = random_ids(3, 21)
    with torch.no_grad():
        out = model(ids)
        for i in range(3):
            assert rel(out.logits[i], model(ids[i:i + 1]).logits[0]) < 1e-5


def test_right_padding_equals_row_alone(model):
    ids = random_ids(3, 27)
    lengths = [27, 13, 8]          # partial segment, exact multiple of n
    mask = torch.zeros(3, 27, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        for i, n in enumerate(lengths):
            alone = model(ids[i:i + 1, :n])
            assert rel(out.logits[i, :n], alone.logits[0]) < 1e-5
            assert rel(out.state.W_mem[:, i], alone.state.W_mem[:, 0]) < 1e-5
            assert rel(out.state.z[:, i], alone.state.z[:, 0]) < 1e-5


def test_partial_last_segment_and_causality(model):
    ids = random_ids(1, 19)          # 8 + 8 + 3
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :16]).logits
        inside = model(ids[:, :12]).logits          # cut inside the second segment
    assert full.shape == (1, 19, 256)
    assert rel(full[:, :16], prefix) < 1e-6   # later tokens never change earlier logits
    assert rel(full[:, :12], inside) < 1e-6


def test_state_continuation_streams(model):
    ids = random_ids(2, 40)
    with torch.no_grad():
        whole = model(ids)
        first = model(ids[:, :16])
        rest = model(ids[:, 16:], state=first.state)
    assert rel(rest.logits, whole.logits[:, 16:]) < 1e-5
    assert rel(rest.state.W_mem, whole.state.W_mem) < 1e-5


def test_keep_logits_modes_and_streamed_loss(model):
    ids = random_ids(2, 30)
    with torch.no_grad():
        a = model(ids, labels=ids)
        b = model(ids, labels=ids, keep_logits="last_segment")
        c = model(ids, labels=ids, keep_logits="none")
    assert b.logits.shape == (2, 6, 256) and torch.allclose(b.logits, a.logits[:, -6:])
    assert c.logits is None
    ref = torch.nn.functional.cross_entropy(a.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert torch.allclose(a.loss, ref, rtol=1e-5) and torch.allclose(c.loss, ref, rtol=1e-5)


def test_loss_ignores_minus_100(model):
    ids = random_ids(1, 20)
    labels = ids.clone()
    labels[:, 10:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :9], ids[0, 1:10])
    assert torch.allclose(out.loss, ref, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = live_model(seed=5)     # not seed 0: from_pretrained builds its skeleton from seed 0 before loading
    ids = random_ids(2, 21)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.config == model.config


def test_save_load_bf16_tied_embeddings(tmp_path):
    model = live_model(seed=5, tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert loaded.base.lm_head.weight.data_ptr() == loaded.base.model.embed_tokens.weight.data_ptr()
    ids = random_ids(1, 17)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bf16_model_keeps_float32_memory():
    model = live_model().to(torch.bfloat16)
    with torch.no_grad():
        out = model(random_ids(1, 20))
    assert out.logits.dtype == torch.bfloat16 and out.state.W_mem.dtype == torch.float32


def _greedy_by_full_forward(model, ids, steps):
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("N", [3, 8, 16, 13])   # N < n, exact multiples, partial
def test_generate_equals_full_forward_argmax(model, N):
    ids = random_ids(2, N)
    out = model.generate(ids, max_new_tokens=12)   # crosses a segment boundary while decoding
    assert out.shape == (2, N + 12)
    assert torch.equal(out, _greedy_by_full_forward(model, ids, 12))


def test_generate_sampling_is_seeded(model):
    ids = random_ids(1, 10)
    a = model.generate(ids, 6, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 6, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    c = model.generate(ids, 6, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (1, 16)
    assert not torch.equal(a, c) and not torch.equal(a, model.generate(ids, 6))   # it does sample


def test_presets_build():
    assert diaglab.from_preset("tiny").num_layers == diaglab.PRESETS["tiny"]["layers"]
    cfg = diaglab.presets.llama_config(**{k: v for k, v in diaglab.PRESETS["llama_1b"].items()
                                          if k not in ("segment_size", "num_mem_tokens", "d_mem")})
    assert cfg.hidden_size == 2048 and cfg.num_hidden_layers == 16 and cfg.num_key_value_heads == 8
    with pytest.raises(ValueError, match="unknown preset"):
        diaglab.from_preset("huge")


# ---- the final norm and LM head run a chunk of segments at a time ------------------------
@pytest.mark.parametrize("keep", ["all", "last_segment", "none"])
def test_head_chunks_change_no_numbers(monkeypatch, keep):
    """SegmentOutputs sends several segments through norm + LM head at once: the logits and the
    loss are those of one segment at a time, for both orders, and the head runs once per chunk."""
    from diaglab import DiagonalExecutor
    from diaglab.segments import SegmentOutputs
    model = live_model(layers=2)
    ids = random_ids(2, 8 * 7 - 3)            # 7 segments, the last partial
    calls = []
    model.base.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    with torch.no_grad():
        monkeypatch.setattr(SegmentOutputs, "FLUSH_LOGITS", 1)          # one segment per chunk
        one = [model(ids, labels=ids, keep_logits=keep), DiagonalExecutor(model)(ids, labels=ids, keep_logits=keep)]
        assert calls == [8] * 6 + [5] + [8] * 6 + [5]
        calls.clear()
        monkeypatch.setattr(SegmentOutputs, "FLUSH_LOGITS", 2 * 8 * 3 * 256)   # three segments of B=2 a chunk
        many = [model(ids, labels=ids, keep_logits=keep), DiagonalExecutor(model)(ids, labels=ids, keep_logits=keep)]
        assert calls == [24, 24, 5, 24, 24, 5]
    for a, b in zip(one, many):
        assert rel(b.loss, a.loss) <= 1e-6
        if keep == "none":
            assert a.logits is None and b.logits is None
        else:
            assert b.logits.shape == a.logits.shape == (2, 53 if keep == "all" else 5, 256)
            assert rel(b.logits, a.logits) <= 1e-6


def test_segment_rows_checks_rows_given_from_elsewhere():
    from diaglab.segments import segment_rows
    model = live_model(layers=1)
    seg, _ = model.prepare(random_ids(1, 20))
    rows = segment_rows(model, seg, 2, pad=True)
    again = segment_rows(model, seg, 2, pad=True, X=rows.X)          # the tables for rows received elsewhere
    assert again.X is rows.X and torch.equal(again.mask, rows.mask) and torch.equal(again.cos, rows.cos)
    with pytest.raises(ValueError, match=r"rows X must be \(B, n_text \+ M, d\)"):
        segment_rows(model, seg, 2, pad=True, X=rows.X[:, :-1])
