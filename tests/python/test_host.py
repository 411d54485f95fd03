# SPDX-License-Identifier: Apache-2.0
"""Host-only tests of the Python binding: they need no GPU and run on any build machine."""
import builtins
import threading

import numpy as np
import pytest

import epcomm
from epcomm import _epcomm


def test_import_and_version():
    assert epcomm.__version__.count(".") == 2
    assert isinstance(epcomm.git_describe, str)
    assert epcomm.MAX_RANKS >= 2 and epcomm.FP8_BLOCK_SIZE == 128


def test_error_classes_mirror_cpp():
    classes = {
        epcomm.ErrorCode.INTERNAL: epcomm.InternalError,
        epcomm.ErrorCode.CUDA: epcomm.CudaError,
        epcomm.ErrorCode.DRIVER: epcomm.DriverError,
        epcomm.ErrorCode.MPI: epcomm.MpiError,
        epcomm.ErrorCode.SYSTEM: epcomm.SystemError,
        epcomm.ErrorCode.TIMEOUT: epcomm.TimeoutError,
        epcomm.ErrorCode.INVALID_ARGUMENT: epcomm.InvalidArgument,
        epcomm.ErrorCode.UNSUPPORTED: epcomm.UnsupportedError,
        epcomm.ErrorCode.REMOTE: epcomm.RemoteError,
        epcomm.ErrorCode.BROKEN: epcomm.BrokenError,
    }
    assert len(classes) == len(epcomm.ErrorCode.__members__)
    assert issubclass(epcomm.Error, RuntimeError)
    for cls in classes.values():
        assert issubclass(cls, epcomm.Error)
        assert cls.__module__ == "epcomm"
    assert issubclass(epcomm.TimeoutError, builtins.TimeoutError)
    assert issubclass(epcomm.InvalidArgument, ValueError)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden=100), "hidden"),
        (dict(hidden=7168 * 4), "hidden"),
        (dict(num_experts=255), "num_experts"),
        (dict(max_topk=0), "max_topk"),
        (dict(max_tokens_per_rank=0, ll_max_tokens_per_rank=0), "max_tokens_per_rank"),
        (dict(timeout_s=1e6), "timeout_s"),
    ],
)
def test_config_errors_are_invalid_argument(kwargs, field):
    with pytest.raises(epcomm.InvalidArgument) as info:
        epcomm.resolve_config(2, **kwargs)
    err = info.value
    assert err.code == epcomm.ErrorCode.INVALID_ARGUMENT
    assert field in str(err)
    assert isinstance(err.rank, int)
    assert err.message == str(err)


def test_bad_mem_mode_is_invalid_argument():
    with pytest.raises(epcomm.InvalidArgument, match="mem_mode"):
        epcomm.resolve_config(2, mem_mode="carrier-pigeon")


def test_resolve_config_fills_auto_values(monkeypatch):
    monkeypatch.delenv("EPCOMM_TIMEOUT_S", raising=False)
    monkeypatch.delenv("EPCOMM_FIRST_OP_TIMEOUT_S", raising=False)
    monkeypatch.delenv("EPCOMM_MEM_MODE", raising=False)
    cfg = epcomm.resolve_config(4, hidden=4096, num_experts=64, max_topk=6)
    assert cfg["num_ranks"] == 4
    assert cfg["hidden"] == 4096 and cfg["num_experts"] == 64 and cfg["max_topk"] == 6
    assert cfg["timeout_s"] == pytest.approx(30.0)
    assert cfg["first_op_timeout_s"] >= cfg["timeout_s"]


def test_environment_override_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "soon")
    with pytest.raises(epcomm.InvalidArgument, match="EPCOMM_TIMEOUT_S"):
        epcomm.resolve_config(2)


def test_single_process_bootstrap():
    bs = epcomm.single_process_bootstrap()
    assert (bs.rank, bs.size, bs.local_rank, bs.local_size, bs.num_nodes) == (0, 1, 0, 1, 1)
    assert bs.local_ranks == [0]
    assert bs.all_gather(b"abc") == b"abc"
    bs.barrier()


def _thread_group(size):
    """all_gather callbacks for `size` threads of this process acting as ranks."""
    slots = [None] * size
    gate = threading.Barrier(size, timeout=30)

    def make(rank):
        def all_gather(data):
            slots[rank] = bytes(data)
            gate.wait()
            out = list(slots)
            gate.wait()  # nobody overwrites a slot before everyone has read it
            return out

        return all_gather

    return make


