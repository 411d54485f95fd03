# SPDX-License-Identifier: Apache-2.0
"""The Python-side host time of epcomm.deep_ep, without a GPU: a no-op core.

``NullBuffer`` has the core ``epcomm._epcomm.Buffer``'s interface (the part the facade calls) and
returns preallocated CPU torch tensors at once: no routing, no data movement, no collective. With
it installed (``install()``, which also makes the torch.cuda calls the facade makes no-ops, as
fake_core.py does), timing a facade call times the facade's own Python work: argument checks,
stream/event handling, torch.empty and copy_ calls, tuple building.

    python tests/python/null_core.py [--iters N] [--repeat R] [--json]

prints the best-of-R mean host time (thread CPU time) per call of each deep_ep path, and the
binding's per-tensor costs. A CPU number is not the GPU number: torch ops on CPU tensors cost a little less host time than CUDA launches, the torch.cuda
stream/event calls cost nothing here, and the core call (C++ on the GPU) is left out. It tells
what the Python layer costs and whether a change made it cheaper; ``python -m epcomm.bench`` on a
GPU stays the authority. Shapes are small (hidden 128, 16 tokens) so that the CPU copies the
facade makes cost their dispatch overhead, not a memcpy of real data.
"""
import argparse
import contextlib
import json
import sys
import time

import torch

# The same no-op streams and events, and the same buffer sizes, as the CPU stand-in core.
from fake_core import _FakeEvent, _FakeStream, fake_bytes_for


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class NullHandle:
    is_token_in_rank = None


