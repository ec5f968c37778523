"""One diagonal step as one grouped call (design §4), and its naive twin.

G consecutive layers lo..hi, each on its own segment, run together. `grouped_layer` does
it the fast way: per-layer weights are stacked once along a leading layer axis, a step
uses the slice W[lo:hi+1] (a view), every projection is one batched matmul
X[g] @ W[lo + g]^T, and attention folds the group into the batch (each element attends
only within its own segment; RoPE tables are shared because positions restart at 0).
`grouped_layer_ref` does the same step the slow way: a loop over the model's own decoder
layers and associative modules. Same signature, same outputs; tests/test_twins.py holds
them to each other, and the sequential ARMT is the reference run with lo = hi = l.

The names follow the papers' equations (design §2): read q = phi(h W_mq^T),
A = q W_mem / (q . z + eps); write k = phi(m W_mk^T), v = m W_mv^T,
beta = sigmoid(m W_mb^T + b). Stacked weights keep transformers' module names.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .memory import MemoryState, associative_read, associative_write, features, first_after_write
from .segments import SegmentRows, stack_rows


# ---- what a layer is made of -----------------------------------------------------------
@dataclass(frozen=True)
class LayerDims:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float       # RMSNorm epsilon
    d_mem: int
    nu: int
    correction: bool
    normalize: bool = False  # unit-length DPFP features (ARMTConfig.normalize_keys)
    kernel: str = "bmm"      # grouped matmul: "bmm" or "grouped_mm" (torch._grouped_mm)

    @classmethod
    def of(cls, model, kernel: str = "bmm") -> "LayerDims":
        """Shapes from the configs; the values the modules compute with (norm epsilon, DPFP's
        nu and normalisation) from layer 0's modules themselves, so that editing a config after
        the model was built cannot make the grouped step differ from the modules (ungroupable
        requires every layer to agree with layer 0)."""
        c = model.base.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        layer0 = _child(_child(_child(model.base, "model"), "layers"), "0")
        assoc0 = _child(_child(model, "assoc"), "0")
        eps = _attr(_child(layer0, "input_layernorm"), "variance_epsilon")
        nu, normalize = _attr(assoc0, "nu"), _attr(assoc0, "normalize")
        return cls(c.num_attention_heads, c.num_key_value_heads, head_dim, c.rms_norm_eps if eps is None else eps,
                   model.config.d_mem, model.config.nu if nu is None else nu, model.config.correction,
                   model.config.normalize_keys if normalize is None else normalize, kernel)


def _child(module: nn.Module, name: str):
    """module.name, read from the module's own dicts first (nn.Module.__getattr__ is slow and
    this runs on every call); parametrized weights are properties, found by getattr."""
    if module is None:   # a parent that is missing (a wrapped or replaced layer): nothing below it
        return None
    for table in (module._modules, module._parameters):
        if name in table:
            return table[name]
    return getattr(module, name, None)


def _stack_members(model, check: bool = True, owners: bool = False) -> dict[str, list[list]]:
    """stack name -> per layer, the parameters concatenated (along dim 0) into that stack.
    q|k|v, gate|up and W_mk|W_mv|W_mb are fused: one matmul each. check: raise unless every
    layer's members have the same shapes. owners: (module, attribute name) pairs instead."""
    def params(units, *paths, attr="weight"):
        if owners:
            return [[(_child(u, p) if p else u, attr) for p in paths] for u in units]
        return [[_child(_child(u, p) if p else u, attr) for p in paths] for u in units]
    layers = list(_child(_child(model.base, "model"), "layers"))
    attn = [_child(b, "self_attn") for b in layers]
    mlp = [_child(b, "mlp") for b in layers]
    assoc = list(model.assoc)
    members = {
        "qkv_proj.weight": params(attn, "q_proj", "k_proj", "v_proj"),
        "o_proj.weight": params(attn, "o_proj"),
        "gate_up_proj.weight": params(mlp, "gate_proj", "up_proj"),
        "down_proj.weight": params(mlp, "down_proj"),
        "input_layernorm.weight": params(layers, "input_layernorm"),
        "post_attention_layernorm.weight": params(layers, "post_attention_layernorm"),
        "W_mq.weight": params(assoc, "W_mq"),
        "W_mkvb.weight": params(assoc, "W_mk", "W_mv", "W_mb"),
        "W_mb.bias": params(assoc, "W_mb", attr="bias"),
    }
    if _child(_child(attn[0], "q_proj"), "bias") is not None:   # (the bias members are checked on tensors)
        members["qkv_proj.bias"] = params(attn, "q_proj", "k_proj", "v_proj", attr="bias")
        members["o_proj.bias"] = params(attn, "o_proj", attr="bias")
    if _child(_child(mlp[0], "gate_proj"), "bias") is not None:
        members["gate_up_proj.bias"] = params(mlp, "gate_proj", "up_proj", attr="bias")
        members["down_proj.bias"] = params(mlp, "down_proj", attr="bias")
    for name, per_layer in members.items() if check and not owners else ():
        shapes = {tuple(None if p is None else tuple(p.shape) for p in ps) for ps in per_layer}
        if len(shapes) != 1 or any(p is None for ps in per_layer for p in ps):
            raise ValueError(f"cannot group layers of different shapes ({name}: {sorted(map(str, shapes))}); "
                             "the diagonal executor needs identical decoder layers — run the model sequentially")
    return members


