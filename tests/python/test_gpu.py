# SPDX-License-Identifier: Apache-2.0
"""GPU tests of epcomm.Buffer at one rank, against references computed here with numpy.
They skip (never pass) without a CUDA device or without torch (used for the input tensors)."""
import gc

import numpy as np
import pytest

import epcomm
from conftest import requires_gpu

torch = pytest.importorskip("torch") if epcomm.device_count() > 0 else None
pytestmark = requires_gpu

HIDDEN, EXPERTS, TOPK, TOKENS = 256, 8, 4, 48


def _bf16_to_np(t):
    return t.float().cpu().numpy()


@pytest.fixture(scope="module")
def buf():
    torch.cuda.set_device(0)
    with epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                       num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64,
                       ll_max_tokens_per_rank=64) as b:
        yield b


def _inputs(seed=0, idx_dtype=np.int64):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(EXPERTS, TOPK, replace=False) for _ in range(TOKENS)])
    idx = idx.astype(idx_dtype)
    idx[0, :] = -1  # token 0 goes nowhere
    idx[1, 1] = -1  # one empty slot
    idx[2, 2] = idx[2, 0]  # a repeated expert counts once
    weights = rng.uniform(0.1, 1.0, (TOKENS, TOPK)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32))
    dev = torch.device("cuda", 0)
    return (x.to(torch.bfloat16).to(dev), torch.from_numpy(idx).to(dev),
            torch.from_numpy(weights).to(dev), idx, weights)


def _first_occurrence(idx):
    """idx with repetitions within a row replaced by -1 (the routing policy of ops.hpp)."""
    out = idx.copy()
    for t in range(idx.shape[0]):
        seen = set()
        for j in range(idx.shape[1]):
            if out[t, j] in seen:
                out[t, j] = -1
            elif out[t, j] >= 0:
                seen.add(out[t, j])
    return out


def test_properties(buf):
    assert buf.rank == 0 and buf.num_ranks == 1 and buf.device == 0
    assert buf.num_local_experts == EXPERTS and buf.hidden == HIDDEN
    assert buf.mem_mode in ("fabric", "posix_fd", "cuda_ipc")
    assert buf.bytes_per_rank > 0
    assert buf.config["max_topk"] == TOPK


@pytest.mark.parametrize("idx_dtype", [np.int64, np.int32])
def test_dispatch_and_combine_match_reference(buf, idx_dtype):
    x, topk_idx, topk_w, idx, weights = _inputs(1, idx_dtype)
    handle = buf.create_handle()
    res = buf.dispatch(x, handle, topk_idx=topk_idx, topk_weights=topk_w, exact_count=True)
    buf.sync()
    clean = _first_occurrence(idx)
    sent = [t for t in range(TOKENS) if (clean[t] >= 0).any()]
    assert res.num_recv_tokens_host == len(sent)
    assert isinstance(res.recv_x, torch.Tensor) and res.recv_x.dtype == torch.bfloat16
    assert tuple(res.recv_x.shape) == (len(sent), HIDDEN)
    src = res.recv_src_idx.cpu().numpy()
    assert list(src) == sent  # one source rank: its tokens in order
    np.testing.assert_array_equal(_bf16_to_np(res.recv_x), _bf16_to_np(x)[src])
    np.testing.assert_array_equal(res.recv_topk_idx.cpu().numpy(), clean[src])
    expected_w = np.where(clean[src] >= 0, weights[src], 0)
    np.testing.assert_array_equal(res.recv_topk_weights.cpu().numpy(), expected_w)
    per_expert = np.array([(clean == e).any(axis=1).sum() for e in range(EXPERTS)])
    np.testing.assert_array_equal(res.num_recv_tokens_per_expert.cpu().numpy(), per_expert)
    assert res.num_recv_tokens.cpu().item() == len(sent)
    assert handle.num_tokens == TOKENS and handle.num_topk == TOPK
    assert torch.from_dlpack(handle.num_tokens_per_rank).cpu().tolist() == [len(sent)]

    # Expert "output" = 2 * input, written where combine reads it without a copy.
    res.combine_input.copy_(res.recv_x * 2)
    out = buf.combine(res.combine_input, handle)
    buf.sync()
    ref = np.zeros((TOKENS, HIDDEN), np.float32)
    ref[sent] = 2 * _bf16_to_np(x)[sent]
    np.testing.assert_array_equal(_bf16_to_np(out), ref)

    # Weighted, from a tensor that is not combine_input (copied there first).
    y = (res.recv_x * 2).clone()
    out2 = torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16, device="cuda")
    buf.combine(y, handle, out2, scale_weights=topk_w)
    buf.sync()
    scale = np.where(clean >= 0, weights, 0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_bf16_to_np(out2), ref * scale, rtol=2e-2, atol=2e-2)

    # Cached dispatch: the same routing, new data, no top-k.
    x2 = (x * 3).contiguous()
    res2 = buf.dispatch(x2, handle, exact_count=True)
    buf.sync()
    assert res2.recv_topk_idx is None
    np.testing.assert_array_equal(_bf16_to_np(res2.recv_x), _bf16_to_np(x2)[sent])


