"""DPFP, associative read and write on hand-sized examples (design §2)."""

import pytest
import torch

from diaglab import ARMTConfig, MemoryState, associative_read, associative_write, dpfp
from diaglab.memory import EPS


def test_dpfp_by_hand():
    # u = [1, -2]: r = [1, 0, 0, 2]; roll1(r) = [2, 1, 0, 0]; roll2(r) = [0, 2, 1, 0]
    assert dpfp(torch.tensor([1.0, -2.0]), nu=1).tolist() == [2.0, 0.0, 0.0, 0.0]
    assert dpfp(torch.tensor([1.0, -2.0]), nu=2).tolist() == [2.0, 0.0, 0.0, 0.0] + [0.0] * 4
    # u = [0.5, 1.5]: r = [.5, 1.5, 0, 0]; roll1 -> [0, .75, 0, 0]; roll2 -> 0; roll3 = [1.5, 0, 0, .5] -> [.75, 0, 0, 0]
    assert dpfp(torch.tensor([0.5, 1.5]), nu=3).tolist() == [0, 0.75, 0, 0, 0, 0, 0, 0, 0.75, 0, 0, 0]


def test_dpfp_shape_and_sign():
    u = torch.randn(2, 5, 16)
    phi = dpfp(u, nu=3)
    assert phi.shape == (2, 5, 96) and bool((phi >= 0).all())


def test_read_by_hand():
    q = torch.tensor([[1.0, 2.0]])                       # (T=1, dk=2)
    W = torch.eye(2)                                     # (dk, d)
    z = torch.tensor([1.0, 1.0])
    A = associative_read(q, W, z)
    assert torch.allclose(A, torch.tensor([[1.0, 2.0]]) / (3 + EPS))


def test_write_first_then_second_by_hand():
    W0, z0 = torch.zeros(2, 2), torch.zeros(2)
    k = torch.tensor([[1.0, 0.0]]); v = torch.tensor([[2.0, 3.0]]); beta = torch.tensor([[0.5]])
    W1, z1 = associative_write(k, v, beta, W0, z0, torch.tensor(True))
    assert torch.allclose(W1, torch.tensor([[1.0, 1.5], [0.0, 0.0]]))   # vbar = 0 on the first segment
    assert torch.allclose(z1, torch.tensor([1.0, 0.0]))                  # gamma = 1 on the first segment
    k2 = torch.tensor([[1.0, 1.0]]); v2 = torch.tensor([[1.0, 1.0]]); beta2 = torch.tensor([[1.0]])
    W2, z2 = associative_write(k2, v2, beta2, W1, z1, torch.tensor(False))
    delta = 1.0 + EPS
    vbar = torch.tensor([1.0, 1.5]) / delta
    assert torch.allclose(W2, W1 + torch.outer(k2[0], v2[0] - vbar))
    gamma = 1 - delta / (2 + EPS)
    assert torch.allclose(z2, z1 + gamma * k2[0])


def test_gamma_is_clipped_and_correction_off():
    W, z = torch.zeros(2, 2), torch.tensor([2.0, 0.0])
    k = torch.tensor([[1.0, 0.0]]); v = torch.ones(1, 2); beta = torch.ones(1, 1)
    _, z_new = associative_write(k, v, beta, W, z, torch.tensor(False), correction=True)
    assert torch.equal(z_new, z)            # 1 - 2/1 < 0 -> gamma clipped to 0
    _, z_off = associative_write(k, v, beta, W, z, torch.tensor(False), correction=False)
    assert torch.allclose(z_off, z + k[0])  # correction=False: gamma = 1


def test_write_mask_keeps_rows():
    W, z = torch.zeros(2, 3, 2), torch.zeros(2, 3)
    k = torch.rand(2, 1, 3); v = torch.rand(2, 1, 2); beta = torch.ones(2, 1, 1)
    W1, z1 = associative_write(k, v, beta, W, z, torch.tensor([True, True]), write_mask=torch.tensor([True, False]))
    assert W1[0].abs().sum() > 0 and torch.equal(W1[1], W[1]) and torch.equal(z1[1], z[1])


def test_memory_is_float32_for_bf16_inputs():
    W, z = torch.zeros(4, 3), torch.zeros(4)
    k = torch.rand(2, 4, dtype=torch.bfloat16); v = torch.rand(2, 3, dtype=torch.bfloat16)
    W1, z1 = associative_write(k, v, torch.ones(2, 1, dtype=torch.bfloat16), W, z, torch.tensor(True))
    assert W1.dtype == torch.float32 and z1.dtype == torch.float32
    assert associative_read(torch.rand(5, 4, dtype=torch.bfloat16), W1, z1).dtype == torch.float32


def test_state_empty_shapes():
    s = MemoryState.empty(3, 2, 12, 8)
    assert s.W_mem.shape == (3, 2, 12, 8) and s.z.shape == (3, 2, 12) and bool(s.is_first.all())


@pytest.mark.parametrize("field,value", [("segment_size", 0), ("segment_size", -3), ("num_mem_tokens", 0),
                                         ("d_mem", 0), ("segment_size", 2.5), ("segment_size", "64"),
                                         ("correction", 1), ("memory_dtype", torch.int64), ("nu", 0)])