_PATHS: dict[str, tuple[str, ...]] = {}   # "mlp.down_proj" -> ("mlp", "down_proj"), split once


@functools.cache
def _expected_types() -> tuple[dict[str, type], dict[str, type]]:
    """(decoder layer, associative layer): child name -> the exact class whose computation
    grouped_layer reproduces ("" is the layer itself)."""
    from transformers.activations import ACT2FN
    from transformers.models.llama import modeling_llama as llama
    from .armt import AssociativeLayer
    decoder = {"": llama.LlamaDecoderLayer, "self_attn": llama.LlamaAttention, "mlp": llama.LlamaMLP,
               "mlp.act_fn": type(ACT2FN["silu"]), "input_layernorm": llama.LlamaRMSNorm,
               "post_attention_layernorm": llama.LlamaRMSNorm}
    decoder.update({f"self_attn.{p}_proj": nn.Linear for p in "qkvo"})
    decoder.update({f"mlp.{p}_proj": nn.Linear for p in ("gate", "up", "down")})
    assoc = {"": AssociativeLayer, **{name: nn.Linear for name in ("W_mq", "W_mk", "W_mv", "W_mb")}}
    return decoder, assoc


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def ungroupable(model) -> list[str]:
    """Why grouped_layer would not compute what the model's own modules compute, one line
    per module: a hook (forward, pre-forward or backward), a class other than the standard
    one (an adapter, a subclass with its own forward), a `forward` set on the instance, a
    missing submodule (a wrapped layer), or an attribute that differs between layers
    (attention scale, norm epsilon, DPFP's nu). Parametrized weights (torch.nn.utils.parametrize) are fine: the
    stacks read the parametrized `.weight`. Empty when grouped_layer is exact.

    Global module hooks (torch.nn.modules.module.register_module_forward_hook) are not
    checked: tools such as torch.utils.flop_counter.FlopCounterMode register them to observe
    module calls, and they must see the fast path; a grouped step makes no per-layer module
    calls, so such observers see none from it."""
    decoder_types, assoc_types = _expected_types()
    dims = LayerDims.of(model)
    problems = []
    units = [("base.model.layers", l, b, decoder_types) for l, b in enumerate(model.base.model.layers)]
    units += [("assoc", l, a, assoc_types) for l, a in enumerate(model.assoc)]
    for owner, l, unit, types in units:
        for path, expected in types.items():
            mod = unit
            for part in _PATHS.setdefault(path, tuple(path.split(".")) if path else ()):
                mod = _child(mod, part)
            name = f"{owner}.{l}.{path}".rstrip(".")
            if mod is None:
                problems.append(f"{name} is missing (the layer is wrapped or rebuilt)")
                continue
            cls = type(mod)
            if "parametrizations" in getattr(mod, "_modules", ()):
                cls = cls.__bases__[0]       # parametrize's generated subclass of the real class
            if cls is not expected:
                problems.append(f"{name} is a {type(mod).__name__}, not a {expected.__name__}")
            elif _hooked(mod):
                problems.append(f"{name} has hooks")
            elif "forward" in mod.__dict__:
                problems.append(f"{name} has its own forward, set on the instance")
    # the values grouped_layer computes with (LayerDims.of reads them from layer 0): every layer must agree
    for l, b in enumerate(model.base.model.layers):
        scaling = _attr(_child(b, "self_attn"), "scaling")
        if scaling != dims.head_dim ** -0.5:
            problems.append(f"base.model.layers.{l}.self_attn.scaling is {scaling}, not head_dim ** -0.5")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            eps = _attr(_child(b, norm), "variance_epsilon")
            if eps != dims.eps:
                problems.append(f"base.model.layers.{l}.{norm}.variance_epsilon is {eps}, not layer 0's "
                                f"input_layernorm value {dims.eps} (the grouped step uses one epsilon)")
    for l, a in enumerate(model.assoc):
        got = (_attr(a, "nu"), _attr(a, "normalize"))
        if got != (dims.nu, dims.normalize):
            problems.append(f"assoc.{l} has nu, normalize = {got}; layer 0 has {(dims.nu, dims.normalize)}")
    return problems