class NullBuffer:
    """The core Buffer's interface, doing nothing: every result is a preallocated tensor."""

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
        cap = self.num_ranks * max_tokens_per_rank
        L = self.num_local_experts
        self._ht = {}  # (dtype, topk dtype) -> result
        self._cap = cap
        self._itr = torch.ones((max_tokens_per_rank, self.num_ranks), dtype=torch.bool)
        ll_rows = self.num_ranks * ll_max_tokens_per_rank
        self._ll = {}
        self._ll_shape = (L, ll_rows)
        self._ll_num_tokens = 0
        self.destroyed = False

    def destroy(self):
        self.destroyed = True

    def create_handle(self):
        h = NullHandle()
        h.is_token_in_rank = self._itr  # what the facade's handle reads when asked
        return h

    def _ht_result(self, x, topk_idx, exact_count, num_tokens):
        key = (x.dtype, None if topk_idx is None else (topk_idx.dtype, topk_idx.shape[1]))
        r = self._ht.get(key)
        if r is None:
            cap, h = self._cap, self.hidden
            k = 0 if topk_idx is None else topk_idx.shape[1]
            L = self.num_local_experts
            r = _Obj(recv_x=torch.zeros((cap, h), dtype=x.dtype),
                     recv_x_scales=torch.zeros((cap, h // 128)),
                     recv_topk_idx=None if topk_idx is None else
                     torch.zeros((cap, k), dtype=topk_idx.dtype),
                     recv_topk_weights=None if topk_idx is None else torch.zeros((cap, k)),
                     num_recv_tokens_per_expert=torch.zeros(L, dtype=torch.int32),
                     num_recv_tokens_per_expert_list=[0] * L,
                     handle=_Obj(is_token_in_rank=self._itr[:num_tokens]), capacity=cap)
            self._ht[key] = r
        r.num_recv_tokens_host = num_tokens if exact_count else None
        return r

    def dispatch(self, x, handle, *, topk_idx=None, topk_weights=None, x_scales=None,
                 expert_alignment=1, exact_count=False, num_tokens_per_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, num_worst_tokens=0,
                 num_sms=None, stream=None, recv_x_out=None, recv_scales_out=None, **_):
        return self._ht_result(x, topk_idx, exact_count, x.shape[0])

    def combine(self, x, handle, out=None, *, bias=None, recv_topk_weights=None,
                combined_topk_weights=None, num_sms=None, stream=None, **_):
        if recv_topk_weights is not None:
            return out, combined_topk_weights
        return out

    def low_latency_dispatch(self, x, topk_idx, topk_weights=None, *, use_fp8=False,
                             num_sms=None, stream=None, phase="both",
                             cumulative_recv_counts=None):
        if x is not None:
            self._ll_num_tokens = x.shape[0]
        r = self._ll.get(use_fp8)
        if r is None:
            L, rows = self._ll_shape
            h = self.hidden
            r = _Obj(recv_x=torch.zeros((L, rows, h),
                                        dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16),
                     recv_x_scales=torch.zeros((L, rows, h // 128)) if use_fp8 else None,
                     num_recv_tokens_per_expert=torch.zeros(L, dtype=torch.int32),
                     recv_src_info=torch.zeros((L, rows), dtype=torch.int32),
                     rows_per_expert=rows)
            self._ll[use_fp8] = r
        return r

    def low_latency_combine(self, x, out=None, *, topk_weights=None, num_sms=None, stream=None,
                            phase="both"):
        return out


def install():
    """Replaces the core Buffer, bytes_for, the torch bootstrap and the torch.cuda calls the
    facade makes with no-ops (this process only; for benchmarks and tests)."""
    import epcomm
    import epcomm._bootstrap
    from epcomm import _epcomm

    _epcomm.Buffer = NullBuffer
    _epcomm.bytes_for = fake_bytes_for
    epcomm.bytes_for = fake_bytes_for
    epcomm._bootstrap.bootstrap_from_torch = \
        lambda group=None, device=None: _Obj(rank=0, size=1, num_nodes=1)
    stream = _FakeStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.Stream = lambda device=None, **kw: _FakeStream()
    torch.cuda.Event = lambda *a, **kw: _FakeEvent()
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    torch.Tensor.record_stream = lambda self, s: None


def best_per_call_us(fn, iters, repeat, clock=time.thread_time_ns):
    """Best over `repeat` batches of the mean time per call. The default clock is this thread's
    CPU time, so a busy machine (a build, CI) inflates the numbers less than wall time would."""
    fn()  # warm caches (view cache, handle pool)
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        for _ in range(iters):
            fn()
        best = min(best, (clock() - t0) / iters)
    return best / 1e3


def facade_paths(tokens=16, hidden=128, experts=64, topk=8):
    """{name: zero-argument callable}: each deep_ep path the GPU benchmark (python -m
    epcomm.bench) times, on a 1-rank facade over NullBuffer (install() first)."""
    import epcomm.deep_ep as deep_ep

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    topk_w = torch.rand(tokens, topk, generator=gen)
    fb = deep_ep.Buffer(None, 0, 0, low_latency_mode=True, hidden=hidden, num_experts=experts,
                        max_topk=topk, max_tokens_per_rank=tokens, ll_max_tokens_per_rank=tokens)
    ntr, _, nte, itr, _ = fb.get_dispatch_layout(topk_idx, experts)
    recv_x, _, recv_w, _, handle, _ = fb.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w,
                                                  num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                                  num_tokens_per_expert=nte)

    def dispatch_topk():
        return fb.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_tokens_per_rank=ntr,
                           is_token_in_rank=itr, num_tokens_per_expert=nte)

    def dispatch_worst():  # static shapes, as python -m epcomm.bench's facade row
        return fb.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_tokens_per_rank=ntr,
                           is_token_in_rank=itr, num_tokens_per_expert=nte,
                           num_worst_tokens=tokens)

    def ll_pair():
        r, _, hd, _, _ = fb.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False)
        return fb.low_latency_combine(r, topk_idx, topk_w, hd)

    def ll_pair_hook():
        r, _, hd, _, hook = fb.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False,
                                                    return_recv_hook=True)
        hook()
        out, _, hook = fb.low_latency_combine(r, topk_idx, topk_w, hd, return_recv_hook=True)
        hook()
        return out

    return {
        "deep_ep dispatch (top-k)": dispatch_topk,
        "deep_ep dispatch (top-k, worst)": dispatch_worst,
        "deep_ep dispatch (cached)": lambda: fb.dispatch(x, handle=handle),
        "deep_ep combine": lambda: fb.combine(recv_x, handle),
        "deep_ep combine (weights)": lambda: fb.combine(recv_x, handle, topk_weights=recv_w),
        "deep_ep LL dispatch+combine": ll_pair,
        "deep_ep LL dispatch+combine (hooks)": ll_pair_hook,
        "deep_ep dispatch (cached, async)":
            lambda: fb.dispatch(x, handle=handle, async_finish=True),
    }