def test_fp8_dispatch_with_column_major_scales(buf):
    x, topk_idx, topk_w, idx, _ = _inputs(2)
    rng = np.random.default_rng(3)
    x8 = torch.from_numpy(rng.integers(0, 120, (TOKENS, HIDDEN), dtype=np.uint8)).cuda()
    scales = torch.rand(HIDDEN // 128, TOKENS, device="cuda").t()  # column-major
    res = buf.dispatch(x8, topk_idx=topk_idx, x_scales=scales, exact_count=True)
    buf.sync()
    src = res.recv_src_idx.cpu().numpy()
    np.testing.assert_array_equal(res.recv_x.cpu().numpy(), x8.cpu().numpy()[src])
    np.testing.assert_array_equal(res.recv_x_scales.cpu().numpy(), scales.cpu().numpy()[src])
    assert res.handle is not None


def test_low_latency_dispatch_and_combine(buf):
    x, topk_idx, topk_w, idx, weights = _inputs(4)
    res = buf.low_latency_dispatch(x, topk_idx, topk_w)
    buf.sync()
    clean = _first_occurrence(idx)
    counts = res.num_recv_tokens_per_expert.cpu().numpy()
    info = res.recv_src_info.cpu().numpy()
    xs = _bf16_to_np(x)
    recv = _bf16_to_np(res.recv_x)
    for e in range(EXPERTS):
        tokens = sorted(t for t in range(TOKENS) if (clean[t] == e).any())
        assert counts[e] == len(tokens)
        got = info[e, :counts[e]] % 64  # src_rank * ll_max_tokens_per_rank + token
        assert sorted(got) == tokens
        np.testing.assert_array_equal(recv[e, :counts[e]], xs[got])
    out = buf.low_latency_combine(res.recv_x)
    buf.sync()
    scale = np.where(clean >= 0, weights, 0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_bf16_to_np(out), xs * scale, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise_and_leave_the_buffer_usable(buf):
    x, topk_idx, topk_w, _, _ = _inputs(5)
    with pytest.raises(epcomm.InvalidArgument, match="cpu"):
        buf.dispatch(x.cpu(), topk_idx=topk_idx)
    with pytest.raises(epcomm.InvalidArgument, match="dtype"):
        buf.dispatch(x.float(), topk_idx=topk_idx)
    with pytest.raises(epcomm.InvalidArgument, match="hidden"):
        buf.dispatch(x[:, :128].contiguous(), topk_idx=topk_idx)
    with pytest.raises(epcomm.InvalidArgument, match="contiguous"):
        buf.dispatch(x.t().contiguous().t(), topk_idx=topk_idx)
    with pytest.raises(epcomm.InvalidArgument, match="__dlpack__"):
        buf.dispatch([1, 2, 3], topk_idx=topk_idx)
    with pytest.raises(epcomm.InvalidArgument, match="stream"):
        buf.dispatch(x, topk_idx=topk_idx, stream="fast")
    other = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                          num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64)
    with pytest.raises(epcomm.InvalidArgument, match="another Buffer"):
        buf.dispatch(x, other.create_handle(), topk_idx=topk_idx)
    other.destroy()
    # A cached dispatch needs a handle that holds a layout: the library's own check.
    with pytest.raises(epcomm.InvalidArgument):
        buf.dispatch(x)
    res = buf.dispatch(x, topk_idx=topk_idx, exact_count=True)
    buf.sync()
    assert res.num_recv_tokens_host > 0
    out = buf.combine(res.combine_input, res.handle)
    with pytest.raises(epcomm.InvalidArgument, match="out"):
        buf.combine(res.combine_input, res.handle, out[:1])
    buf.sync()


def test_views_keep_the_buffer_alive_and_destroy_is_final():
    b = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                      num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64)
    x, topk_idx, _, _, _ = _inputs(6)
    res = b.dispatch(x, topk_idx=topk_idx, exact_count=True)
    recv = res.recv_x
    b.sync()
    del res, b
    gc.collect()
    assert torch.equal(recv, recv.clone())  # the memory is still mapped
    del recv
    gc.collect()

    b = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                      num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64)
    b.destroy()
    assert b.destroyed
    with pytest.raises(epcomm.BrokenError):
        b.dispatch(x, topk_idx=topk_idx)