class _Registrations:
    """How many parameters and submodules have been registered anywhere in the process
    (nn.Module.__setattr__, register_parameter, load_state_dict(assign=True), parametrize:
    torch calls its global registration hooks for each). While the count stands still, no
    model's parameters or modules have been replaced, so the executor's per-call checks can
    skip the full walk. Counting starts with the first executor, not at import."""
    count = 0
    _listening = False

    @classmethod
    def listen(cls) -> None:
        if not cls._listening:
            m = torch.nn.modules.module
            m.register_module_parameter_registration_hook(cls._bump)
            m.register_module_module_registration_hook(cls._bump)
            cls._listening = True

    @classmethod
    def _bump(cls, *_) -> None:   # returns None: the registered object is kept as it is
        cls.count += 1


def _attr(module, name: str):
    """module.name for a plain instance attribute, read from the instance dict (the ring asks
    every step); anything else (a property, a class attribute) through getattr."""
    d = getattr(module, "__dict__", {})
    return d[name] if name in d else getattr(module, name, None)


def _checked_owners(model) -> list[tuple]:
    """(module, attribute name) of each plain attribute grouped_layer assumes (attention scale,
    norm epsilon, nu, normalize), in a fixed order; the module is None where it is missing."""
    out = []
    for b in _child(_child(model.base, "model"), "layers"):
        out += [(_child(b, "self_attn"), "scaling"), (_child(b, "input_layernorm"), "variance_epsilon"),
                (_child(b, "post_attention_layernorm"), "variance_epsilon")]
    for a in _child(model, "assoc"):
        out += [(a, "nu"), (a, "normalize")]
    return out


def _checked_attributes(model) -> list:
    """The values of _checked_owners(model)."""
    return [_attr(m, name) for m, name in _checked_owners(model)]


_FORWARD = itertools.repeat("forward")


class GroupingCheck:
    """ungroupable(model), walked again only when something may have changed: a registration
    anywhere (_Registrations), a hook or an instance `forward` on one of the checked modules,
    or a changed attribute. Otherwise a call costs one pass over those tables, in C (the ring
    asks every step)."""

    def __init__(self, model):
        _Registrations.listen()
        self.model = model
        self._count: int | None = None       # the registration count at the last walk
        self._attrs: list | None = None      # the checked attributes' values then
        self._problems: list[str] = []
        self._hook_tables: list[dict] = []   # every hook dict of every checked module
        self._dicts: list[dict] = []         # every checked module's instance dict (a forward set there)
        self._attr_dicts: list[dict] | None = None   # where the checked attributes live (None: not all plain)
        self._attr_names: list[str] = []

    def problems(self) -> list[str]:
        attrs = None
        if _Registrations.count == self._count:   # the same modules: read their attributes where they live
            attrs = (list(map(dict.get, self._attr_dicts, self._attr_names)) if self._attr_dicts is not None
                     else _checked_attributes(self.model))
        if (attrs is None or attrs != self._attrs or any(self._hook_tables)
                or any(map(operator.contains, self._dicts, _FORWARD))):
            count = _Registrations.count
            self._problems = ungroupable(self.model)
            mods = [m for b in list(self.model.base.model.layers) + list(self.model.assoc) for m in b.modules()]
            self._hook_tables = [t for m in mods for t in (m._forward_hooks, m._forward_pre_hooks,
                                                            m._backward_hooks, m._backward_pre_hooks)]
            self._dicts = [m.__dict__ for m in mods]
            owners = _checked_owners(self.model)
            plain = all(m is not None and name in m.__dict__ for m, name in owners)
            self._attr_dicts = [m.__dict__ for m, _ in owners] if plain else None
            self._attr_names = [name for _, name in owners]
            self._attrs, self._count = _checked_attributes(self.model), count
        return self._problems


