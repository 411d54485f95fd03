# SPDX-License-Identifier: Apache-2.0
"""A CPU stand-in for epcomm's core Buffer, to test the pure-Python layers (epcomm.deep_ep,
epcomm.autograd, the example MoE layer) on a machine without a GPU.

``install()`` replaces ``epcomm._epcomm.Buffer``, ``epcomm.bytes_for`` and the torch bootstrap
with objects that implement the documented semantics of include/epcomm/ops.hpp (routing policy,
rank-major HT rows, local top-k ids, num_worst_tokens padding, combined weights, expert-major LL
rows, weights at LL combine) with torch CPU ops, exchanging data through torch.distributed
(gloo). It also makes the torch.cuda calls the facade uses (streams, events, record_stream)
no-ops. Views it returns past the valid rows are poisoned, so a facade that reads them fails.

It checks the Python plumbing (argument mapping, tuple shapes, handles, copies, autograd); the
GPU tests check the real library.
"""
import contextlib

import torch
import torch.distributed as dist

POISON = 1.0e4


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _dedup(idx):
    out = idx.clone()
    for j in range(1, idx.shape[-1]):
        rep = (idx[:, j:j + 1] == idx[:, :j]).any(-1) & (idx[:, j] >= 0)
        out[:, j][rep] = -1
    return out


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeHandle:
    def __init__(self):
        self.num_tokens = -1
        self.recv = None          # [(src rank, src token)] of the received rows, in order
        self.num_topk = 0
        self.is_token_in_rank = None


