"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch
from conftest import random_ids

import diaglab


@pytest.fixture(params=["model", "executor"])
def runner(request, model):
    return model if request.param == "model" else diaglab.DiagonalExecutor(model)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty input"),
    (torch.zeros(0, 5, dtype=torch.long), ValueError, "empty input"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"2-D \[B, N\]"),
    (torch.zeros(1, 5), TypeError, "integer token ids"),
    (torch.full((1, 5), 256), ValueError, "vocabulary"),
    (torch.full((1, 5), -1), ValueError, "vocabulary"),
    ([[1, 2, 3]], TypeError, "LongTensor"),
])
def test_bad_ids(runner, bad, exc, match):
    with pytest.raises(exc, match=match):
        runner(bad)


def test_bad_masks(runner):
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="does not match input_ids"):
        runner(ids, attention_mask=torch.ones(2, 9))
    left = torch.ones(2, 10, dtype=torch.long)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="right-padded"):
        runner(ids, attention_mask=left)
    empty = torch.ones(2, 10, dtype=torch.long)
    empty[1] = 0
    with pytest.raises(ValueError, match="no tokens"):
        runner(ids, attention_mask=empty)
    with pytest.raises(ValueError, match="only 0"):
        runner(ids, attention_mask=torch.full((2, 10), 2))


def test_bad_labels_and_options(runner):
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="labels"):
        runner(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="keep_logits"):
        runner(ids, keep_logits="some")


def test_bad_state(runner, model):
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="W_mem"):
        runner(ids, state=model.empty_state(3))
    s = model.empty_state(2)
    s.W_mem = s.W_mem.double()
    s.z = s.z.double()
    with pytest.raises(ValueError, match="dtype"):
        runner(ids, state=s)


def test_device_mismatch_is_named(model):
    meta_ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="model.device"):
        model(meta_ids)


def test_unsupported_base_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="unsupported base model GPT2LMHeadModel"):
        diaglab.ARMT(gpt2, diaglab.ARMTConfig())
    with pytest.raises(TypeError, match="diaglab.ARMT"):
        diaglab.DiagonalExecutor(gpt2)


def test_executor_rejects_ungroupable_layers(model):
    layer = model.base.model.layers[1]
    layer.mlp.down_proj = torch.nn.Linear(100, 128, bias=False)
    layer.mlp.up_proj = torch.nn.Linear(128, 100, bias=False)
    layer.mlp.gate_proj = torch.nn.Linear(128, 100, bias=False)
    with pytest.raises(ValueError, match="different shapes"):
        diaglab.DiagonalExecutor(model)


def test_generate_bad_args(model):
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, do_sample=True, temperature=0)