# ---- stacked weights -------------------------------------------------------------------
def gather_stacks(model) -> dict[str, torch.Tensor]:
    """Stack the current parameters with torch.stack/cat: differentiable, a copy per call.
    Used when autograd must reach the per-layer parameters (training). Same layout as
    TiedStacks: 2-D weights as (L, in, out)."""
    def one(ps):
        t = torch.cat(ps, 0) if len(ps) > 1 else ps[0]
        return t.T if t.dim() == 2 else t
    return {name: torch.stack([one(ps) for ps in per_layer]) for name, per_layer in _stack_members(model).items()}


class TiedStacks:
    """Stacks that OWN the layer weights: each per-layer parameter's storage is re-pointed
    to a view of its stack, so values stay the model's own (an optimiser step or an in-place
    load_state_dict updates both at once) and nothing is copied per call. If the model's
    parameters already live in such stacks (another executor tied them), those are adopted
    as they are, so several executors share one copy.

    Layout: a 2-D weight stack is (L, in, out), the transpose of nn.Linear's (out, in), so
    every grouped projection is a plain X @ W with the weight's rows contiguous (on a CPU,
    with weights that do not fit the cache, measurably faster than multiplying by W^T).
    Each parameter is then a transposed view (out, in) with strides (1, out_total): the
    model's own F.linear multiplies by it without a copy. 1-D stacks (norms, biases) are (L, n).

    Because the layers' weights are then strided views into shared stacks, code that assumes
    contiguous weights fails on them — transformers' `save_pretrained` on the base model raises
    in its shared-tensor check. `untie(model)` gives each its own storage back first.

    `is_valid(model)` re-reads the model's parameters: a parameter replaced by a new one
    (load_state_dict(assign=True), a new nn.Parameter or submodule, .to(...) also with
    torch.__future__'s overwrite-on-conversion), or re-pointed elsewhere, makes it False, and
    the executor re-ties. A parametrized weight (torch.nn.utils.parametrize) is computed, not
    stored: it can never be tied, so is_valid is always False for stacks holding one and they
    are rebuilt — a copy — on every call. The stacks are ordinary tensors even
    when built under torch.inference_mode, so the parameters stay trainable afterwards."""

    def __init__(self, model):
        _Registrations.listen()
        self._key = _Registrations.count
        self.tensors: dict[str, torch.Tensor] = {}
        self._params: list[torch.Tensor] = []   # the tied members, and where their data must stay
        self._ptrs: list[int] = []
        self._owners = [o for per_layer in _stack_members(model, owners=True).values() for ps in per_layer for o in ps]
        with torch.inference_mode(False), torch.no_grad():
            for name, per_layer in _stack_members(model).items():
                stack = _existing_stack(per_layer)
                first = per_layer[0]
                rows = sum(p.shape[0] for p in first)
                if stack is None:
                    shape = (len(per_layer), *first[0].shape[1:], rows)   # (L, in, out) or (L, n)
                    stack = torch.empty(shape, dtype=first[0].dtype, device=first[0].device)
                for l, ps in enumerate(per_layer):
                    r = 0
                    for p in ps:
                        view = _member_view(stack, l, r, p.shape[0])
                        if p.data_ptr() != view.data_ptr() or p.stride() != view.stride():
                            view.copy_(p)
                            p.data = view
                        self._params.append(p)
                        self._ptrs.append(view.data_ptr())
                        r += p.shape[0]
                self.tensors[name] = stack
        # each owner's parameter table and the attribute name, side by side (is_valid runs every
        # call — every step of a ring — so its loops run in C: map over these lists)
        self._tables = [o._parameters for o, _ in self._owners]
        self._names = [a for _, a in self._owners]

    def is_valid(self, model) -> bool:
        if _Registrations.count != self._key:   # a module or parameter was registered: re-read the owners
            now = [o for per_layer in _stack_members(model, owners=True).values() for ps in per_layer for o in ps]
            if now != self._owners:
                return False
            self._key = _Registrations.count
        # each owner still holds the very Parameter that was tied (not a replacement, nor a computed
        # parametrized weight), and its data still sits in the stack (not moved, cast or .data = ...)
        return (all(map(operator.is_, map(dict.get, self._tables, self._names), self._params))
                and list(map(torch.Tensor.data_ptr, self._params)) == self._ptrs)


