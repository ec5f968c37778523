"""The pipeline across processes (diaglab.distributed): exact against one process, the split,
failures that stop every rank, and the cost model on hand-computed cases.

The runs start 2 gloo processes on 127.0.0.1; each start costs seconds (every process imports
torch), so the exactness cases share one start (pipeline_map)."""

import time

import psutil
import pytest
import torch

from conftest import live_model, random_ids, rel
from diaglab import distributed as dd


def _assert_same(out, ref, tol=1e-5):
    assert out.logits.shape == ref.logits.shape
    assert rel(out.logits, ref.logits) <= tol
    assert (out.loss is None) == (ref.loss is None)
    if ref.loss is not None:
        assert abs(float(out.loss) - float(ref.loss)) <= tol * abs(float(ref.loss))
    for l in range(ref.state.num_layers):   # every layer's memory, not only the logits
        assert rel(out.state.W_mem[l], ref.state.W_mem[l]) <= tol, f"W_mem of layer {l}"
        assert rel(out.state.z[l], ref.state.z[l]) <= tol, f"z of layer {l}"
    assert torch.equal(out.state.is_first, ref.state.is_first)
    assert (out.state.open_ids is None) == (ref.state.open_ids is None)
    if ref.state.open_ids is not None:
        assert torch.equal(out.state.open_ids, ref.state.open_ids)


# ---- the split --------------------------------------------------------------------------------
def test_split_even_by_default_and_explicit():
    assert dd.split_layers(8, 2) == [(0, 4), (4, 8)]
    assert dd.split_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert dd.split_layers(3, 1) == [(0, 3)]
    assert dd.split_layers(8, 2, [3, 5]) == [(0, 3), (3, 8)]


@pytest.mark.parametrize("world_size, split, match", [
    (4, None, "world_size 4 > 3 layers"),
    (2, [1, 1], "3 in all"),
    (2, [3, 0], "int >= 1"),
    (2, [1, 1, 1], "each of the 2 ranks"),
    (0, None, "world_size must be an int >= 1"),
])
def test_bad_split_is_a_value_error(world_size, split, match):
    with pytest.raises(ValueError, match=match):
        dd.split_layers(3, world_size, split)
    with pytest.raises(ValueError, match=match):   # refused before any process starts
        dd.pipeline_forward(live_model(layers=3), random_ids(1, 8), world_size=world_size, split=split)


# ---- one rank's block -------------------------------------------------------------------------
def test_block_model_holds_only_its_layers():
    model = live_model(layers=3)
    tensors = {k: v for k, v in model.state_dict().items() if dd.wanted_by(k, (1, 3), 3, tied=False)}
    assert not any(k.startswith(("base.model.layers.0.", "assoc.0.", "base.model.embed_tokens")) for k in tensors)
    block = dd.block_model(model.base.config, model.config, tensors, (1, 3), 3)
    assert block.num_layers == 2 and len(block.base.model.layers) == 2
    assert torch.equal(block.assoc[0].W_mv.weight, model.assoc[1].W_mv.weight)
    assert torch.equal(block.base.model.layers[1].mlp.down_proj.weight, model.base.model.layers[2].mlp.down_proj.weight)
    assert block.base.model.embed_tokens is None and block.base.lm_head is not None
    first = dd.block_model(model.base.config, model.config,
                           {k: v for k, v in model.state_dict().items() if dd.wanted_by(k, (0, 1), 3, False)},
                           (0, 1), 3)
    assert first.base.lm_head is None and first.base.model.norm is None
    del tensors["assoc.2.W_mq.weight"]
    with pytest.raises(ValueError, match=r"missing \['assoc.1.W_mq.weight'\]"):
        dd.block_model(model.base.config, model.config, tensors, (1, 3), 3)


# ---- runs across 2 processes ------------------------------------------------------------------
def test_pipeline_equals_one_process():
    model = live_model(layers=3, segment_size=8)
    assert all(float(a.W_mv.weight.detach().abs().max()) > 0 for a in model.assoc)   # live memory
    padded = random_ids(2, 37, seed=1)
    mask = torch.ones_like(padded)
    mask[1, 29:] = 0
    calls = [dict(input_ids=padded, attention_mask=mask, labels=padded),    # batch 2, padding, partial last
             dict(input_ids=random_ids(1, 8, seed=2)),                       # S = 1 < P = 2
             dict(input_ids=random_ids(1, 48, seed=3), labels=random_ids(1, 48, seed=4))]   # S = 6 > L = 3
    outs = dd.pipeline_map(model, calls, world_size=2, split=[1, 2], timeout=120)
    for call, out in zip(calls, outs):
        ref = model(**call)
        assert float(ref.state.W_mem.abs().amax(dim=(1, 2, 3)).min()) > 0   # every layer wrote memory
        _assert_same(out, ref)


def test_failing_rank_stops_all_and_reports():
    model = live_model(layers=3, segment_size=8)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*failure injected at local step 1"):
        dd.pipeline_forward(model, random_ids(1, 40), world_size=2, timeout=90, fail_at=(1, 1))
    assert time.monotonic() - start < 90
    assert psutil.Process().children(recursive=True) == []


def test_timeout_kills_the_ranks():
    with pytest.raises(TimeoutError, match="did not finish within timeout=0.5 s"):
        dd.pipeline_forward(live_model(layers=2), random_ids(1, 16), world_size=2, timeout=0.5)
    assert psutil.Process().children(recursive=True) == []
