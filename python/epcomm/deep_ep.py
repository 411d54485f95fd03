# SPDX-License-Identifier: Apache-2.0
"""A drop-in for DeepEP's V1 Python ``deep_ep.Buffer`` on one node: ``import epcomm.deep_ep as
deep_ep``.

Intranode high-throughput (``dispatch`` / ``combine``) and low-latency (``low_latency_*``)
paths, with DeepEP's argument names, tuple shapes and stream behaviour, on top of
``epcomm.Buffer``. Internode (RDMA) and NVSHMEM-specific calls raise ``NotImplementedError``.
The facade is torch-only; torch is imported when it is first needed, so ``Config``,
``set_num_sms`` and the size hints work without it. docs/python.md has the mapping table.

Sizing. DeepEP sizes its buffers in bytes; epcomm in tokens (``BufferConfig``). The epcomm buffer
is created on the first collective call that shows the model shape (hidden from ``x``,
num_experts from the call), or in the constructor when ``hidden=`` and ``num_experts=`` are
given (epcomm extensions). Its capacities are the largest that fit the bytes given:
``max_tokens_per_rank`` from ``num_nvl_bytes`` and ``ll_max_tokens_per_rank`` from
``num_rdma_bytes`` (low_latency_mode only), each through ``epcomm.bytes_for`` (C++
``EpBuffer::bytesFor``). Explicit ``max_tokens_per_rank=`` / ``ll_max_tokens_per_rank=`` win.

Lifetimes. HT results are fresh tensors, as DeepEP's (copied out of the symmetric buffer).
LL results are zero-copy views, valid until the next ``low_latency_dispatch`` (DeepEP keeps two
LL buffers; epcomm alternates dispatch and combine on one).
"""
from . import _epcomm
from ._epcomm import InvalidArgument, UnsupportedError
from ._streams import current_stream as _current_stream

_INTERNODE = ("internode (RDMA) is not supported by epcomm.deep_ep: epcomm runs inside one "
              "NVLink domain")


_torch_module = None


def _torch():
    global _torch_module
    if _torch_module is None:
        import torch

        _torch_module = torch
    return _torch_module


# --- Config and size hints (no torch needed) ---------------------------------------------------


class Config:
    """DeepEP's performance config. Only ``num_sms`` is used (the SM budget of the HT call); the
    chunk sizes tune DeepEP's ring buffers, which epcomm does not have, and are kept only so
    code that builds or reads them runs unchanged."""

    __slots__ = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6,
                 num_max_nvl_chunked_recv_tokens=256, num_max_rdma_chunked_send_tokens=6,
                 num_max_rdma_chunked_recv_tokens=256):
        if not isinstance(num_sms, int) or num_sms <= 0:
            raise ValueError(f"Config: num_sms = {num_sms!r}, expected a positive int")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of an epcomm HT buffer for ``HT_HINT_TOKENS`` tokens per rank of
        ``hidden_bytes`` (hidden * 2 for BF16), at the largest top-k. DeepEP's hint sizes chunked
        ring buffers that take any token count; epcomm's capacity is in tokens, so the hint is
        for a token count (pass ``max_tokens_per_rank=`` to Buffer for another)."""
        hidden = _hidden_from_bytes(hidden_bytes)
        return _bytes_for(num_ranks, hidden=hidden, num_experts=_hint_experts(num_ranks),
                          max_tokens_per_rank=HT_HINT_TOKENS, ll_max_tokens_per_rank=0)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: intranode HT uses no RDMA buffer (internode is not supported)."""
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, {self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}, {self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens})")


# Token count per rank that Config.get_nvl_buffer_size_hint sizes for (BufferConfig's default).
HT_HINT_TOKENS = 4096


def _hidden_from_bytes(hidden_bytes):
    if hidden_bytes <= 0:
        raise ValueError(f"hidden_bytes = {hidden_bytes}, expected > 0")
    hidden = (hidden_bytes + 1) // 2  # BF16 rows; FP8 rows are smaller
    a = _epcomm.HIDDEN_ALIGNMENT
    return (hidden + a - 1) // a * a


