# SPDX-License-Identifier: Apache-2.0
"""epcomm: expert-parallel dispatch/combine over NVLink, from Python.

A thin layer over the C++ library (include/epcomm/): ``Buffer`` mirrors ``epcomm::EpBuffer``,
errors are the C++ error classes, tensors are anything with ``__dlpack__`` (torch, CuPy, JAX)
and results are DLPack views into the buffer. See docs/python.md.
"""
from ._epcomm import (  # noqa: F401
    FP8_BLOCK_SIZE,
    HIDDEN_ALIGNMENT,
    MAX_EXPERTS,
    MAX_HIDDEN,
    MAX_LL_TOKENS_PER_RANK,
    MAX_RANKS,
    MAX_TOKENS_PER_RANK,
    MAX_TOPK,
    Bootstrap,
    BrokenError,
    Buffer,
    CallbackBootstrap,
    CudaError,
    DispatchResult,
    DriverError,
    Error,
    ErrorCode,
    Handle,
    InternalError,
    InvalidArgument,
    LlDispatchResult,
    MpiError,
    RemoteError,
    SystemError,
    TimeoutError,
    UnsupportedError,
    __version__,
    bytes_for,
    git_describe,
    log_level,
    resolve_config,
    set_log_level,
)
from . import _epcomm
from ._bootstrap import (  # noqa: F401
    bootstrap_from_mpi4py,
    bootstrap_from_torch,
    single_process_bootstrap,
)
from ._streams import current_stream, stream_handle  # noqa: F401

_epcomm._set_current_stream_fn(current_stream)


def device_count() -> int:
    """CUDA devices visible to this process (0 when there is no GPU or driver)."""
    return _epcomm._device_count()


__all__ = [
    "FP8_BLOCK_SIZE", "HIDDEN_ALIGNMENT", "MAX_EXPERTS", "MAX_HIDDEN", "MAX_LL_TOKENS_PER_RANK",
    "MAX_RANKS", "MAX_TOKENS_PER_RANK", "MAX_TOPK", "__version__", "git_describe",
    "Bootstrap", "BrokenError", "Buffer", "CallbackBootstrap", "CudaError", "DispatchResult",
    "DriverError", "Error", "ErrorCode", "Handle", "InternalError", "InvalidArgument",
    "LlDispatchResult", "MpiError", "RemoteError", "SystemError", "TimeoutError",
    "UnsupportedError", "bootstrap_from_mpi4py", "bytes_for", "bootstrap_from_torch", "current_stream",
    "device_count", "log_level", "resolve_config", "set_log_level", "single_process_bootstrap",
    "stream_handle",
]