class FakeBuffer:
    def __init__(self, bootstrap, device=None, hidden=7168, num_experts=256, max_topk=8,
                 max_tokens_per_rank=4096, ll_max_tokens_per_rank=0, mem_mode="auto",
                 timeout_s=None, framework="auto", **_):
        self.rank, self.num_ranks = bootstrap.rank, bootstrap.size
        self.hidden, self.num_experts, self.max_topk = hidden, num_experts, max_topk
        self.num_local_experts = num_experts // self.num_ranks
        self.config = dict(hidden=hidden, num_experts=num_experts, max_topk=max_topk,
                           max_tokens_per_rank=max_tokens_per_rank,
                           ll_max_tokens_per_rank=ll_max_tokens_per_rank,
                           num_ranks=self.num_ranks)
        self.capacity = self.num_ranks * max_tokens_per_rank
        self._ll = None
        self.destroyed = False

    def destroy(self):
        self.destroyed = True

    def create_handle(self):
        return FakeHandle()

    # --- HT -----------------------------------------------------------------------------------
    def dispatch(self, x, handle, *, topk_idx=None, topk_weights=None, x_scales=None,
                 expert_alignment=1, exact_count=False, num_tokens_per_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, num_worst_tokens=0,
                 num_sms=None, stream=None, recv_x_out=None, recv_scales_out=None,
                 recv_topk_idx_out=None, recv_topk_weights_out=None, **_):
        R, L, me = self.num_ranks, self.num_local_experts, self.rank
        assert self.capacity > 0, "HT disabled (max_tokens_per_rank = 0)"
        assert x.shape[1] == self.hidden
        n = x.shape[0]
        cached = topk_idx is None and is_token_in_rank is None
        if cached:
            assert handle.num_tokens == n, "cached dispatch: token count differs"
            assert expert_alignment == handle.alignment
        else:
            if topk_idx is not None:
                clean = _dedup(topk_idx.long())
                assert bool(((clean >= -1) & (clean < self.num_experts)).all()), "bad id"
                itr = torch.stack([((clean >= r * L) & (clean < (r + 1) * L)).any(-1)
                                   for r in range(R)], dim=1) if n else \
                    torch.zeros(0, R, dtype=torch.bool)
                if is_token_in_rank is not None:
                    assert torch.equal(itr, is_token_in_rank), "layout disagrees with top-k"
            else:
                clean, itr = None, is_token_in_rank.clone()
            handle.num_tokens, handle.is_token_in_rank = n, itr
            handle.clean = clean
            handle.num_topk = 0 if topk_idx is None else topk_idx.shape[1]
            handle.alignment = expert_alignment
            handle.idx_dtype = None if topk_idx is None else topk_idx.dtype
        w = None if (cached or topk_weights is None) else topk_weights.float()
        mine = dict(x=x.view(torch.uint8) if x.element_size() == 1 else x,
                    fp8=x.element_size() == 1, scales=x_scales, itr=handle.is_token_in_rank,
                    clean=None if cached else handle.clean, w=w)
        allr = _gather(mine)
        recv = [(s, t) for s in range(R) for t in range(allr[s]["itr"].shape[0])
                if allr[s]["itr"][t, me]]
        handle.recv = recv
        rows = len(recv)
        hidden = self.hidden
        cap = num_worst_tokens if num_worst_tokens > 0 else self.capacity
        assert rows <= cap, "more rows than the static shape"
        fill = 0 if num_worst_tokens > 0 else POISON
        if x.element_size() == 1:
            rx = torch.full((cap, hidden), 0 if num_worst_tokens else 0x7e, dtype=torch.uint8)
            for i, (s, t) in enumerate(recv):
                rx[i] = allr[s]["x"][t]
            rx = rx.view(torch.float8_e4m3fn)
            rs = torch.full((cap, hidden // 128), float(fill))
            for i, (s, t) in enumerate(recv):
                rs[i] = allr[s]["scales"][t]
        else:
            rx = torch.full((cap, hidden), float(fill), dtype=x.dtype)
            for i, (s, t) in enumerate(recv):
                rx[i] = allr[s]["x"][t]
            rs = None
        ridx = rw = None
        counts = torch.zeros(L, dtype=torch.int32)
        if not cached:
            k = handle.num_topk
            if k:
                ridx = torch.full((cap, k), -1 if num_worst_tokens else 7777,
                                  dtype=handle.idx_dtype)
                rw = torch.full((cap, k), float(fill))
                for i, (s, t) in enumerate(recv):
                    loc = allr[s]["clean"][t] - me * L
                    loc = torch.where((loc >= 0) & (loc < L), loc, torch.full_like(loc, -1))
                    ridx[i] = loc
                    ws = allr[s]["w"]
                    rw[i] = torch.where(loc >= 0, ws[t], 0.0) if ws is not None else 0.0
                for e in range(L):
                    c = int((ridx[:rows] == e).any(-1).sum())
                    counts[e] = (c + expert_alignment - 1) // expert_alignment * expert_alignment
            handle.counts = counts
        else:
            counts = handle.counts
        # DispatchArgs::recv_x_out / recv_scales_out: the received rows (num_worst_tokens rows
        # when set) are copied there too; a caller buffer with fewer rows would be overrun.
        copied = num_worst_tokens if num_worst_tokens > 0 else rows
        if recv_x_out is not None:
            assert recv_x_out.dim() == 2 and recv_x_out.shape[0] >= copied, "recv_x_out too small"
            src = rx.view(torch.uint8) if rx.element_size() == 1 else rx
            assert recv_x_out.element_size() == src.element_size(), "recv_x_out: row bytes"
            recv_x_out[:copied].copy_(src[:copied].view(recv_x_out.dtype))
        if recv_scales_out is not None:
            assert rs is not None, "recv_scales_out without FP8 x"
            assert recv_scales_out.dtype == torch.float32 and recv_scales_out.shape[0] >= copied
            recv_scales_out[:copied].copy_(rs[:copied])
        # DispatchArgs::recv_topk_idx_out / recv_topk_weights_out: likewise, top-k dispatches only.
        for name, out, src in (("recv_topk_idx_out", recv_topk_idx_out, ridx),
                               ("recv_topk_weights_out", recv_topk_weights_out, rw)):
            if out is not None:
                assert not cached and src is not None, f"{name} without topk_idx"
                assert out.dtype == src.dtype and out.shape[1] == src.shape[1], f"{name}: dtype/k"
                assert out.shape[0] >= copied, f"{name} too small"
                out[:copied].copy_(src[:copied])
        return _Obj(recv_x=rx, recv_x_scales=rs, recv_topk_idx=ridx, recv_topk_weights=rw,
                    num_recv_tokens_host=rows if exact_count else None,
                    num_recv_tokens_per_expert=counts.clone(),
                    num_recv_tokens_per_expert_list=counts.tolist() if exact_count else None,
                    handle=_Obj(is_token_in_rank=handle.is_token_in_rank), capacity=cap)

    def combine(self, x, handle, out=None, *, bias=None, recv_topk_weights=None,
                combined_topk_weights=None, scale_weights=None, topk_weights=None,
                num_sms=None, stream=None, **_):
        assert scale_weights is None and topk_weights is None, "the facade never scales"
        me = self.rank
        rows = len(handle.recv)
        mine = dict(recv=handle.recv, x=x[:rows].float(),
                    w=None if recv_topk_weights is None else recv_topk_weights[:rows].float())
        allr = _gather(mine)
        acc = torch.zeros(handle.num_tokens, self.hidden)
        accw = None if recv_topk_weights is None else \
            torch.zeros(handle.num_tokens, recv_topk_weights.shape[1])
        for r in allr:
            for i, (s, t) in enumerate(r["recv"]):
                if s == me:
                    acc[t] += r["x"][i]
                    if accw is not None:
                        accw[t] += r["w"][i]
        if bias is not None:
            acc += bias.float()
        out.copy_(acc.to(out.dtype))
        if accw is not None:
            combined_topk_weights.copy_(accw)
            return out, combined_topk_weights
        return out

    # --- LL -----------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, topk_weights=None, *, use_fp8=False,
                             num_sms=None, stream=None, phase="both",
                             cumulative_recv_counts=None):
        R, L, me = self.num_ranks, self.num_local_experts, self.rank
        cap = self.config["ll_max_tokens_per_rank"]
        rows = R * cap
        if phase in ("send", "both"):
            assert self._ll is None or self._ll.get("stage") == "combined", \
                "LL dispatch and combine must alternate"
            assert x.shape[0] <= cap and x.shape[1] == self.hidden
            self._ll = dict(stage="sent", x=x.clone(), idx=_dedup(topk_idx.long()),
                            use_fp8=use_fp8)
            self._out = _Obj(
                recv_x=torch.zeros((L, rows, self.hidden),
                                   dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16),
                recv_x_scales=torch.full((L, rows, self.hidden // 128), POISON)
                if use_fp8 else None,
                num_recv_tokens_per_expert=torch.zeros(L, dtype=torch.int32),
                recv_src_info=torch.full((L, rows), -1, dtype=torch.int32), rows_per_expert=rows)
        if phase in ("recv", "both"):
            st = self._ll
            assert st["stage"] == "sent"
            allr = _gather(dict(x=st["x"], idx=st["idx"]))
            o = self._out
            for e in range(L):
                ge = me * L + e
                n = 0
                for s in range(R):
                    for t in range(allr[s]["x"].shape[0]):
                        if (allr[s]["idx"][t] == ge).any():
                            row = allr[s]["x"][t].float()
                            if st["use_fp8"]:
                                blk = row.view(-1, 128)
                                sc = blk.abs().amax(-1).clamp(min=1e-10) / 448.0
                                o.recv_x[e, n] = (blk / sc[:, None]).view(-1).to(
                                    torch.float8_e4m3fn)
                                o.recv_x_scales[e, n] = sc
                            else:
                                o.recv_x[e, n] = allr[s]["x"][t]
                            o.recv_src_info[e, n] = s * cap + t
                            n += 1
                o.num_recv_tokens_per_expert[e] = n
            # As in C++: the counts of the call that runs the receiving half.
            if cumulative_recv_counts is not None:
                cumulative_recv_counts += o.num_recv_tokens_per_expert
            st["stage"] = "dispatched"
            st["num_tokens"] = st["x"].shape[0]
        return self._out

    def low_latency_combine(self, x, out=None, *, topk_weights=None, num_sms=None, stream=None,
                            phase="both"):
        R, L, me = self.num_ranks, self.num_local_experts, self.rank
        st = self._ll
        cap = self.config["ll_max_tokens_per_rank"]
        if phase in ("send", "both"):
            assert st is not None and st["stage"] == "dispatched"
            assert x.shape[0] == L and x.shape[1] == R * cap, "x: [L, R * capacity, hidden]"
            o = self._out
            rows = {}
            for e in range(L):
                for i in range(int(o.num_recv_tokens_per_expert[e])):
                    rows[(me * L + e, int(o.recv_src_info[e, i]))] = x[e, i].float()
            st["rows"] = rows
            st["w"] = topk_weights
            st["stage"] = "combine_sent"
        if phase in ("recv", "both"):
            assert st["stage"] == "combine_sent"
            allr = _gather(st["rows"])
            merged = {}
            for r in allr:
                merged.update(r)
            w = st["w"]
            assert w is not None, "the facade gives the weights at combine"
            acc = torch.zeros(st["num_tokens"], self.hidden)
            for t in range(st["num_tokens"]):
                for k in range(st["idx"].shape[1]):
                    e = int(st["idx"][t, k])
                    if e >= 0:
                        acc[t] += float(w[t, k]) * merged[(e, me * cap + t)]
            out.copy_(acc.to(out.dtype))
            st["stage"] = "combined"
        return out


def fake_bytes_for(num_ranks, hidden=7168, num_experts=256, max_topk=8, max_tokens_per_rank=4096,
                   ll_max_tokens_per_rank=0, **_):
    ht = num_ranks * max_tokens_per_rank * (hidden * 4 + max_topk * 12 + 16)
    ll = num_ranks * ll_max_tokens_per_rank * (num_experts // num_ranks) * (hidden * 2 + 80)
    return dict(total=4096 + ht + ll, control=4096, ht=ht, ll=ll, scratch=0)


class _FakeStream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


class _FakeEvent:
    def record(self, stream=None):
        pass


def install():
    import epcomm
    import epcomm._bootstrap
    from epcomm import _epcomm

    _epcomm.Buffer = FakeBuffer
    _epcomm.bytes_for = fake_bytes_for
    epcomm.bytes_for = fake_bytes_for

    def fake_bootstrap(group=None, device=None):
        return _Obj(rank=dist.get_rank(), size=dist.get_world_size(), num_nodes=1)

    epcomm._bootstrap.bootstrap_from_torch = fake_bootstrap
    stream = _FakeStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.Stream = lambda device=None, **kw: _FakeStream()
    torch.cuda.Event = lambda *a, **kw: _FakeEvent()
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.set_device = lambda device: None
    torch.cuda.device_count = lambda: 1
    torch.Tensor.record_stream = lambda self, s: None