def _run_ranks(size, fn):
    results, errors = [None] * size, []

    def body(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_callback_bootstrap_two_threads_releases_the_gil():
    # Each constructor is collective; it can only finish if the other thread gets the GIL.
    make = _thread_group(2)

    def rank_main(rank):
        bs = epcomm.CallbackBootstrap(rank, 2, make(rank))
        gathered = bs.all_gather(bytes([rank]) * 3)
        bs.barrier()
        return bs.rank, bs.size, bs.local_size, bs.num_nodes, gathered

    results = _run_ranks(2, rank_main)
    for rank, (r, size, local_size, nodes, gathered) in enumerate(results):
        assert (r, size, local_size, nodes) == (rank, 2, 2, 1)
        assert gathered == b"\x00\x00\x00\x01\x01\x01"


def test_callback_exception_becomes_system_error_with_cause():
    def broken(data):
        raise KeyError("process group went away")

    with pytest.raises(epcomm.SystemError, match="all_gather callback raised") as info:
        epcomm.CallbackBootstrap(0, 1, broken)
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.code == epcomm.ErrorCode.SYSTEM


def test_callback_wrong_size_is_invalid_argument():
    with pytest.raises(epcomm.InvalidArgument, match="expected"):
        epcomm.CallbackBootstrap(0, 1, lambda data: data + b"x")
    with pytest.raises(epcomm.InvalidArgument, match="one per rank"):
        epcomm.CallbackBootstrap(0, 1, lambda data: [data, data])


def test_callback_bootstrap_argument_checks():
    with pytest.raises(epcomm.InvalidArgument, match="rank"):
        epcomm.CallbackBootstrap(3, 2, lambda d: d)
    with pytest.raises(epcomm.InvalidArgument, match="size"):
        epcomm.CallbackBootstrap(0, 0, lambda d: d)


def test_buffer_bad_config_raises_invalid_argument():
    bs = epcomm.single_process_bootstrap()
    with pytest.raises(epcomm.InvalidArgument, match="hidden"):
        epcomm.Buffer(bs, hidden=100)


@pytest.mark.skipif(epcomm.device_count() > 0, reason="checks the error without a GPU")
def test_buffer_without_gpu_raises_cuda_error():
    bs = epcomm.single_process_bootstrap()
    with pytest.raises(epcomm.CudaError) as info:
        epcomm.Buffer(bs, hidden=256, num_experts=8, max_topk=2, max_tokens_per_rank=16)
    assert isinstance(info.value.status, int) and info.value.status != 0


DTYPES = [np.int8, np.uint8, np.int32, np.int64, np.float32, np.float64, np.bool_, np.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0, 4)])
def test_dlpack_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    shape_out, strides, name, device, device_id = _epcomm._describe(a)
    assert tuple(shape_out) == shape and device == "cpu"
    view = _epcomm._roundtrip(a)
    b = np.from_dlpack(view)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    if a.size:
        assert np.shares_memory(a, b)  # a view, not a copy


def test_roundtrip_view_keeps_its_owner_alive():
    view = _epcomm._roundtrip(np.arange(5, dtype=np.int32))
    import gc

    gc.collect()
    np.testing.assert_array_equal(np.from_dlpack(view), np.arange(5, dtype=np.int32))


def test_non_contiguous_strides_are_described():
    a = np.zeros((4, 6), dtype=np.float32)[:, ::2]
    shape, strides, name, _, _ = _epcomm._describe(a)
    assert shape == [4, 3] and strides == [6, 2] and name == "float32"


def test_cpu_arrays_are_rejected_with_a_clear_error():
    with pytest.raises(epcomm.InvalidArgument, match="expected a CUDA device tensor, got a cpu"):
        _epcomm._check_tensor(np.zeros((4, 128), dtype=np.float32), "x")


def test_stream_arguments():
    assert epcomm.stream_handle(None) in (0, epcomm.current_stream())
    assert epcomm.stream_handle(1234) == 1234

    class TorchLike:
        cuda_stream = 42

    class CudaStreamProtocol:
        def __cuda_stream__(self):
            return (0, 77)

    class CupyLike:
        ptr = 99

    assert epcomm.stream_handle(TorchLike()) == 42
    assert epcomm.stream_handle(CudaStreamProtocol()) == 77
    assert epcomm.stream_handle(CupyLike()) == 99
    with pytest.raises(epcomm.InvalidArgument, match="stream"):
        epcomm.stream_handle("default")


def test_log_level_round_trip():
    old = epcomm.log_level()
    try:
        epcomm.set_log_level("info")
        assert epcomm.log_level() == "INFO"
        with pytest.raises(epcomm.InvalidArgument):
            epcomm.set_log_level("loud")
    finally:
        epcomm.set_log_level(old)


