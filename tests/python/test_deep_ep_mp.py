# SPDX-License-Identifier: Apache-2.0
"""epcomm.deep_ep, DeepEP's Buffer on one node, tested from DeepEP's documented behaviour.

Host tests (no GPU, no torch): Config, set_num_sms, the configs, the size-hint math, and the
clear errors for what is not supported. GPU tests (deep_ep_worker.py at 1, 2 and 4 ranks,
intranode and low-latency, in the style of DeepEP's test_intranode.py / test_low_latency.py)
skip without a GPU or torch."""
import importlib.util

import pytest

import epcomm
import epcomm.deep_ep as deep_ep
from _launch import run_ranks

HAS_TORCH = importlib.util.find_spec("torch") is not None
gpu = pytest.mark.skipif(epcomm.device_count() < 1 or not HAS_TORCH,
                         reason="needs a CUDA device and torch")


def _bytes_for_available():
    try:
        epcomm.bytes_for(2, hidden=256, num_experts=8, max_tokens_per_rank=0,
                         ll_max_tokens_per_rank=8)
        return True
    except epcomm.UnsupportedError:  # the merge placeholder of the wt-py branch
        return False


needs_bytes_for = pytest.mark.skipif(not _bytes_for_available(),
                                     reason="EpBuffer::bytesFor is not in this build")


# --- host -------------------------------------------------------------------------------------

def test_config_defaults_and_fields():
    c = deep_ep.Config()
    assert c.num_sms == 20
    c = deep_ep.Config(24, 8, 256, 16, 128)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == \
        (24, 8, 256, 16, 128)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(ValueError, match="num_sms"):
        deep_ep.Config(0)


def test_set_num_sms_and_configs():
    old, old_set = deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 24
        assert deep_ep.Buffer.get_combine_config(2).num_sms == 24
        with pytest.raises(ValueError, match="even"):
            deep_ep.Buffer.set_num_sms(23)
    finally:
        deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set = old, old_set
    for bad in (0, epcomm.MAX_RANKS + 1, 144):
        with pytest.raises(ValueError, match="one NVLink domain"):
            deep_ep.Buffer.get_dispatch_config(bad)


def test_largest_fitting():
    size = lambda t: 1000 + 100 * t  # noqa: E731
    assert deep_ep.largest_fitting(size, 1000 + 100 * 37, 4096) == 37
    assert deep_ep.largest_fitting(size, 1000 + 100 * 37 + 99, 4096) == 37
    assert deep_ep.largest_fitting(size, 1099, 4096) == 0
    assert deep_ep.largest_fitting(size, 10 ** 12, 4096) == 4096
    assert deep_ep.largest_fitting(size, 0, 4096) == 0
    for budget in range(1000, 3000, 7):  # against a linear scan
        want = max([t for t in range(0, 30) if t == 0 or size(t) <= budget])
        assert deep_ep.largest_fitting(size, budget, 29) == want


@needs_bytes_for
def test_size_hints_match_bytes_for():
    h = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert h == epcomm.bytes_for(8, hidden=7168, num_experts=256, max_topk=epcomm.MAX_TOPK,
                                 max_tokens_per_rank=0, ll_max_tokens_per_rank=128)["total"]
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 256) > h
    n = deep_ep.Config().get_nvl_buffer_size_hint(7168 * 2, 8)
    assert n > 0
    # The byte budget maps back to (at least) the hint's token count.
    fit = deep_ep.largest_fitting(
        lambda t: epcomm.bytes_for(8, hidden=7168, num_experts=256, max_topk=epcomm.MAX_TOPK,
                                   max_tokens_per_rank=t, ll_max_tokens_per_rank=0)["total"],
        n, epcomm.MAX_TOKENS_PER_RANK)
    assert fit >= deep_ep.HT_HINT_TOKENS


@pytest.mark.parametrize("kwargs, match", [
    (dict(allow_nvlink_for_low_latency_mode=False), "NVLink only"),
    (dict(enable_shrink=True), "shrink"),
    (dict(num_rdma_bytes=1 << 20), "internode"),
    (dict(num_nvl_bytes=-1), "expected >= 0"),
])
def test_constructor_rejects_unsupported(kwargs, match):
    with pytest.raises((NotImplementedError, ValueError), match=match):
        deep_ep.Buffer(None, **kwargs)


def test_event_overlap_without_event():
    ev = deep_ep.EventOverlap()
    ev.current_stream_wait()  # no event: nothing to wait for, no torch needed
    with ev as e:
        assert e is ev


# --- GPU (multi-rank, one process per rank) ---------------------------------------------------

@gpu
@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_intranode(nranks):
    run_ranks("intranode", nranks)


@gpu
@needs_bytes_for
@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_low_latency(nranks):
    run_ranks("low_latency", nranks)