def test_framework_dlpack_results(buf):
    x, topk_idx, _, _, _ = _inputs(7)
    b = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                      num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64,
                      framework="dlpack")
    res = b.dispatch(x, topk_idx=topk_idx, exact_count=True)
    b.sync()
    assert not isinstance(res.recv_x, torch.Tensor)
    assert hasattr(res.recv_x, "__dlpack__")
    t = torch.from_dlpack(res.recv_x)
    assert t.shape == (res.num_recv_tokens_host, HIDDEN) and t.dtype == torch.bfloat16
    b.destroy()


def test_torch_stream_objects(buf):
    x, topk_idx, _, _, _ = _inputs(8)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert epcomm.current_stream() == s.cuda_stream
    res = buf.dispatch(x, topk_idx=topk_idx, stream=s)
    buf.sync(s)
    assert res.num_recv_tokens_host is None and res.capacity >= TOKENS


def test_result_views_are_reused_and_buffer_is_collected():
    """Views of the same buffer memory come back as the same tensor object while the earlier one
    lives (the per-buffer weak view cache), and a Buffer dropped without destroy() is still
    freed (the cache holds no reference to it)."""
    import weakref

    b = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=HIDDEN,
                      num_experts=EXPERTS, max_topk=TOPK, max_tokens_per_rank=64,
                      ll_max_tokens_per_rank=64)
    x, topk_idx, topk_w, _, _ = _inputs(6)
    r1 = b.low_latency_dispatch(x, topk_idx, topk_w)
    v1 = r1.recv_x
    b.low_latency_combine(v1)
    r2 = b.low_latency_dispatch(x, topk_idx, topk_w)
    assert r2.recv_x is v1 and r2.num_recv_tokens_per_expert is r1.num_recv_tokens_per_expert
    b.low_latency_combine(r2.recv_x)
    h = b.create_handle()
    d1 = b.dispatch(x, h, topk_idx=topk_idx, topk_weights=topk_w)
    d2 = b.dispatch(x, h)
    assert d1.combine_input is d2.combine_input and d1.recv_x is d2.recv_x
    b.sync()
    ref = weakref.ref(b)
    del b, r1, r2, v1, d1, d2, h
    gc.collect()
    assert ref() is None, "the Buffer was not collected"