def untie(model) -> int:
    """Give every parameter that lives in a TiedStacks stack its own contiguous storage again
    (the same values; the model and any optimiser keep the same Parameter objects). Needed
    before code that assumes each weight is contiguous or a contiguous slice of a shared
    buffer — transformers' `model.base.save_pretrained` does (its shared-tensor check calls
    .view(-1)); `ARMT.save_pretrained` needs nothing. An executor re-ties on its next call.
    Returns how many parameters were given their own storage."""
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for per_layer in _stack_members(model, check=False).values():
            for ps in per_layer:
                for p in ps:
                    if p is not None and (not p.is_contiguous() or p.untyped_storage().nbytes()
                                          > p.numel() * p.element_size()):
                        p.data = p.detach().clone(memory_format=torch.contiguous_format)
                        n += 1
    return n


def _member_view(stack: torch.Tensor, l: int, r: int, n: int) -> torch.Tensor:
    """Layer l's member starting at output row r with n rows, as the parameter sees it:
    (n, in) from an (L, in, out) stack (a transposed view), (n,) from an (L, out) one."""
    return stack[l, :, r:r + n].T if stack.dim() == 3 else stack[l, r:r + n]


def _existing_stack(per_layer: list[list[torch.Tensor]]) -> torch.Tensor | None:
    """The stack these parameters already are views of, laid out exactly as TiedStacks lays
    it out ((L, in, out) for weights, (L, out) for vectors), or None."""
    first = per_layer[0][0]
    if first.is_inference() or first.dim() > 2:
        return None
    storage = first.untyped_storage()
    rows = sum(p.shape[0] for p in per_layer[0])
    shape = (len(per_layer), *first.shape[1:], rows)
    start = first.storage_offset()
    if storage.nbytes() < (start + math.prod(shape)) * first.element_size():
        return None
    stack = torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, start, shape)
    for l, ps in enumerate(per_layer):
        r = 0
        for p in ps:
            want = _member_view(stack, l, r, p.shape[0])
            if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.dtype != first.dtype
                    or p.shape != want.shape or p.storage_offset() != want.storage_offset()
                    or p.stride() != want.stride()):
                return None
            r += p.shape[0]
    return stack


