"""No silently wrong answer (the model and executor half): grad modes, stale weights,
modules the executor would bypass, dropout, continuing from a state, argument checks.
Each test is one way a user could have got different numbers from the two orders without
being told; each must give the same numbers or a clear error."""

import warnings

import pytest
import torch
from conftest import live_model, random_ids, rel
from test_diagonal import assert_same
from torch import nn

import diaglab
from diaglab import DiagonalExecutor


# ---- 1. grad modes -------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["model", "executor", "model.generate", "executor.generate"])
def test_inference_mode_leaves_every_parameter_trainable(call):
    model = live_model(layers=2)
    ex = DiagonalExecutor(model)
    ids = random_ids(1, 24)
    with torch.inference_mode():
        {"model": lambda: model(ids), "executor": lambda: ex(ids),
         "model.generate": lambda: model.generate(ids[:, :12], max_new_tokens=5),
         "executor.generate": lambda: ex.generate(ids[:, :12], max_new_tokens=5)}[call]()
    assert not [k for k, p in model.named_parameters() if p.is_inference()]
    for run in (ex, model):                         # training afterwards, through both orders
        model.zero_grad(set_to_none=True)
        run(ids, labels=ids).loss.backward()
        without = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not without, f"{type(run).__name__}: no gradient for {without}"


# ---- 2. no stale weights -------------------------------------------------------------------
def _replace(model, other, how):
    layer, o_layer = model.base.model.layers[1], other.base.model.layers[1]
    if how == "load_state_dict(assign=True)":
        model.load_state_dict(other.state_dict(), assign=True)
    elif how == "new nn.Parameter":
        layer.self_attn.q_proj.weight = nn.Parameter(o_layer.self_attn.q_proj.weight.detach().clone())
    elif how == "new submodule":
        new = nn.Linear(*reversed(layer.mlp.down_proj.weight.shape), bias=False)
        new.weight.data.copy_(o_layer.mlp.down_proj.weight)
        layer.mlp.down_proj = new
    elif how == "new associative linear":
        new = nn.Linear(*reversed(model.assoc[0].W_mv.weight.shape), bias=False)
        new.weight.data.copy_(other.assoc[0].W_mv.weight)
        model.assoc[0].W_mv = new
    elif how == "tensor.data =":
        layer.mlp.gate_proj.weight.data = o_layer.mlp.gate_proj.weight.detach().clone()
    elif how == "cast":
        model.double()
    elif how == "cast, overwriting parameters":   # _apply assigns new Parameters without registration hooks
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)


@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "new nn.Parameter", "new submodule",
                                 "new associative linear", "tensor.data =", "cast", "cast, overwriting parameters"])
def test_executor_follows_replaced_weights(how):
    model, other = live_model(layers=2), live_model(layers=2, seed=7)
    ex = DiagonalExecutor(model)
    ids = random_ids(2, 21)
    with torch.no_grad():
        before = ex(ids).logits                      # ties the stacks to the current weights
        _replace(model, other, how)
        after_model, after_ex = model(ids), ex(ids)
    if how.startswith("cast"):
        assert after_ex.logits.dtype == torch.float64                                 # computed in the new dtype
    else:
        assert rel(after_model.logits, before) > 1e-4                                 # the change matters ...
    assert_same(after_model, after_ex, 1e-5)                                          # ... and the executor sees it