def check_fresh_outputs(paths):
    """DeepEP's HT and LL-combine results are fresh tensors: a later call must not hand out (or
    write into) the memory of an earlier call's result. Checks that on the null core."""
    def ptrs(result):
        out = []
        for v in (result if isinstance(result, tuple) else (result,)):
            if isinstance(v, tuple):
                out += ptrs(v)
            elif isinstance(v, torch.Tensor) and v.numel():
                out.append(v.data_ptr())
        return out

    for name in ("deep_ep dispatch (top-k)", "deep_ep dispatch (top-k, worst)",
                 "deep_ep dispatch (cached)", "deep_ep combine",
                 "deep_ep combine (weights)", "deep_ep LL dispatch+combine"):
        first = paths[name]()
        keep = ptrs(first)
        second = ptrs(paths[name]())
        assert keep and not set(keep) & set(second), f"{name}: a result's memory was reused"
        # Each output is a plain tensor of its own (not a view: in-place ops on the output of
        # a user's autograd.Function must work, as on DeepEP's), 16-byte aligned.
        for v in (first if isinstance(first, tuple) else (first,)):
            for t in (v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor) and t.numel() and name != \
                        "deep_ep LL dispatch+combine":
                    assert not t._is_view() and t.is_contiguous(), f"{name}: {t.shape} a view"
                    assert t.data_ptr() % 16 == 0, f"{name}: {t.shape} not 16-byte aligned"


def check_result_types(paths, tokens=16, hidden=128, topk=8):
    """dtypes and shapes of the HT results (DeepEP's), the EventOverlap and the handle."""
    import epcomm.deep_ep as deep_ep

    recv_x, recv_idx, recv_w, counts, handle, event = paths["deep_ep dispatch (top-k, worst)"]()
    assert (recv_x.dtype, tuple(recv_x.shape)) == (torch.bfloat16, (tokens, hidden))
    assert (recv_idx.dtype, tuple(recv_idx.shape)) == (torch.int64, (tokens, topk))
    assert (recv_w.dtype, tuple(recv_w.shape)) == (torch.float32, (tokens, topk))
    assert counts == [] and type(event) is deep_ep.EventOverlap and event.event is None
    assert event.extra_tensors is None and not hasattr(event, "__dict__")
    # The layout the call was given; a top-k-only call reads the epcomm Handle's when asked.
    assert handle.is_token_in_rank is not None and handle.num_recv == tokens
    handle._is_token_in_rank = None
    assert handle.is_token_in_rank is handle.ep.is_token_in_rank is not None
    recv_x, _, _, counts, handle, _ = paths["deep_ep dispatch (top-k)"]()
    assert type(counts) is list and tuple(recv_x.shape) == (handle.num_recv, hidden)
    out, combined_w, event = paths["deep_ep combine (weights)"]()
    assert (out.dtype, tuple(out.shape)) == (torch.bfloat16, (tokens, hidden))
    assert (combined_w.dtype, tuple(combined_w.shape)) == (torch.float32, (tokens, topk))


def binding_paths():
    """{name: callable}: the binding's per-tensor costs, which CPU tensors can show: importing a
    torch tensor argument (DLPack in, as every tensor argument of Buffer.dispatch/combine/LL is)
    and making a torch result view (DLPack out, as every result view not found in the view
    cache is). The core Buffer needs a GPU, so its calls are timed by python -m epcomm.bench;
    per call they pay these costs once per tensor argument and once per new view."""
    from epcomm import _epcomm

    t = torch.zeros((16, 128), dtype=torch.bfloat16)
    return {
        "binding: import 1 torch tensor (_describe)": lambda: _epcomm._describe(t),
        "binding: import + torch view (_roundtrip)": lambda: _epcomm._roundtrip(t),
        "reference: a binding call, no tensor (_stream_handle)": lambda: _epcomm._stream_handle(5),
    }