@dataclass(frozen=True)
class LayerStack:
    """The model's L layers as both twins need them: `model` (the reference loops over its
    modules), `W` (stack name -> (L, in, out) weight or (L, n) vector; the fast path slices
    W[lo:hi+1]; None when only the reference runs) and `dims`."""
    model: nn.Module
    W: dict[str, torch.Tensor] | None
    dims: LayerDims
    _slices: dict = field(default_factory=dict, compare=False, repr=False)

    def slices(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """W[lo:hi+1] for every stack (views), made once per range for this LayerStack."""
        if torch.compiler.is_compiling():   # traced once into the graph: no cache (it would add guards)
            return {name: t[lo:hi + 1] for name, t in self.W.items()}
        got = self._slices.get((lo, hi))
        if got is None:
            got = self._slices[(lo, hi)] = {name: t[lo:hi + 1] for name, t in self.W.items()}
        return got

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed_sin(sin) laid out (., T, heads, hd) for rotate_rolled, made once per
        pair of tables for this LayerStack (segments of one shape share their tables, so the
        plateau makes them once). Materialised, not broadcast: an elementwise kernel over a
        broadcast middle axis runs hd-long inner loops, several times slower."""
        shape = (cos.shape[0], cos.shape[1], heads, cos.shape[2])
        if torch.compiler.is_compiling() or cos.shape[0] != 1:   # compiled: fused anyway; per-row tables
            return cos[:, :, None], signed_sin(sin)[:, :, None]   # (a masked step's) are not kept past it
        kept = self._slices.get("rope")
        if kept is None or kept[0] is not cos or kept[1] is not sin:
            kept = self._slices["rope"] = (cos, sin, cos[:, :, None].expand(shape).contiguous(),
                                           signed_sin(sin)[:, :, None].expand(shape).contiguous())
        return kept[2], kept[3]


# ---- grouped operations (one call for the whole group) ----------------------------------
PHASES = ("read", "attention", "mlp", "write")  # the parts of a grouped step, as labelled for torch.profiler


def profiler_range(name: str):
    """torch.profiler.record_function(name) while a profiler runs; otherwise nothing (a
    record_function costs about 6 microseconds even with no profiler, as much as a small
    kernel). Inside torch.compile nothing either: the compiled step shows its own kernels."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():   # compiled: no range, no guard
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


_NO_RANGE = contextlib.nullcontext()


def _phase(name: str, profiling: bool):
    """The range 'phase <name>' of a part of the grouped step (PHASES), while a profiler runs."""
    return profiler_range(f"phase {name}") if profiling else _NO_RANGE


def grouped_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None,
                   kernel: str = "bmm") -> torch.Tensor:
    """x: (G, R, in); W: (G, in, out) stacked nn.Linear weights, transposed (TiedStacks);
    b: (G, out) -> (G, R, out). kernel="grouped_mm" uses torch._grouped_mm where its
    16-byte stride rule holds (an odd `out`, such as W_mkvb's d_mem + d + 1, goes to bmm)."""
    if kernel == "grouped_mm" and W.stride(1) * W.element_size() % 16 == 0 and x.stride(1) * x.element_size() % 16 == 0:
        y = torch._grouped_mm(x, W)
        return y if b is None else y + b.unsqueeze(1)
    if b is None:
        return torch.bmm(x, W)
    return torch.baddbmm(b.unsqueeze(1), x, W)