# ---- 3. nothing bypassed -------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A LoRA-style adapter around a Linear: base(x) + B(A(x)) — its own forward."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.B.weight, std=0.2)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class Wrapped(nn.Module):
    """A decoder layer inside a wrapper that damps its output: the grouped step cannot find its parts."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h, **kw):
        return 0.9 * self.inner(h, **kw)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 1.5 * super().forward(x)


def _modify(model, how):
    layer = model.base.model.layers[1]
    if how == "forward hook":
        return layer.mlp.down_proj.register_forward_hook(lambda m, i, o: 2 * o)
    if how == "forward pre-hook on a decoder layer":
        return layer.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 0.5,), kwargs), with_kwargs=True)
    if how == "LoRA adapter":
        layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
    if how == "nn.Linear subclass":
        sub = ScaledLinear(*reversed(layer.mlp.up_proj.weight.shape), bias=False)
        sub.weight.data.copy_(layer.mlp.up_proj.weight)
        layer.mlp.up_proj = sub
    if how == "hook on an associative linear":
        return model.assoc[1].W_mq.register_forward_hook(lambda m, i, o: 3 * o)
    if how == "changed attention scale":
        layer.self_attn.scaling = 0.5
    if how == "forward set on the instance":
        mlp, forward = layer.mlp, layer.mlp.forward
        mlp.forward = lambda x: 0.5 * forward(x)
    if how == "wrapped decoder layer":
        model.base.model.layers[1] = Wrapped(layer)
    if how == "changed norm epsilon":
        layer.post_attention_layernorm.variance_epsilon = 0.1


@pytest.mark.parametrize("how", ["forward hook", "forward pre-hook on a decoder layer", "LoRA adapter",
                                 "nn.Linear subclass", "hook on an associative linear", "changed attention scale",
                                 "forward set on the instance", "wrapped decoder layer", "changed norm epsilon"])
def test_executor_runs_what_the_model_runs(how):
    model = live_model(layers=2)
    ex = DiagonalExecutor(model)
    ids = random_ids(2, 21)
    with torch.no_grad():
        plain = model(ids).logits
        ex(ids)                                       # tied before the change
        _modify(model, how)
        seq = model(ids)
        assert rel(seq.logits, plain) > 1e-4          # the modification changes the model's numbers
        with pytest.warns(UserWarning, match="base.model.layers.1|assoc.1") as caught:
            diag = ex(ids)
        assert "grouped_layer_ref" in str(caught[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")            # said once, not on every call
            again = ex(ids)
    assert_same(seq, diag, 1e-5)
    assert torch.equal(again.logits, diag.logits)


def test_hooks_are_called_as_often_as_in_the_model():
    model = live_model(layers=2)
    calls = []
    model.base.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(1))
    ids = random_ids(1, 30)                          # 4 segments
    with torch.no_grad(), pytest.warns(UserWarning):
        model(ids)
        n_model = len(calls)
        DiagonalExecutor(model)(ids)
    assert n_model == 4 and len(calls) == 2 * n_model


def test_parametrized_weights_keep_the_fast_path():
    model = live_model(layers=2)
    ids = random_ids(2, 21)

    class Scale(nn.Module):
        def forward(self, W):
            return 1.25 * W
    with torch.no_grad():
        plain = model(ids).logits
    torch.nn.utils.parametrize.register_parametrization(model.base.model.layers[0].mlp.gate_proj, "weight", Scale())
    ex = DiagonalExecutor(model)
    assert ex.layer_stack()[1] is diaglab.grouped.grouped_layer
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        seq, diag = model(ids), ex(ids)
    assert rel(seq.logits, plain) > 1e-4
    assert_same(seq, diag, 1e-5)
    model.zero_grad()                                 # and gradients reach the parametrization's original
    ex(ids, labels=ids).loss.backward()
    assert model.base.model.layers[0].mlp.gate_proj.parametrizations.weight.original.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=1.0).step()   # the original changes in place: a computed weight
    with torch.no_grad():                                # cannot be tied, so the executor must see it
        after = model(ids)
        assert rel(after.logits, seq.logits) > 1e-4
        assert_same(after, ex(ids), 1e-5)


def test_config_edits_cannot_make_the_orders_differ():
    """The grouped step takes the norm epsilon (and DPFP's nu) from the modules, which is what
    they compute with; editing the base config after the model was built changes neither order."""
    model = live_model(layers=2)
    ex = DiagonalExecutor(model)
    ids = random_ids(1, 40)
    with torch.no_grad():
        before = ex(ids)
        model.base.config.rms_norm_eps = 0.1        # (ARMTConfig itself is frozen)
        assert_same(model(ids), ex(ids), 1e-5)
        assert_same(before, ex(ids), 1e-6)


def test_dropout_advice_makes_both_orders_deterministic():
    model = live_model(layers=2).train()
    for b in model.base.model.layers:
        b.self_attn.attention_dropout = 0.3
    model.base.config.attention_dropout = 0.0         # the config alone does not reach the modules
    ids = random_ids(1, 20)
    with pytest.raises(ValueError, match=r"attention_dropout.*model\.eval\(\)"):
        DiagonalExecutor(model)(ids)
    for b in model.base.model.layers:                 # the advice
        b.self_attn.attention_dropout = 0.0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        assert_same(model(ids), DiagonalExecutor(model)(ids), 1e-5)


# ---- 5. continuing from a state ------------------------------------------------------------
@pytest.mark.parametrize("runner", ["model", "executor"])
@pytest.mark.parametrize("k", [1, 5, 8, 13, 16, 23])
def test_continue_from_any_split(runner, k):
    model = live_model(layers=3)                      # segment 8
    run = model if runner == "model" else DiagonalExecutor(model)
    ids = random_ids(2, 27)
    with torch.no_grad():
        whole = run(ids)
        head = run(ids[:, :k])
        tail = run(ids[:, k:], state=head.state)
    assert rel(head.logits, whole.logits[:, :k]) <= 1e-5
    assert rel(tail.logits, whole.logits[:, k:]) <= 1e-5
    for name in ("W_mem", "z"):
        assert rel(getattr(tail.state, name), getattr(whole.state, name)) <= 1e-5, name
    assert torch.equal(tail.state.is_first, whole.state.is_first)
    assert torch.equal(tail.state.open_ids, whole.state.open_ids)      # 27 = 3 * 8 + 3: 3 tokens open


def test_continue_in_many_pieces_with_labels():
    model = live_model(layers=2)
    ids = random_ids(1, 40)
    with torch.no_grad():
        whole = model(ids)
        state, pieces = None, []
        for a, e in [(0, 3), (3, 4), (4, 19), (19, 40)]:
            out = DiagonalExecutor(model)(ids[:, a:e], labels=ids[:, a:e], state=state)
            state = out.state
            pieces.append(out.logits)
            assert torch.isfinite(out.loss) or e - a == 1
    assert rel(torch.cat(pieces, dim=1), whole.logits) <= 1e-5


def test_ragged_open_segments_cannot_be_continued():
    model = live_model(layers=2)
    ids = random_ids(2, 13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 11:] = 0                                   # rows end 5 and 3 tokens into segment 1
    out = model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="different points inside a segment"):
        model(random_ids(2, 4), state=out.state)


# ---- 6. arguments ---------------------------------------------------------------------------
def test_labels_must_be_integer(model):
    ids = random_ids(1, 10)
    for bad in (ids.float(), ids > 5):
        with pytest.raises(TypeError, match="labels must hold integer"):
            model(ids, labels=bad)
        with pytest.raises(TypeError, match="labels must hold integer"):
            DiagonalExecutor(model)(ids, labels=bad)


def test_boolean_options_must_be_bools(model):
    ids = random_ids(1, 10)
    with pytest.raises(TypeError, match="do_sample"):
        model.generate(ids, max_new_tokens=2, do_sample="no")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature="1")


@pytest.mark.parametrize("tensor,change,match", [
    ("z", lambda t: t.double(), "state.z has dtype"),
    ("z", lambda t: t[:, :, :-1], "state.z has shape"),
    ("is_first", lambda t: t.long(), "state.is_first has dtype"),
    ("is_first", lambda t: t[:-1], "state.is_first has shape"),
    ("W_mem", lambda t: t.to("meta"), "state.W_mem is on meta"),
])
def test_state_tensors_are_checked_by_name(model, tensor, change, match):
    s = model.empty_state(1)
    setattr(s, tensor, change(getattr(s, tensor)))
    for run in (model, DiagonalExecutor(model)):
        with pytest.raises(ValueError, match=match):
            run(random_ids(1, 10), state=s)


def test_mixed_weight_dtypes_are_refused_by_name(model):
    model.base.to(torch.bfloat16)                     # memory and assoc stay float32
    for run in (model, DiagonalExecutor(model)):
        with pytest.raises(TypeError, match=r"different dtypes \(memory float32, assoc.0.W_mq float32, base.model.embed_tokens bfloat16"):
            run(random_ids(1, 10))