def alloc_paths(device, tokens=128, hidden=7168, topk=8):
    """{name: callable}: ways to make the fresh outputs of a num_worst_tokens dispatch (recv_x,
    top-k ids, weights), at the GPU benchmark's shape. On a GPU (--alloc-costs --device cuda,
    no epcomm build needed) they give the caching allocator's host cost per allocation, which
    decides whether one allocation carved into typed tensors pays (docs/perf-notes.md "Python
    overhead"); on the CPU the CPU allocator stands in."""
    u8, f32, i64 = torch.uint8, torch.float32, torch.int64
    x = torch.zeros((tokens, hidden), dtype=torch.bfloat16, device=device)
    idx = torch.zeros((tokens, topk), dtype=i64, device=device)
    n, h, k = tokens, hidden, topk
    off_i, off_w = n * h * 2, n * h * 2 + n * k * 8
    total = off_w + n * k * 4

    def per_output():
        return x.new_empty((n, h)), idx.new_empty((n, k)), x.new_empty((n, k), dtype=f32)

    def carved():  # plain tensors over one storage (Tensor.set_)
        st = x.new_empty(total, dtype=u8).untyped_storage()
        return (x.new_empty(0).set_(st, 0, (n, h)), idx.new_empty(0).set_(st, off_i // 8, (n, k)),
                x.new_empty(0, dtype=f32).set_(st, off_w // 4, (n, k)))

    def carved_views():  # views (an autograd.Function's view outputs refuse in-place ops)
        b = x.new_empty(total, dtype=u8)
        return (b.view(torch.bfloat16).as_strided((n, h), (h, 1), 0),
                b.view(i64).as_strided((n, k), (k, 1), off_i // 8),
                b.view(f32).as_strided((n, k), (k, 1), off_w // 4))

    return {
        "alloc: 1 new_empty": lambda: x.new_empty((n, h)),
        "alloc: 3 outputs, one allocation each": per_output,
        "alloc: 3 outputs carved from one (set_)": carved,
        "alloc: 3 outputs carved from one (views)": carved_views,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description="Python host time of epcomm.deep_ep over a no-op "
                                "core (CPU, no GPU)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", metavar="NAME", help="cProfile the paths whose name starts "
                   "with NAME; print the top calls")
    p.add_argument("--check", action="store_true", help="also check that HT and LL-combine "
                   "results are fresh tensors (what the pytest smoke test runs)")
    p.add_argument("--alloc-costs", action="store_true", help="time only the ways to allocate "
                   "a dispatch's outputs (alloc_paths), on --device")
    p.add_argument("--device", default="cpu", help="for --alloc-costs: cpu or cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    if args.alloc_costs:
        clock = time.perf_counter_ns if args.device != "cpu" else time.thread_time_ns
        for name, fn in alloc_paths(torch.device(args.device)).items():
            rows.append({"op": name, "python_us": best_per_call_us(fn, args.iters, args.repeat,
                                                                   clock)})
        print(json.dumps({"torch": torch.__version__, "device": args.device, "results": rows},
                         indent=1))
        return 0
    paths = dict(binding_paths())  # before install(): the real binding
    install()
    paths.update(facade_paths())
    if args.check:
        check_fresh_outputs(paths)
        check_result_types(paths)
    for name, fn in paths.items():
        if args.profile and name.startswith(args.profile):
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.iters):
                fn()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        rows.append({"op": name, "python_us": best_per_call_us(fn, args.iters, args.repeat)})
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": rows}, indent=1))
        return 0
    print(f"# deep_ep over a no-op core (CPU), torch {torch.__version__}; best of {args.repeat} "
          f"x {args.iters} calls")
    for r in rows:
        print(f"{r['op']:<56}{r['python_us']:>10.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