def test_bench_module_imports():
    import epcomm.bench  # noqa: F401


def test_buffer_creation_fails_on_every_rank_together():
    # Two threads act as two ranks; rank 0's config is invalid. Creation is agreed step by step,
    # so rank 1 fails too (naming rank 0) instead of waiting: the GIL must be released around it.
    make = _thread_group(2)

    def rank_main(rank):
        bs = epcomm.CallbackBootstrap(rank, 2, make(rank))
        try:
            epcomm.Buffer(bs, hidden=100 if rank == 0 else 256, num_experts=8, max_topk=2,
                          max_tokens_per_rank=16)
        except epcomm.Error as e:
            return type(e), str(e)
        return None, ""

    results = _run_ranks(2, rank_main)
    assert results[0][0] is epcomm.InvalidArgument and "hidden" in results[0][1]
    assert results[1][0] is not None and issubclass(results[1][0], epcomm.Error)
    assert "rank 0" in results[1][1]


def test_bad_mem_mode_fails_buffer_creation_on_every_rank():
    # The binding parses mem_mode; a bad name on one rank must still fail creation everywhere.
    make = _thread_group(2)

    def rank_main(rank):
        bs = epcomm.CallbackBootstrap(rank, 2, make(rank))
        try:
            epcomm.Buffer(bs, hidden=256, num_experts=8, max_topk=2, max_tokens_per_rank=16,
                          mem_mode="carrier-pigeon" if rank == 1 else "auto")
        except epcomm.Error as e:
            return type(e), str(e)
        return None, ""

    results = _run_ranks(2, rank_main)
    assert results[1][0] is epcomm.InvalidArgument and "mem_mode" in results[1][1]
    assert results[0][0] is not None and "rank 1" in results[0][1]


def test_read_only_arrays_are_accepted():
    # Inputs are imported read-only (JAX exports read-only arrays); the binding only reads them.
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    a.flags.writeable = False
    assert _epcomm._describe(a)[0] == [2, 3]
    np.testing.assert_array_equal(np.from_dlpack(_epcomm._roundtrip(a)), a)


def test_ht_recv_rows_is_a_config_argument():
    # BufferConfig::ht_recv_rows: rows of the HT receive region (expert_major needs more than
    # the rank-major num_ranks * max_tokens_per_rank).
    cfg = epcomm.resolve_config(2, max_tokens_per_rank=64)
    assert cfg["ht_recv_rows"] == 2 * 64  # kAuto resolves to the rank-major rows
    assert epcomm.resolve_config(2, max_tokens_per_rank=64, ht_recv_rows=1000)["ht_recv_rows"] \
        == 1000
    auto = epcomm.bytes_for(2, max_tokens_per_rank=64)
    more = epcomm.bytes_for(2, max_tokens_per_rank=64, ht_recv_rows=1000)
    assert more["ht_recv"] > auto["ht_recv"] and more["total"] > auto["total"]
    assert epcomm.bytes_for(2, max_tokens_per_rank=64, ht_recv_rows=128) == auto
    with pytest.raises(epcomm.InvalidArgument, match="ht_recv_rows"):
        epcomm.resolve_config(2, max_tokens_per_rank=64, ht_recv_rows=100)
    with pytest.raises(epcomm.InvalidArgument, match="ht_recv_rows"):
        epcomm.bytes_for(2, max_tokens_per_rank=64, ht_recv_rows=2**31)


def test_torch_tensors_take_the_fast_dlpack_path():
    # torch.Tensor in and out through torch._C._to_dlpack / _from_dlpack (the binding's fast
    # path); subclasses (nn.Parameter) through nanobind's general one. Same memory either way.
    torch = pytest.importorskip("torch")
    for dtype in (torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.bool):
        t = torch.arange(12).reshape(3, 4).to(dtype)
        shape, strides, _, device, _ = _epcomm._describe(t)
        assert (shape, strides, device) == ([3, 4], [4, 1], "cpu")
        v = _epcomm._roundtrip(t)
        assert type(v) is torch.Tensor and v.dtype == dtype and v.data_ptr() == t.data_ptr()
        assert torch.equal(v, t)
    p = torch.nn.Parameter(torch.ones(2, 3), requires_grad=False)
    assert _epcomm._describe(p)[0] == [2, 3]
    del t
    v = _epcomm._roundtrip(torch.full((5,), 3, dtype=torch.int32))  # the view keeps it alive
    import gc

    gc.collect()
    assert v.tolist() == [3] * 5
