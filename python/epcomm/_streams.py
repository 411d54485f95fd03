# SPDX-License-Identifier: Apache-2.0
"""CUDA streams as epcomm takes them: an int (cudaStream_t) or an object that has one."""
import sys

from . import _epcomm

_raw_stream_of = None  # (torch module, raw current-stream function, current-device function)


def _torch_raw(torch):
    """torch's C functions for the current stream's handle (no torch.cuda.Stream object is made:
    torch.cuda.current_stream() builds one per call, a few microseconds), or None when this
    torch lacks them."""
    global _raw_stream_of
    if _raw_stream_of is None or _raw_stream_of[0] is not torch:
        c = getattr(torch, "_C", None)
        raw = getattr(c, "_cuda_getCurrentRawStream", None)
        dev = getattr(c, "_cuda_getDevice", None)
        _raw_stream_of = (torch, (raw, dev) if raw is not None and dev is not None else None)
    return _raw_stream_of[1]


_raw_current = None  # (raw current-stream function, current-device function) once CUDA is up


def current_stream() -> int:
    """The stream a call with ``stream=None`` runs on: torch's current stream when torch has
    initialized CUDA in this process, else the legacy default stream (0)."""
    global _raw_current
    fns = _raw_current
    if fns is not None:  # CUDA stays initialized once it is: two C calls from then on
        return fns[0](fns[1]())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        fns = _torch_raw(torch)
        if fns is not None:
            _raw_current = fns
            return fns[0](fns[1]())
        return torch.cuda.current_stream().cuda_stream
    return 0


def stream_handle(stream=None) -> int:
    """The cudaStream_t (as an int) of ``stream``: None (current_stream()), an int, a
    torch.cuda.Stream (``.cuda_stream``), a CuPy stream (``.ptr``) or any object with the
    ``__cuda_stream__`` protocol. Passing the int to Buffer calls saves the lookup."""
    return _epcomm._stream_handle(stream)
