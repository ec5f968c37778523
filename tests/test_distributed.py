"""The pipeline across processes (diaglab.distributed): exact against one process, the split,
failures that stop every rank, and the cost model on hand-computed cases.

The runs start 2 gloo processes on 127.0.0.1; each start costs seconds (every process imports
torch), so the exactness cases share one start (pipeline_map)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import live_model, random_ids, rel
import diaglab
from diaglab import distributed as dd
from diaglab import viz


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
    (2, [1.5, 1.5], "int >= 1 layers"),
])
def test_bad_split_is_a_value_error(world_size, split, match):
    with pytest.raises(ValueError, match=match):
        dd.split_layers(3, world_size, split)
    with pytest.raises(ValueError, match=match):   # refused before any process starts
        dd.pipeline_forward(live_model(layers=3), random_ids(1, 8), world_size=world_size, split=split)


def test_what_the_ranks_could_not_rebuild_is_refused():
    model = live_model(layers=2)
    handle = model.base.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match=r"base.model.layers.1.mlp has hooks.*Remove the hooks"):
        dd.pipeline_forward(model, random_ids(1, 8))
    handle.remove()
    torch.nn.utils.parametrize.register_parametrization(model.assoc[0].W_mv, "weight", torch.nn.Identity())
    with pytest.raises(ValueError, match="assoc.0.W_mv is parametrized"):
        dd.pipeline_forward(model, random_ids(1, 8))


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
    with torch.no_grad():
        diaglab.DiagonalExecutor(model)(random_ids(1, 8))   # weights tied (strided views) before they are shipped
    padded = random_ids(2, 37, seed=1)
    mask = torch.ones_like(padded)
    mask[1, 29:] = 0
    calls = [dict(input_ids=padded, attention_mask=mask, labels=padded),    # batch 2, padding, partial last
             dict(input_ids=random_ids(1, 8, seed=2)),                       # S = 1 < P = 2
             dict(input_ids=random_ids(1, 48, seed=3), labels=random_ids(1, 48, seed=4))]   # S = 6 > L = 3
    outs = dd.pipeline_map(model, calls, world_size=2, split=[1, 2], timeout=120)
    for call, out in zip(calls, outs):
        with torch.no_grad():
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


# ---- cost model, on cases computed by hand ----------------------------------------------------
def test_group_sizes_and_hops_by_hand():
    spans = dd.split_layers(4, 2)                               # rank 0: layers 0-1, rank 1: layers 2-3
    assert dd.rank_group_sizes(4, 4, spans) == [[1, 2, 2, 2, 1, 0, 0], [0, 0, 1, 2, 2, 2, 1]]
    assert dd.hop_steps(4, spans) == [0, 1, 1, 1, 1, 0, 0]     # segment s leaves layer 1 at step 1 + s
    assert dd.rank_group_sizes(4, 4, [(0, 4)]) == [[1, 2, 3, 4, 3, 2, 1]]


def test_pipeline_cost_by_hand():
    c = dd.pipeline_cost(L=8, S=16, world_size=2, B=1, T=40, d=128)
    assert c.steps == 23 and c.busy_steps == (19, 19)
    assert c.bubble == pytest.approx(4 / 23)                    # (L - k) / (L + S - 1), k = 4
    assert c.hop_bytes == 40 * 128 * 4 and c.total_bytes == 16 * 40 * 128 * 4
    assert c.max_bytes_per_step == c.hop_bytes                  # one boundary: one segment per step
    four = dd.pipeline_cost(L=8, S=5, world_size=4, B=2, T=40, d=128, bytes_per_value=2)
    assert four.busy_steps == (6, 6, 6, 6) and four.bubble == pytest.approx(0.5)   # 24 of 4 x 12 steps
    assert four.hop_bytes == 2 * 40 * 128 * 2
    assert four.max_bytes_per_step == 3 * four.hop_bytes        # step 5: all three boundaries carry one
    assert dd.pipeline_cost(L=8, S=16, world_size=1, B=1, T=40, d=128).bubble == 0
    for bad in (dict(B=-1), dict(T=0), dict(d=0), dict(bytes_per_value=0)):
        with pytest.raises(ValueError, match=rf"^{list(bad)[0]} must be"):
            dd.pipeline_cost(**{**dict(L=8, S=16, world_size=2, B=1, T=40, d=128), **bad})


def test_expected_latency_by_hand():
    linear, flat = (lambda g: float(g)), (lambda g: 1.0)
    assert dd.expected_latency(linear, 4, 4) == 16               # one device: 1+2+3+4+3+2+1
    assert dd.expected_latency(linear, 4, 4, world_size=2) == 12  # max over ranks: 1,2,2,2,2,2,1
    assert dd.expected_latency(flat, 4, 4, world_size=2) == 7     # overhead-bound: no gain
    assert dd.expected_latency(flat, 4, 4, world_size=2, hop_seconds=0.5) == 9   # 4 hops on the path
    assert dd.expected_latency({1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5}, 4, 4) == 1 + 1.5 + 2 + 2.5 + 2 + 1.5 + 1


def test_pipeline_figure_colours_by_rank_and_shows_fill_and_drain():
    fig = viz.pipeline_figure(4, 3, world_size=2, split=[1, 3])
    grid, busy = fig.data
    assert [row[0] for row in grid.z] == [0, 1, 1, 1]           # layer -> rank
    assert grid.text[2][1] == "3"                                # cell (2, 1) runs at step 3
    assert [list(r) for r in busy.text] == [["1", "1", "1", "", "", ""], ["", "1", "2", "3", "2", "1"]]
    with pytest.raises(ValueError, match="world_size 5 > 4 layers"):
        viz.pipeline_figure(4, 3, world_size=5)


def test_torchrun_entry_point_loads_blocks_from_a_checkpoint(tmp_path):
    """torchrun, 2 ranks, each reading only its tensors from a save_pretrained directory (tied
    embeddings: the last rank's LM head is the embedding); --check asserts against one process."""
    live_model(layers=3, segment_size=8, tie_word_embeddings=True).save_pretrained(tmp_path / "ckpt")
    root = Path(dd.__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
           "diaglab.distributed", "--checkpoint", str(tmp_path / "ckpt"), "--tokens", "20", "--batch", "2",
           "--split", "2,1", "--check", "--json", str(tmp_path / "report.json")]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spans"] == [[0, 2], [2, 3]] and report["segments"] == 3
    assert max(report["relative_errors"]["diagonal"].values()) <= 1e-5
    assert max(report["relative_errors"]["sequential"].values()) <= 1e-5


def test_torchrun_entry_reads_a_checkpoint_with_from_pretrained_checks(tmp_path):
    """The ranks read a checkpoint through checkpoint.read_meta / read_base_config: one that
    from_pretrained refuses (a newer format) is refused by them too, by name."""
    import argparse
    import json
    model = live_model(layers=2)
    model.save_pretrained(tmp_path / "ck")
    meta_file = tmp_path / "ck" / "armt_config.json"
    meta = json.loads(meta_file.read_text())
    meta["format"] = meta["format"].rsplit("-", 1)[0] + "-99"
    meta_file.write_text(json.dumps(meta))
    args = argparse.Namespace(checkpoint=str(tmp_path / "ck"), split=None, check=False)
    with pytest.raises(ValueError, match="newer diaglab"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", "0")
            dd._source(args, 1)
