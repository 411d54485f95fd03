# SPDX-License-Identifier: Apache-2.0
"""CUDA streams as epcomm takes them: an int (cudaStream_t) or an object that has one."""
import sys

from . import _epcomm


def current_stream() -> int:
    """The stream a call with ``stream=None`` runs on: torch's current stream when torch has
    initialized CUDA in this process, else the legacy default stream (0)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_stream().cuda_stream
    return 0


def stream_handle(stream=None) -> int:
    """The cudaStream_t (as an int) of ``stream``: None (current_stream()), an int, a
    torch.cuda.Stream (``.cuda_stream``), a CuPy stream (``.ptr``) or any object with the
    ``__cuda_stream__`` protocol. Passing the int to Buffer calls saves the lookup."""
    return _epcomm._stream_handle(stream)