def _hint_experts(num_ranks):
    # The expert count changes only small per-expert arrays; size for the most per rank.
    return max(num_ranks, _epcomm.MAX_EXPERTS // num_ranks * num_ranks)


def _bytes_for(num_ranks, **config):
    config.setdefault("max_topk", _epcomm.MAX_TOPK)
    return _epcomm.bytes_for(num_ranks, **config)["total"]


def largest_fitting(size_of, budget, limit):
    """Largest t in [0, limit] with size_of(t) <= budget, for a non-decreasing size_of; 0 when
    even size_of(1) does not fit. How byte budgets become token capacities."""
    if budget <= 0 or limit <= 0 or size_of(1) > budget:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- Events -----------------------------------------------------------------------------------


class EventOverlap:
    """DeepEP's EventOverlap: a CUDA event recorded after a call made with ``async_finish``
    (None otherwise), plus the tensors that must stay alive until it completes."""

    __slots__ = ("event", "extra_tensors")

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes torch's current stream wait for the event."""
        if self.event is not None:
            _torch().cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # DeepEP: leaving a `with` block makes the current stream wait for the event.
        self.current_stream_wait()


# --- Handles ----------------------------------------------------------------------------------


class _Handle:
    """The handle ``dispatch`` returns (DeepEP's is a tuple of tensors; treat it as opaque).
    Wraps one epcomm Handle from the Buffer's pool; the epcomm Handle goes back to the pool when
    this object is garbage-collected, so holding handles (one per layer for the backward) costs
    no allocation per call once the pool is warm."""

    __slots__ = ("ep", "num_tokens", "num_recv", "num_topk", "_is_token_in_rank",
                 "expert_alignment", "num_worst_tokens", "_pool", "__weakref__")

    def __init__(self, pool, ep, num_tokens, num_recv, num_topk, is_token_in_rank,
                 expert_alignment, num_worst_tokens):
        self._pool = pool  # the Buffer's free list at creation (destroy() starts a new one)
        self.ep = ep
        self.num_tokens = num_tokens
        self.num_recv = num_recv  # host row count of recv_x (num_worst_tokens when static)
        self.num_topk = num_topk
        self._is_token_in_rank = is_token_in_rank  # None: the epcomm Handle's, read when asked
        self.expert_alignment = expert_alignment
        self.num_worst_tokens = num_worst_tokens

    @property
    def is_token_in_rank(self):
        """[num_tokens, num_ranks] bool: the layout passed to dispatch, or the epcomm Handle's
        (a result view, made when asked: reading it per call cost two binding calls)."""
        itr = self._is_token_in_rank
        return itr if itr is not None else self.ep.is_token_in_rank

    def __del__(self):
        # Cheaper than weakref.finalize (no registry entry per handle): the epcomm Handle goes
        # back to the pool it came from.
        try:
            self._pool.append(self.ep)
        except AttributeError:  # __init__ did not finish
            pass


class _LlHandle:
    """The handle ``low_latency_dispatch`` returns. ``recv_src_info`` (the [num_local_experts,
    rows] int32 source of each received row) is read from the dispatch's result when asked for:
    most callers never read it, and each view costs a binding call."""

    __slots__ = ("seq", "num_tokens", "num_topk", "num_max_dispatch_tokens_per_rank", "hidden",
                 "num_experts", "_result")

    def __init__(self, seq, num_tokens, num_topk, num_max, hidden, num_experts, result):
        self.seq = seq
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.num_max_dispatch_tokens_per_rank = num_max
        self.hidden = hidden
        self.num_experts = num_experts
        self._result = result

    @property
    def recv_src_info(self):
        return self._result.recv_src_info


# --- Buffer -----------------------------------------------------------------------------------


class Buffer:
    """DeepEP's ``deep_ep.Buffer`` on one node, over epcomm. See the module docstring."""

    num_sms: int = 20
    _num_sms_set = False  # without set_num_sms or a config, HT calls use epcomm's tuned default

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, hidden=None, num_experts=None,
                 max_topk=None, max_tokens_per_rank=None, ll_max_tokens_per_rank=None,
                 timeout_s=None):
        if not allow_nvlink_for_low_latency_mode:
            raise NotImplementedError(
                "allow_nvlink_for_low_latency_mode=False: epcomm's low-latency path runs over "
                "NVLink only (there is no RDMA/NVSHMEM path)")
        if enable_shrink:
            raise NotImplementedError("enable_shrink: epcomm has no rank shrinking (a failed "
                                      "rank makes the buffer unusable; recreate it)")
        if num_nvl_bytes < 0 or num_rdma_bytes < 0:
            raise ValueError(f"num_nvl_bytes = {num_nvl_bytes}, num_rdma_bytes = "
                             f"{num_rdma_bytes}: expected >= 0")
        if num_rdma_bytes > 0 and not low_latency_mode:
            raise NotImplementedError(f"num_rdma_bytes = {num_rdma_bytes} without "
                                      f"low_latency_mode: {_INTERNODE}")
        from ._bootstrap import bootstrap_from_mpi4py, bootstrap_from_torch

        torch = _torch()
        if group is None and comm is not None:
            self._bootstrap = bootstrap_from_mpi4py(comm)
        else:
            self._bootstrap = bootstrap_from_torch(group)
        if self._bootstrap.num_nodes > 1:
            raise NotImplementedError(f"the group spans {self._bootstrap.num_nodes} hosts: "
                                      f"{_INTERNODE}")
        self.rank = self._bootstrap.rank
        self.group_size = self._bootstrap.size
        self.group = group
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._mem_mode = "fabric" if (use_fabric or allow_mnnvl) else "auto"
        self._device = torch.cuda.current_device()
        self._comm = torch.cuda.Stream(device=self._device)
        self._comm_handle = self._comm.cuda_stream
        self._fixed = dict(hidden=hidden, num_experts=num_experts, max_topk=max_topk,
                           max_tokens_per_rank=max_tokens_per_rank,
                           ll_max_tokens_per_rank=ll_max_tokens_per_rank, timeout_s=timeout_s)
        self._buf = None
        # The buffer's shape, read once at creation (the binding's properties cost a call each).
        self._hidden = self._num_experts = None
        self._ll_cap = 0
        self._pool = []  # free epcomm Handles
        self._num_experts_hint = None
        self._ll_seq = 0
        self._ll_pending = None  # what the LL receive hook must finish
        self._ll_combine_buffers = {}
        self._last_ll = self._last_cached = None
        if hidden is not None and num_experts is not None:
            self._ensure(hidden, num_experts)  # collective, as DeepEP's constructor

    # --- static API ---------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SM budget of the HT calls made without a config (DeepEP requires an even count)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"set_num_sms: {new_num_sms!r}, expected a positive even int")
        Buffer.num_sms = new_num_sms
        Buffer._num_sms_set = True

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on torch's current stream."""
        torch = _torch()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Bytes of an epcomm buffer with LL capacity ``num_max_dispatch_tokens_per_rank`` (and no
        HT part) for this shape: what ``num_rdma_bytes`` must be for low_latency_mode."""
        return _bytes_for(num_ranks, hidden=hidden, num_experts=num_experts,
                          max_tokens_per_rank=0,
                          ll_max_tokens_per_rank=num_max_dispatch_tokens_per_rank)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A Config with ``Buffer.num_sms``; one node holds at most epcomm.MAX_RANKS ranks."""
        _check_ranks(num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        _check_ranks(num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    # --- state --------------------------------------------------------------------------------

    def is_available(self) -> bool:
        return self._bootstrap is not None

    def get_num_rdma_ranks(self) -> int:
        return 1

    def get_rdma_rank(self) -> int:
        return 0

    def get_root_rdma_rank(self, global_: bool = False) -> int:
        return 0

    def get_local_device_id(self) -> int:
        return self._device

    def get_comm_stream(self):
        """The stream HT calls (and LL calls with async_finish) run on."""
        return self._comm

    def get_local_buffer_tensor(self, *args, **kwargs):
        raise NotImplementedError("get_local_buffer_tensor: epcomm's symmetric buffer has no raw "
                                  "NVL/RDMA halves; use epcomm.Buffer's scratch region instead")

    def get_next_low_latency_combine_buffer(self, handle):
        """A [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden] BF16
        tensor to write expert outputs into before ``low_latency_combine(..., zero_copy=True)``.
        epcomm's LL combine reads any device memory, so this is an ordinary cached tensor."""
        _check_ll_handle(handle)
        torch = _torch()
        key = (handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        t = self._ll_combine_buffers.get(key)
        if t is None:
            t = torch.empty((handle.num_experts // self.group_size,
                             self.group_size * handle.num_max_dispatch_tokens_per_rank,
                             handle.hidden), dtype=torch.bfloat16,
                            device=handle.recv_src_info.device)
            self._ll_combine_buffers[key] = t
        return t

    def destroy(self) -> None:
        """Collective: frees the epcomm buffer. Results and handles become invalid."""
        if self._buf is not None:
            self._buf.destroy()
        self._buf = None
        self._pool = []
        self._bootstrap = None
        self._last_ll = self._last_cached = None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """A no-op: epcomm's LL region is separate from the HT one and needs no cleaning between
        HT and LL calls. The arguments are checked against the buffer."""
        if self._buf is not None:
            self._check_shape(hidden, num_experts)
            cap = self._ll_cap
            if num_max_dispatch_tokens_per_rank > cap:
                raise ValueError(f"num_max_dispatch_tokens_per_rank = "
                                 f"{num_max_dispatch_tokens_per_rank} > the buffer's LL capacity "
                                 f"{cap}")

    # --- creation -----------------------------------------------------------------------------

    def _check_shape(self, hidden, num_experts):
        if hidden is not None and hidden != self._hidden:
            raise ValueError(f"hidden = {hidden}, but this Buffer was created for hidden = "
                             f"{self._hidden} (one shape per Buffer)")
        if num_experts is not None and num_experts != self._num_experts:
            raise ValueError(f"num_experts = {num_experts}, but this Buffer was created for "
                             f"num_experts = {self._num_experts} (one shape per Buffer)")

    def _ensure(self, hidden, num_experts, ll_tokens=None):
        """The epcomm buffer, created (collectively) on first use with capacities mapped from
        the byte budgets."""
        buf = self._buf
        if buf is not None:
            if hidden != self._hidden or (num_experts is not None and
                                          num_experts != self._num_experts):
                self._check_shape(hidden, num_experts)
            return buf
        if self._bootstrap is None:
            raise _epcomm.BrokenError("[epcomm] deep_ep.Buffer: destroyed; create a new one")
        f = self._fixed
        hidden = f["hidden"] if f["hidden"] is not None else hidden
        num_experts = num_experts if num_experts is not None else (
            f["num_experts"] if f["num_experts"] is not None else self._num_experts_hint)
        if num_experts is None:
            raise ValueError("deep_ep.Buffer: the number of experts is not known yet; pass "
                             "num_tokens_per_expert to dispatch, call get_dispatch_layout "
                             "first, or give Buffer(..., num_experts=)")
        max_topk = f["max_topk"] if f["max_topk"] is not None else _epcomm.MAX_TOPK
        R = self.group_size
        shape = dict(hidden=hidden, num_experts=num_experts, max_topk=max_topk)

        def fits(budget, key, limit):
            other = "ll_max_tokens_per_rank" if key == "max_tokens_per_rank" else \
                "max_tokens_per_rank"
            return largest_fitting(
                lambda t: _epcomm.bytes_for(R, **shape, **{key: t, other: 0})["total"], budget,
                limit)

        ht = f["max_tokens_per_rank"]
        if ht is None:
            ht = fits(self.num_nvl_bytes, "max_tokens_per_rank", _epcomm.MAX_TOKENS_PER_RANK)
        ll = f["ll_max_tokens_per_rank"]
        if ll is None and self.low_latency_mode:
            if ll_tokens is not None:
                need = self.get_low_latency_rdma_size_hint(ll_tokens, hidden, R, num_experts)
                if need > self.num_rdma_bytes:
                    raise ValueError(
                        f"num_rdma_bytes = {self.num_rdma_bytes} is too small for "
                        f"num_max_dispatch_tokens_per_rank = {ll_tokens}: need {need} "
                        f"(Buffer.get_low_latency_rdma_size_hint)")
                ll = ll_tokens
            else:
                ll = fits(self.num_rdma_bytes, "ll_max_tokens_per_rank",
                          _epcomm.MAX_LL_TOKENS_PER_RANK)
        ll = ll or 0
        if ht == 0 and ll == 0:
            raise ValueError(
                f"deep_ep.Buffer: num_nvl_bytes = {self.num_nvl_bytes} and num_rdma_bytes = "
                f"{self.num_rdma_bytes} (low_latency_mode={self.low_latency_mode}) hold no token "
                f"of hidden {hidden}; size them with Config.get_nvl_buffer_size_hint or "
                f"Buffer.get_low_latency_rdma_size_hint")
        from ._epcomm import Buffer as EpBuffer

        buf = EpBuffer(self._bootstrap, device=self._device, max_tokens_per_rank=ht,
                       ll_max_tokens_per_rank=ll, mem_mode=self._mem_mode,
                       timeout_s=f["timeout_s"], framework="torch", **shape)
        self._hidden, self._num_experts = buf.hidden, buf.num_experts
        self._ll_cap = buf.config["ll_max_tokens_per_rank"]
        self._buf = buf
        return buf

    # --- streams ------------------------------------------------------------------------------

    def _enter(self, previous_event, async_finish=False, allocate_on_comm_stream=False):
        """Returns (compute, run): torch's current stream and the stream the call runs on, or
        (None, None) for "the current stream" (see _run_stream).

        DeepEP runs on its comm stream after waiting for previous_event (or the current stream).
        Without previous_event, async_finish and allocate_on_comm_stream that round trip orders
        nothing more than running on the current stream does, so the call runs there: two event
        records and waits less per call (most of the facade's host time). That common case
        makes no stream object at all (torch.cuda.current_stream() builds one per call)."""
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            return None, None
        compute = _torch().cuda.current_stream()
        if previous_event is not None:
            if previous_event.event is not None:
                self._comm.wait_event(previous_event.event)
        else:
            self._comm.wait_stream(compute)
        return compute, self._comm

    def _leave(self, compute, run, async_finish, tensors):
        """DeepEP's ending: with async_finish an event on the comm stream (and the tensors kept
        alive for it), else the current stream waits for the comm stream."""
        if run is compute:  # (None, None) from _enter included
            return EventOverlap()
        if async_finish:
            event = _torch().cuda.Event()
            event.record(run)
            for t in tensors:
                if t is not None:
                    t.record_stream(run)
            return EventOverlap(event, tensors)
        compute.wait_stream(run)
        return EventOverlap()

    # --- HT -----------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [N, R] bool, event). Local (not collective). A repeated expert id in
        a token's row counts once and ids outside [-1, num_experts) are not counted (dispatch
        then fails on them), as epcomm's routing policy says."""
        torch = _torch()
        R = self.group_size
        if num_experts <= 0 or num_experts % R:
            raise ValueError(f"get_dispatch_layout: num_experts = {num_experts}, expected a "
                             f"positive multiple of the {R} ranks")
        if topk_idx.dim() != 2:
            raise ValueError(f"get_dispatch_layout: topk_idx must be [num_tokens, num_topk], got "
                             f"{tuple(topk_idx.shape)}")
        self._num_experts_hint = num_experts
        compute, run = self._enter(previous_event, async_finish, allocate_on_comm_stream)
        with _on(run, compute):
            n = topk_idx.shape[0]
            idx = topk_idx.long()
            # Column 0: "no expert" (-1); column E + 1: out of range. Setting (not adding) makes a
            # repeated id count once.
            col = torch.where((idx >= 0) & (idx < num_experts), idx + 1,
                              torch.where(idx == -1, 0, num_experts + 1))
            hit = torch.zeros((n, num_experts + 2), dtype=torch.bool, device=topk_idx.device)
            hit.scatter_(1, col, True)
            hit = hit[:, 1:num_experts + 1]
            num_tokens_per_expert = hit.sum(0, dtype=torch.int32)
            is_token_in_rank = hit.reshape(n, R, num_experts // R).any(2)
            num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
        event = self._leave(compute, run, async_finish,
                            (topk_idx, num_tokens_per_rank, num_tokens_per_expert,
                             is_token_in_rank))
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

    def _sms(self, config):
        if config is None:
            return Buffer.num_sms if Buffer._num_sms_set else None
        if not isinstance(config, Config):
            raise TypeError(f"config: expected epcomm.deep_ep.Config, got {type(config)}")
        return config.num_sms

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config=None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """DeepEP's intranode dispatch. Returns (recv_x or (recv_x, recv_x_scales),
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event);
        with a handle (cached mode): (recv_x, None, None, None, None, event)."""
        torch = _torch_module  # imported by __init__
        if num_tokens_per_rdma_rank is not None:
            raise NotImplementedError(f"num_tokens_per_rdma_rank: {_INTERNODE}")
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        num_sms = self._sms(config) if config is not None or Buffer._num_sms_set else None
        shape = x.shape
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch: a cached dispatch (handle given) takes no topk_idx or "
                                 "topk_weights")
            if not isinstance(handle, _Handle):
                raise TypeError(f"handle: expected the handle of an epcomm.deep_ep dispatch, got "
                                f"{type(handle)}")
            if shape[0] != handle.num_tokens:
                raise ValueError(f"dispatch: x has {shape[0]} tokens, the handle's dispatch had "
                                 f"{handle.num_tokens}")
            buf = self._buf
            if buf is None or shape[1] != self._hidden:
                buf = self._ensure(shape[1], None)
        else:
            if topk_idx is None and is_token_in_rank is None:
                raise ValueError("dispatch: needs topk_idx or is_token_in_rank (with "
                                 "num_tokens_per_rank and num_tokens_per_expert), or a handle")
            if topk_weights is not None and topk_idx is None:
                raise ValueError("dispatch: topk_weights needs topk_idx")
            buf = self._buf
            if buf is None or shape[1] != self._hidden:
                # A num_tokens_per_expert of another expert count than the buffer's: the core
                # says so (InvalidArgument naming the buffer's num_experts).
                buf = self._ensure(shape[1], None if num_tokens_per_expert is None else
                                   num_tokens_per_expert.numel())
        if num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens = {num_worst_tokens}, expected >= 0")

        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            compute = run = None  # the current stream (_enter)
            s = _current_stream()
        else:
            compute, run = self._enter(previous_event, async_finish, allocate_on_comm_stream)
            s = run.cuda_stream
        # DeepEP returns fresh tensors; epcomm's views live until the next HT dispatch.
        alloc_stream = run if allocate_on_comm_stream else compute
        if handle is not None:
            # Cached: the row count is known before the call, so the library copies the rows
            # into the fresh tensors itself (DispatchArgs::recv_x_out / recv_scales_out), in the
            # dispatch call: no result views, slices or torch copies on the host.
            n = handle.num_recv
            if alloc_stream is None:  # the current stream: no stream context (about 0.4 us)
                recv_x = x.new_empty((n, shape[1]))
                recv_scales = None if x_scales is None else x_scales.new_empty(
                    (n, x_scales.shape[1]), dtype=torch.float32)
            else:
                recv_x, recv_scales, _, _ = _outputs(x, x_scales, None, n, alloc_stream, compute,
                                                     run)
            # FP8 rows as bytes: the binding takes any dtype here, and a torch without DLPack
            # float8 still exports uint8.
            out = recv_x.view(torch.uint8) if recv_x.element_size() == 1 else recv_x
            buf.dispatch(x, handle.ep, x_scales=x_scales, expert_alignment=handle.expert_alignment,
                         num_worst_tokens=handle.num_worst_tokens, num_sms=num_sms, stream=s,
                         recv_x_out=out, recv_scales_out=recv_scales)
            event = EventOverlap() if run is None else self._leave(
                compute, run, async_finish, (x, x_scales, recv_x, recv_scales))
            return ((recv_x, recv_scales) if x_scales is not None else recv_x), None, None, \
                None, None, event
        pool = self._pool
        ep = pool.pop() if pool else buf.create_handle()
        if num_worst_tokens > 0:
            # Static shapes: the row count is known before the call, so the fresh outputs are
            # allocated first and the library copies the received rows (and top-k ids and
            # weights, padding rows included) into them inside the dispatch, in one kernel launch
            # (DispatchArgs::recv_*_out): no result views, slices or torch copies. Without
            # topk_weights epcomm's received weights are 0 (ops.hpp), DeepEP's too.
            n = num_worst_tokens
            recv_x, recv_scales, recv_idx, recv_w = _outputs(x, x_scales, topk_idx, n,
                                                             alloc_stream, compute, run)
            # FP8 rows as bytes: the binding takes any dtype here, and a torch without DLPack
            # float8 still exports uint8.
            out = recv_x.view(torch.uint8) if recv_x.element_size() == 1 else recv_x
            try:
                buf.dispatch(x, ep, topk_idx=topk_idx, topk_weights=topk_weights,
                             x_scales=x_scales, expert_alignment=expert_alignment,
                             num_tokens_per_rank=num_tokens_per_rank,
                             is_token_in_rank=is_token_in_rank,
                             num_tokens_per_expert=num_tokens_per_expert, num_worst_tokens=n,
                             num_sms=num_sms, stream=s, recv_x_out=out,
                             recv_scales_out=recv_scales, recv_topk_idx_out=recv_idx,
                             recv_topk_weights_out=recv_w)
            except BaseException:
                pool.append(ep)
                raise
            event = EventOverlap() if run is None else self._leave(
                compute, run, async_finish,
                (x, x_scales, topk_idx, topk_weights, recv_x, recv_scales, recv_idx, recv_w))
            new_handle = _Handle(pool, ep, shape[0], n,
                                 topk_idx.shape[1] if topk_idx is not None else 0,
                                 is_token_in_rank, expert_alignment, n)
            # DeepEP: no host counts in the static-shape mode.
            return ((recv_x, recv_scales) if x_scales is not None else recv_x), recv_idx, \
                recv_w, [], new_handle, event
        try:
            res = buf.dispatch(x, ep, topk_idx=topk_idx, topk_weights=topk_weights,
                               x_scales=x_scales, expert_alignment=expert_alignment,
                               exact_count=True, num_tokens_per_rank=num_tokens_per_rank,
                               is_token_in_rank=is_token_in_rank,
                               num_tokens_per_expert=num_tokens_per_expert, num_sms=num_sms,
                               stream=s)
        except BaseException:
            pool.append(ep)
            raise
        # Exact counts: the row count is known only after the call, so the rows are copied out
        # of the result views here.
        n = res.num_recv_tokens_host
        recv_x, recv_scales, recv_idx, recv_w = _outputs(x, x_scales, topk_idx, n, alloc_stream,
                                                         compute, run)
        topk_out = topk_idx is not None
        with _on(run, compute):
            # The binding's views have exactly n rows (exact_count); other cores may give more.
            # A slice costs a microsecond: only when needed.
            view = _rows(res.recv_x, n)
            if recv_x.element_size() == 1:  # FP8: copy the bytes (a framework without DLPack
                recv_x.view(torch.uint8).copy_(view.view(torch.uint8))  # float8 gives uint8)
            else:
                recv_x.copy_(view)
            if recv_scales is not None:
                recv_scales.copy_(_rows(res.recv_x_scales, n))
            if topk_out:
                recv_idx.copy_(_rows(res.recv_topk_idx, n))
                if topk_weights is not None:
                    recv_w.copy_(_rows(res.recv_topk_weights, n))
                else:  # DeepEP sends no weights then; epcomm's are 0 (documented in ops.hpp)
                    recv_w.zero_()
        event = self._leave(compute, run, async_finish,
                            (x, x_scales, topk_idx, topk_weights, recv_x, recv_scales, recv_idx,
                             recv_w))
        out_x = (recv_x, recv_scales) if x_scales is not None else recv_x
        counts = res.num_recv_tokens_per_expert_list  # a new list on every read
        if counts is None:
            counts = res.num_recv_tokens_per_expert.tolist()
        elif type(counts) is not list:
            counts = list(counts)
        new_handle = _Handle(pool, ep, x.shape[0], n, topk_idx.shape[1] if topk_out else 0,
                             is_token_in_rank, expert_alignment, 0)
        return out_x, recv_idx, recv_w if topk_out else None, counts, new_handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's intranode combine: the sum, without weights, of the rows of ``x`` that came
        from each token (plus bias). ``topk_weights`` [rows of x, num_topk] are the received
        weights, reduced to combined_topk_weights [num_tokens, num_topk]. Returns
        (combined_x, combined_topk_weights or None, event)."""
        if type(handle) is not _Handle and not isinstance(handle, _Handle):
            raise TypeError(f"handle: expected the handle of an epcomm.deep_ep dispatch, got "
                            f"{type(handle)}")
        shape = x.shape  # one torch.Size per call, not one per use
        if len(shape) != 2 or shape[0] != handle.num_recv:
            raise ValueError(f"combine: x must be [{handle.num_recv}, hidden] (the rows the "
                             f"handle's dispatch received), got {tuple(shape)}")
        hidden = shape[1]
        buf = self._buf
        if buf is None or hidden != self._hidden:
            buf = self._ensure(hidden, None)
        num_sms = self._sms(config) if config is not None or Buffer._num_sms_set else None
        if bias is not None and isinstance(bias, tuple):  # DeepEP takes up to two bias tensors
            parts = [b for b in bias if b is not None]
            bias = None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            # The common case: everything on the current stream (see _enter).
            out = x.new_empty((handle.num_tokens, hidden))
            if topk_weights is None and bias is None:
                buf.combine(x, handle.ep, out, num_sms=num_sms, stream=_current_stream())
                return out, None, EventOverlap()
            combined_w = None if topk_weights is None else x.new_empty(
                (handle.num_tokens, topk_weights.shape[1]), dtype=_torch_module.float32)
            buf.combine(x, handle.ep, out, bias=bias, recv_topk_weights=topk_weights,
                        combined_topk_weights=combined_w, num_sms=num_sms,
                        stream=_current_stream())
            return out, combined_w, EventOverlap()
        torch = _torch()
        compute, run = self._enter(previous_event, async_finish, allocate_on_comm_stream)
        alloc_stream = run if allocate_on_comm_stream else compute
        with _on(alloc_stream, compute):
            out = x.new_empty((handle.num_tokens, hidden))
            combined_w = None
            if topk_weights is not None:
                combined_w = x.new_empty((handle.num_tokens, topk_weights.shape[1]),
                                         dtype=torch.float32)
        if alloc_stream is not run:
            for t in (out, combined_w):
                if t is not None:
                    t.record_stream(run)
        s = run.cuda_stream
        if topk_weights is None and bias is None:
            buf.combine(x, handle.ep, out, num_sms=num_sms, stream=s)
        else:
            buf.combine(x, handle.ep, out, bias=bias, recv_topk_weights=topk_weights,
                        combined_topk_weights=combined_w, num_sms=num_sms, stream=s)
        event = self._leave(compute, run, async_finish, (x, topk_weights, bias, out, combined_w))
        return out, combined_w, event

    # --- LL -----------------------------------------------------------------------------------

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Returns (recv_x or (recv_x, recv_x_scales), recv_count, handle, event, hook).
        recv_x [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]; the
        valid rows of expert e are the first recv_count[e]. Views, valid until the next
        low_latency_dispatch. With return_recv_hook the data has arrived only after hook()."""
        if round_scale or use_ue8m0:
            raise NotImplementedError("round_scale / use_ue8m0: epcomm's LL FP8 scales are "
                                      "float32 amax/448 per 128 columns, not rounded to powers "
                                      "of two or packed as UE8M0")
        if dispatch_wait_recv_cost_stats is not None:
            raise NotImplementedError("dispatch_wait_recv_cost_stats: epcomm records no per-rank "
                                      "wait times")
        if not self.low_latency_mode:
            raise ValueError("low_latency_dispatch: this Buffer was created with "
                             "low_latency_mode=False")
        if self._ll_pending is not None:
            raise ValueError("low_latency_dispatch: call the previous call's recv hook first")
        shape = x.shape
        buf = self._buf
        if buf is None or shape[1] != self._hidden or num_experts != self._num_experts:
            buf = self._ensure(shape[1], num_experts, ll_tokens=num_max_dispatch_tokens_per_rank)
        cap = self._ll_cap
        if num_max_dispatch_tokens_per_rank > cap:
            raise ValueError(f"num_max_dispatch_tokens_per_rank = "
                             f"{num_max_dispatch_tokens_per_rank} > the buffer's LL capacity {cap} "
                             f"(fixed by the first LL call or num_rdma_bytes)")
        if shape[0] > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"low_latency_dispatch: {shape[0]} tokens > "
                             f"num_max_dispatch_tokens_per_rank = "
                             f"{num_max_dispatch_tokens_per_rank}")
        # The stream object is needed only to copy the FP8 scales later, in the recv hook.
        if async_finish or (use_fp8 and return_recv_hook):
            stream, compute = self._ll_stream(async_finish, True)
        else:
            stream, compute = _current_stream(), None
        phase = "send" if return_recv_hook else "both"
        r = buf.low_latency_dispatch(x, topk_idx, use_fp8=use_fp8, stream=stream, phase=phase,
                                     cumulative_recv_counts=cumulative_local_expert_recv_stats)
        self._last_ll = r  # its views stay alive, so the next call's are reused (view cache)
        rows = self.group_size * num_max_dispatch_tokens_per_rank
        recv_x = r.recv_x  # valid rows are packed at the front of each expert
        # A new tensor object per call, as DeepEP's (the binding hands out the same cached view
        # object); detach() makes one for a fraction of a slice's cost.
        recv_x = recv_x[:, :rows] if recv_x.shape[1] != rows else recv_x.detach()
        scales = None
        if use_fp8:
            torch = _torch_module
            if recv_x.dtype == torch.uint8:  # a torch without DLPack float8
                recv_x = recv_x.view(torch.float8_e4m3fn)
            # DeepEP's scales are column-major in the last two dimensions (TMA-friendly).
            src = r.recv_x_scales[:, :rows]
            scales = x.new_empty((src.shape[0], src.shape[2], src.shape[1]),
                                 dtype=torch.float32).transpose(1, 2)
        self._ll_seq += 1
        handle = _LlHandle(self._ll_seq, shape[0], topk_idx.shape[1],
                           num_max_dispatch_tokens_per_rank, shape[1], num_experts, r)
        hook = None
        if return_recv_hook:
            def hook():
                if self._ll_pending is not hook:
                    return  # already called
                self._ll_pending = None
                # The receiving half adds to the cumulative counts (C++ LlDispatchArgs).
                buf.low_latency_dispatch(
                    None, None, use_fp8=use_fp8, stream=stream, phase="recv",
                    cumulative_recv_counts=cumulative_local_expert_recv_stats)
                if scales is not None:
                    with _on(self._comm if async_finish else compute, None):
                        scales.copy_(src)

            self._ll_pending = hook
        elif scales is not None:
            with _on(self._comm if async_finish else compute, None):
                scales.copy_(src)
        event = self._ll_leave(compute, async_finish, (x, topk_idx)) if async_finish else \
            EventOverlap()
        out_x = (recv_x, scales) if use_fp8 else recv_x
        return out_x, r.num_recv_tokens_per_expert, handle, event, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        """Returns (combined_x [num_tokens, hidden] BF16, event, hook): per token the sum of
        topk_weights[t, k] * the expert output of its k-th expert (zeros for a token routed
        nowhere). zero_copy is accepted: epcomm reads x from any device memory."""
        torch = _torch_module
        if use_logfmt:
            raise NotImplementedError("use_logfmt: epcomm's LL combine sends BF16 partials")
        if combine_wait_recv_cost_stats is not None:
            raise NotImplementedError("combine_wait_recv_cost_stats: epcomm records no per-rank "
                                      "wait times")
        if type(handle) is not _LlHandle:
            _check_ll_handle(handle)
        if handle.seq != self._ll_seq:
            raise ValueError("low_latency_combine: the handle is not the last "
                             "low_latency_dispatch's (epcomm alternates LL dispatch and combine)")
        if self._ll_pending is not None:
            raise ValueError("low_latency_combine: call the dispatch's recv hook first")
        shape = topk_idx.shape
        if len(shape) != 2 or shape[0] != handle.num_tokens or shape[1] != handle.num_topk:
            raise ValueError(f"topk_idx: shape {tuple(shape)}, the dispatch had "
                             f"({handle.num_tokens}, {handle.num_topk})")
        buf = self._buf
        full = self._ll_cap * self.group_size
        xs = x.shape
        if xs[1] != full:
            # epcomm reads rows with the buffer's per-expert stride: stage a narrower x.
            key = ("stage", xs[0], xs[2])
            stage = self._ll_combine_buffers.get(key)
            if stage is None:
                stage = torch.empty((xs[0], full, xs[2]), dtype=x.dtype, device=x.device)
                self._ll_combine_buffers[key] = stage
            stage[:, :xs[1]].copy_(x)
            x = stage
        if async_finish:
            stream, compute = self._ll_stream(True)
        else:
            stream, compute = _current_stream(), None
        if out is None:
            out = x.new_empty((handle.num_tokens, handle.hidden), dtype=torch.bfloat16)
        phase = "send" if return_recv_hook else "both"
        buf.low_latency_combine(x, out, topk_weights=topk_weights, stream=stream, phase=phase)
        hook = None
        if return_recv_hook:
            def hook():
                if self._ll_pending is not hook:
                    return
                self._ll_pending = None
                buf.low_latency_combine(None, out, stream=stream, phase="recv")

            self._ll_pending = hook
        event = self._ll_leave(compute, True, (x, topk_idx, topk_weights, out)) if async_finish \
            else EventOverlap()
        return out, event, hook

    def _ll_stream(self, async_finish, want_compute=False):
        """(handle, compute): LL calls run on torch's current stream (capturable in a CUDA graph
        as it is), or on the comm stream with async_finish. compute (the current stream object)
        is None unless async_finish or want_compute: making it costs a torch call."""
        if async_finish:
            compute = _torch().cuda.current_stream()
            self._comm.wait_stream(compute)
            return self._comm_handle, compute
        if want_compute:
            compute = _torch().cuda.current_stream()
            return compute.cuda_stream, compute
        return _current_stream(), None

    def _ll_leave(self, compute, async_finish, tensors):
        if not async_finish:
            return EventOverlap()
        return self._leave(compute, self._comm, True, tensors)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NOTHING = _Nothing()


def _on(stream, current):
    """torch.cuda.stream(stream), or nothing when it is the current stream already (the context
    manager costs microseconds per call). None stands for the current stream."""
    return _NOTHING if stream is current or stream is None else _torch().cuda.stream(stream)


def _new_outputs(x, x_scales, topk_idx, n):
    """Fresh dispatch outputs for n received rows, on the current stream: (recv_x,
    recv_scales, recv_topk_idx, recv_topk_weights), None where the call has none. One
    allocation each: carving one allocation into typed tensors was measured slower on the CPU
    and shares one storage among outputs (docs/perf-notes.md "Python overhead", third round)."""
    torch = _torch_module
    recv_x = x.new_empty((n, x.shape[1]))
    recv_scales = None if x_scales is None else x_scales.new_empty((n, x_scales.shape[1]),
                                                                   dtype=torch.float32)
    if topk_idx is None:
        return recv_x, recv_scales, None, None
    k = topk_idx.shape[1]
    return recv_x, recv_scales, topk_idx.new_empty((n, k)), x.new_empty((n, k),
                                                                        dtype=torch.float32)


def _outputs(x, x_scales, topk_idx, n, alloc_stream, compute, run):
    """_new_outputs on alloc_stream (None: the current stream, with no stream context, which
    costs about 0.4 us), recorded on run when that is another stream."""
    if alloc_stream is None:
        return _new_outputs(x, x_scales, topk_idx, n)
    with _on(alloc_stream, compute):
        outs = _new_outputs(x, x_scales, topk_idx, n)
    if alloc_stream is not run:
        for t in outs:
            if t is not None:
                t.record_stream(run)
    return outs


def _rows(t, n):
    """The first n rows of t (t itself when it has n)."""
    return t if t.shape[0] == n else t[:n]


def _check_ranks(num_ranks):
    if not isinstance(num_ranks, int) or not 1 <= num_ranks <= _epcomm.MAX_RANKS:
        raise ValueError(f"num_ranks = {num_ranks!r}: epcomm.deep_ep runs on one NVLink domain of "
                         f"1..{_epcomm.MAX_RANKS} ranks ({_INTERNODE})")


def _check_ll_handle(handle):
    if not isinstance(handle, _LlHandle):
        raise TypeError(f"handle: expected the handle of an epcomm.deep_ep low_latency_dispatch, "
                        f"got {type(handle)}")


__all__ = ["Buffer", "Config", "EventOverlap", "InvalidArgument", "UnsupportedError",
           "largest_fitting"]