def grouped_linear_ref(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The naive twin of grouped_linear: one F.linear per layer (weight W[g].T, as nn.Linear
    holds it), then stacked."""
    return torch.stack([F.linear(x[g], W[g].T, None if b is None else b[g]) for g in range(x.shape[0])])


def grouped_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, in_place: bool = False) -> torch.Tensor:
    """x: (G, B, T, d); w: (G, d). LLaMA's RMSNorm (statistics in float32) per group element.
    in_place: no graph is recorded, so the weight is applied in the normalised temporary's own
    storage when both have one dtype (the same numbers: a product does not depend on its order)."""
    x32 = x if x.dtype == torch.float32 else x.float()    # (a cast to the same dtype still costs a call)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    w = w.reshape(w.shape[0], 1, 1, w.shape[1])
    y = x32 if x.dtype == torch.float32 else x32.to(x.dtype)
    return y.mul_(w) if in_place and w.dtype == y.dtype else w * y


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x (..., T, hd) rotated by angle tables cos/sin (..., T, hd) (halves convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rotate_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """rotate's fast twin, the same numbers: cat([-x2, x1]) * sin == roll(x, half) * [-sin1, sin2]
    (a sign flip is exact), so one roll replaces slice, neg and cat. sin_signed from signed_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """[-sin1, sin2] from a halves-convention table sin = [sin1, sin2] (..., hd)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def grouped_layer(X: torch.Tensor, *, layers: LayerStack, lo: int, hi: int, n_text: int,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor | None,
                  write_mask: torch.Tensor | None = None, read: bool = True):
    """Read, decoder layer and write for the layers lo..hi at once (one diagonal step).

    X: (G, B, T, d), element g = layer lo + g on its own segment; T = n_text + M.
    cos, sin: (1 or G*B, T, hd); mask: (G*B, T, T) bool (True = may attend) or None (causal).
    W_mem: (G, B, dk, d); z: (G, B, dk); is_first: (G, B) bool, or None when no row of any
    element is on its layer's first segment (known on the host: the same numbers without the
    read's and the write's masks); write_mask: (G, B) bool rows that write, or None for all.
    read: False when every element is on its layer's first segment (known on the host, which
    spares a device sync per step).
    Returns Y (G, B, T, d) and the new W_mem, z.
    """
    G, B, T, d = X.shape
    dims = layers.dims
    H, Hkv, hd, kernel = dims.heads, dims.kv_heads, dims.head_dim, dims.kernel
    W = layers.slices(lo, hi)                                                   # views, no copy
    profiling = not torch.compiler.is_compiling() and torch.autograd._profiler_enabled()   # checked once a step
    # A temporary may be overwritten when no graph is recorded (eager, under no_grad or inference
    # mode) and no torch.func transform runs (an unbatched temporary cannot take a batched operand
    # in place); each in-place sum or product also needs both operands in one dtype (under
    # autocast a projection comes out bf16 beside a float32 X: X + o promotes, o.add_(X) would not).
    in_place = not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
        and torch._C._functorch.peek_interpreter_stack() is None
    # 1. read: h <- h + A(h) for every row, once the layer has written (design §2)
    if read:
        with _phase("read", profiling):
            q = features(grouped_linear(X.reshape(G, B * T, d), W["W_mq.weight"], kernel=kernel),
                         dims.nu, dims.normalize, fast=True).view(G, B, T, -1)   # (G, B, T, dk)
            A = associative_read(q, W_mem, z)                                    # (G, B, T, d)
            A = A if A.dtype == X.dtype else A.to(X.dtype)
            X = X + (A if is_first is None else A.masked_fill(is_first[:, :, None, None], 0))
    # 2. self-attention, the group folded into the batch
    with _phase("attention", profiling):
        h = grouped_rms_norm(X, W["input_layernorm.weight"], dims.eps, in_place).reshape(G, B * T, d)
        qkv = grouped_linear(h, W["qkv_proj.weight"], W.get("qkv_proj.bias"), kernel=kernel)
        qkv = qkv.view(G * B, T, H + 2 * Hkv, hd)
        # RoPE on the H query and Hkv key heads at once (they are adjacent in qkv)
        qk = rotate_rolled(qkv[:, :, :H + Hkv], *layers.rope_tables(cos, sin, H + Hkv))   # (G*B, T, H+Hkv, hd)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)         # (G*B, H or Hkv, T, hd)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)                                  # (G*B, Hkv, T, hd)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask.unsqueeze(1), is_causal=mask is None,
            scale=hd ** -0.5, enable_gqa=H != Hkv)                               # (G*B, H, T, hd)
        att = att.transpose(1, 2).reshape(G, B * T, H * hd)
        o = grouped_linear(att, W["o_proj.weight"], W.get("o_proj.bias"), kernel=kernel).view(G, B, T, d)
        X = o.add_(X) if in_place and o.dtype == X.dtype else X + o               # (x + y == y + x)
    # 3. SwiGLU MLP
    with _phase("mlp", profiling):
        h = grouped_rms_norm(X, W["post_attention_layernorm.weight"], dims.eps, in_place).reshape(G, B * T, d)
        gate, up = grouped_linear(h, W["gate_up_proj.weight"], W.get("gate_up_proj.bias"),
                                  kernel=kernel).chunk(2, dim=-1)                # (G, B*T, F) each
        if in_place:   # the same numbers in gate's own storage: two (G, B*T, F) tensors fewer
            act = F.silu(gate, inplace=True).mul_(up)
        else:
            act = F.silu(gate) * up
        down = grouped_linear(act, W["down_proj.weight"], W.get("down_proj.bias"), kernel=kernel).view(G, B, T, d)
        X = down.add_(X) if in_place and down.dtype == X.dtype else X + down
    # 4. write from the memory rows m of the output (design §2)
    with _phase("write", profiling):
        M = T - n_text
        m = X[:, :, n_text:].reshape(G, B * M, d)                                # (G, B*M, d)
        k_raw, v, b = grouped_linear(m, W["W_mkvb.weight"], kernel=kernel).split([dims.d_mem, d, 1], dim=-1)
        k = features(k_raw, dims.nu, dims.normalize, fast=True).view(G, B, M, -1)   # (G, B, M, dk)
        beta = torch.sigmoid(b + W["W_mb.bias"].unsqueeze(1)).view(G, B, M, 1)
        W_mem, z = associative_write(k, v.view(G, B, M, d), beta, W_mem, z, is_first,
                                     dims.correction, write_mask)
    return X, W_mem, z


def grouped_cells(step: Callable, layers: LayerStack, X: torch.Tensor, rows: list[SegmentRows],
                  state: MemoryState, lo: int, hi: int, n_text: int, read: bool,
                  settled: bool = False, is_first: torch.Tensor | None = None) -> tuple[torch.Tensor, MemoryState]:
    """One step of the grid: layers lo..hi, each on its own segment (rows, in layer order), as
    one call of `step` (grouped_layer or its twin). X (G, B, T, d) -> (Y (G, B, T, d), the state
    with those layers' memories replaced). The executor, the pipeline's ranks share it.
    settled: the caller knows that every row of layers lo..hi has written before (is_first all
    False): the step then skips its first-segment masks and is_first stays as it is.
    is_first: (G, B), when the caller knows better than the state which rows start a layer's
    memory (the ring: a request's first segment meets a slot another request left)."""
    if settled and is_first is not None:
        raise ValueError("grouped_cells: settled=True says no row is on its first segment; an is_first "
                         "tensor contradicts it — give one or the other")
    cos, sin, mask, wmask = stack_rows(rows)
    W_mem, z, first = state.layers(lo, hi)                                    # (G, B, dk, d), (G, B, dk), (G, B)
    if is_first is not None:
        first = is_first
    Y, W_mem, z = step(X, layers=layers, lo=lo, hi=hi, n_text=n_text, cos=cos, sin=sin, mask=mask,
                       W_mem=W_mem, z=z, is_first=None if settled else first, write_mask=wmask, read=read)
    return Y, state.replace(lo, hi, W_mem, z, first if settled else first_after_write(first, wmask))


def grouped_layer_ref(X: torch.Tensor, *, layers: LayerStack, lo: int, hi: int, n_text: int,
                      cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                      W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor | None,
                      write_mask: torch.Tensor | None = None, read: bool = True):
    """The naive twin of grouped_layer: the same arguments and outputs, computed by calling
    the model's own modules layer by layer — its associative layer's read, the transformers
    decoder layer (hooks, adapters and all), the associative layer's write."""
    model = layers.model
    G, B = X.shape[:2]
    Ys, Ws, zs = [], [], []
    for g, l in enumerate(range(lo, hi + 1)):
        rows = slice(g * B, (g + 1) * B)                                        # element g in (G*B, ...)
        h, assoc = X[g], model.assoc[l]                                         # (B, T, d)
        first = None if is_first is None else is_first[g]
        if read:
            h = assoc.read(h, W_mem[g], z[g], first)
        rope = (cos, sin) if cos.shape[0] == 1 else (cos[rows], sin[rows])
        m = hf_mask(None if mask is None else mask[rows], h, model.base.config)
        h = model.base.model.layers[l](h, attention_mask=m, position_embeddings=rope)
        W_g, z_g = assoc.write(h[:, n_text:], W_mem[g], z[g], first, layers.dims.correction,
                               None if write_mask is None else write_mask[g])
        Ys.append(h), Ws.append(W_g), zs.append(z_g)
    if G == 1:   # the sequential model's case: views, not copies
        return Ys[0][None], Ws[0][None], zs[0][None]
    return torch.stack(Ys), torch.stack(Ws), torch.stack(zs)


def hf_mask(mask: torch.Tensor | None, h: torch.Tensor, config) -> torch.Tensor | None:
    """Our (B, T, T) bool mask (None = causal) for rows h (B, T, d), in the form a transformers
    decoder layer takes:
    (B, 1, T, T) boolean for SDPA; for the eager implementation, which adds the mask to the
    scores, an additive one (0 where allowed, the dtype's minimum elsewhere), causal included."""
    if config._attn_implementation == "sdpa":
        return None if mask is None else mask[:, None]
    if mask is None:
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()[None]
    return torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(
        ~mask, torch.finfo(h.dtype).min)[:, None]