def test_config_rejects_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        ARMTConfig(**{field: value})


def test_config_round_trip():
    c = ARMTConfig(segment_size=5, num_mem_tokens=2, d_mem=4, correction=False, memory_dtype="float64")
    assert c.memory_dtype == torch.float64 and c.d_key == 24
    assert ARMTConfig.from_dict(c.to_dict()) == c


def test_first_after_write_keeps_only_masked_rows_first():
    from diaglab.memory import first_after_write
    first = torch.tensor([[True, True, False], [True, False, True]])
    written = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(first_after_write(first, written), torch.tensor([[False, True, False], [True, False, False]]))
    assert not first_after_write(first, None).any()


def test_state_ranges_and_replacements_are_checked():
    s = MemoryState.empty(3, 1, 12, 8)
    for lo, hi in ((2, 5), (2, 1), (-1, 0)):
        with pytest.raises(ValueError, match="must satisfy 0 <= lo <= hi < 3"):
            s.layers(lo, hi)
    W, z, first = s.layers(0, 1)
    with pytest.raises(ValueError, match=r"replace\(0, 0\): W_mem must be \(1, 1, 12, 8\)"):
        s.replace(0, 0, W, z, first)                     # two layers' worth for one layer
    with pytest.raises(ValueError, match="is_first must be"):
        s.replace(0, 1, W, z, first.long())
    t = s.replace(0, 1, W + 1, z, ~first)
    assert t.W_mem.shape == (3, 1, 12, 8) and float(t.W_mem[2].abs().max()) == 0.0 and float(s.W_mem.max()) == 0.0


@pytest.mark.parametrize("write", [True, False])
def test_a_first_segment_writes_into_an_empty_memory_whatever_the_state_holds(write):
    """is_first rows start from W_mem = 0, z = 0 even when the state holds something there (a ring
    slot another request left): writing, or keeping (a row that does not write), gives what an
    empty memory gives; rows past their first segment keep using theirs."""
    g = torch.Generator().manual_seed(3)
    k = dpfp(torch.randn(2, 4, 3, generator=g))                             # (B, M, dk)
    v, beta = torch.randn(2, 4, 5, generator=g), torch.rand(2, 4, 1, generator=g)
    W_mem, z = torch.randn(2, 18, 5, generator=g), torch.rand(2, 18, generator=g)
    first = torch.tensor([True, False])
    wm = None if write else torch.tensor([False, True])
    got = associative_write(k, v, beta, W_mem, z, first, write_mask=wm)
    empty = associative_write(k, v, beta, torch.zeros_like(W_mem), torch.zeros_like(z), first, write_mask=wm)
    held = associative_write(k, v, beta, W_mem, z, torch.tensor([False, False]), write_mask=wm)
    assert torch.equal(got[0][0], empty[0][0]) and torch.equal(got[1][0], empty[1][0])   # row 0: first
    assert torch.equal(got[0][1], held[0][1]) and torch.equal(got[1][1], held[1][1])     # row 1: its own
    if not write:
        assert not got[0][0].any() and not got[1][0].any()                  # kept: the empty memory


def test_ordinary_refuses_to_run_inside_inference_mode():
    """Inside inference mode a copy would be an inference tensor again: a clear error instead."""
    with torch.inference_mode():
        state = MemoryState.empty(2, 1, 6, 4)
        with pytest.raises(RuntimeError, match="outside"):
            state.ordinary()
    assert not state.ordinary().W_mem.is_inference()


@pytest.mark.parametrize("N", [1, 7, 8, 9, 24, 30])
@pytest.mark.parametrize("carried", [0, 3])
def test_host_flags_of_an_unpadded_input_are_the_tensor_ones(N, carried):
    """Without a mask, segment() knows on the host which segments every row fills and whether
    the input ends inside one; those shortcuts equal what nreal says."""
    from diaglab.segments import Segmented, segment
    ids = torch.arange(2 * N).view(2, N) % 50
    open_ids = torch.full((2, carried), 7) if carried else None
    seg = segment(ids, 8, open_ids=open_ids)
    from_tensors = Segmented(seg.ids, seg.targets, seg.nreal, seg.bounds, True, 8, seg.skip)   # padded: no shortcut
    assert seg.full == from_tensors.full == (seg.nreal == 8).all(dim=1).tolist()
    a, b = seg.open_ids(), from_tensors.open_ids()
    assert (a is None and b is None) or torch.equal(a, b)
    assert (a is None) == ((N + carried) % 8 == 0)
    if a is not None:                                     # a copy: editing the input later changes nothing
        assert a.untyped_storage().data_ptr() != ids.untyped_storage().data_ptr()


@pytest.mark.parametrize("bad", [torch.tensor(1.0), "W", torch.zeros(2, 2, 4, 8, dtype=torch.float64)])
def test_replace_names_a_tensor_of_the_wrong_shape_type_or_dtype(bad):
    state = MemoryState.empty(3, 2, 4, 8)
    W, z, f = state.layers(0, 1)
    with pytest.raises(ValueError, match="replace\\(0, 1\\): W_mem must be"):
        state.replace(0, 1, bad, z, f)
