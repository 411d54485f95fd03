# SPDX-License-Identifier: Apache-2.0
"""Host overhead of the Python binding: ``python -m epcomm.bench``.

For each op it measures the host time per call through ``epcomm.Buffer`` (tensor conversion,
stream lookup, result views) and the host time per call of the same C++ call in a C++ loop with
the arguments converted once (``Buffer._time_cpp``); the difference is what Python adds. GPU
time is not measured: the calls are issued in batches and the GPU is synchronized between
batches, outside the timed region. One rank (this process, one GPU), torch tensors.
"""
import argparse
import json
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m epcomm.bench", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per call (default 128)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=100, help="calls per timed batch (default 100)")
    p.add_argument("--repeat", type=int, default=20, help="batches; the best is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-facade", action="store_true",
                   help="skip the epcomm.deep_ep rows (they need torch.distributed/gloo)")
    return p.parse_args(argv)


def _best_per_call(issue, sync, iters, repeat):
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            issue()
        t1 = time.perf_counter()
        best = min(best, (t1 - t0) / iters)
    sync()
    return best


def _facade_rows(args, x, topk_idx, topk_weights, cpp_by_op):
    """The same ops through epcomm.deep_ep (DeepEP's API), on a 1-rank gloo group. Its HT calls
    allocate fresh outputs and switch to the comm stream and back, as DeepEP's do; its LL calls
    return views. The C++ column is the matching plain C++ call."""
    import socket

    import torch
    import torch.distributed as dist

    import epcomm.deep_ep as deep_ep

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    n, h, e = x.shape[0], x.shape[1], args.experts
    fb = deep_ep.Buffer(dist.group.WORLD, 0, 0, low_latency_mode=True, hidden=h, num_experts=e,
                        max_topk=args.topk, max_tokens_per_rank=max(n, 1),
                        ll_max_tokens_per_rank=min(max(n, 1), 4096))
    sync = torch.cuda.synchronize
    ntr, _, nte, itr, _ = fb.get_dispatch_layout(topk_idx, e)
    recv_x, _, recv_w, _, handle, _ = fb.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                  num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                                  num_tokens_per_expert=nte)
    out = []

    def row(name, fn, cpp_op):
        py = _best_per_call(fn, sync, args.iters, args.repeat)
        cpp = cpp_by_op[cpp_op]
        out.append({"op": name, "python_us": py * 1e6, "cpp_us": cpp,
                    "overhead_us": py * 1e6 - cpp})

    # Static shapes (num_worst_tokens = all tokens): no host wait for the received count, as in
    # the C++ row; with exact counts the host time would include the GPU's work.
    row("deep_ep dispatch (top-k, worst)",
        lambda: fb.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                            num_tokens_per_rank=ntr, is_token_in_rank=itr,
                            num_tokens_per_expert=nte, num_worst_tokens=n), "dispatch (top-k)")
    row("deep_ep dispatch (cached)", lambda: fb.dispatch(x, handle=handle), "dispatch (cached)")
    row("deep_ep combine", lambda: fb.combine(recv_x, handle), "combine")

    def ll_pair():
        r, _, hd, _, _ = fb.low_latency_dispatch(x, topk_idx, n, e, use_fp8=False)
        fb.low_latency_combine(r, topk_idx, topk_weights, hd)

    row("deep_ep LL dispatch+combine", ll_pair, "LL dispatch+combine")
    fb.destroy()
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    import epcomm

    if epcomm.device_count() == 0:
        print("epcomm.bench: no CUDA device visible; run it on a GPU machine", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("epcomm.bench: needs torch for its input tensors", file=sys.stderr)
        return 2

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    gen = torch.Generator(device="cpu").manual_seed(1)
    n, h, e, k = args.tokens, args.hidden, args.experts, args.topk
    buf = epcomm.Buffer(epcomm.single_process_bootstrap(), device=0, hidden=h, num_experts=e,
                        max_topk=k, max_tokens_per_rank=max(n, 1),
                        ll_max_tokens_per_rank=min(max(n, 1), epcomm.MAX_LL_TOKENS_PER_RANK))
    stream = torch.cuda.Stream()
    s = stream.cuda_stream
    x = torch.randn(n, h, generator=gen).to(torch.bfloat16).to(dev)
    scores = torch.rand(n, e, generator=gen)
    topk_idx = scores.topk(k, dim=1).indices.to(dev)
    topk_weights = torch.rand(n, k, generator=gen).to(dev)
    out = torch.empty(n, h, dtype=torch.bfloat16, device=dev)
    handle = buf.create_handle()
    with torch.cuda.stream(stream):
        res = buf.dispatch(x, handle, topk_idx=topk_idx, topk_weights=topk_weights, stream=s)
    buf.sync(s)

    def sync():
        buf.sync(s)

    rows = []

    def measure(name, py_issue, cpp_op, **cpp_kwargs):
        py = _best_per_call(py_issue, sync, args.iters, args.repeat)
        cpp = float("inf")
        for _ in range(args.repeat):
            sync()
            cpp = min(cpp, buf._time_cpp(cpp_op, args.iters, stream=s, **cpp_kwargs))
        sync()
        rows.append({"op": name, "python_us": py * 1e6, "cpp_us": cpp * 1e6,
                     "overhead_us": (py - cpp) * 1e6})

    measure("dispatch (top-k)",
            lambda: buf.dispatch(x, handle, topk_idx=topk_idx, topk_weights=topk_weights,
                                 stream=s),
            "dispatch", x=x, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights)
    measure("dispatch (cached)", lambda: buf.dispatch(x, handle, stream=s), "cached_dispatch",
            x=x, handle=handle)
    measure("combine", lambda: buf.combine(res.combine_input, handle, out, stream=s), "combine",
            x=res.combine_input, handle=handle, out=out)

    def ll_pair():
        r = buf.low_latency_dispatch(x, topk_idx, topk_weights, stream=s)
        buf.low_latency_combine(r.recv_x, out, stream=s)

    measure("LL dispatch+combine", ll_pair, "ll_dispatch", x=x, topk_idx=topk_idx,
            topk_weights=topk_weights, out=out)
    with torch.cuda.stream(stream):  # stream=None resolves to torch's current stream: `stream`
        py_none = _best_per_call(lambda: buf.dispatch(x, handle), sync, args.iters, args.repeat)
    rows.append({"op": "dispatch (cached, stream=None)", "python_us": py_none * 1e6,
                 "cpp_us": rows[1]["cpp_us"], "overhead_us": py_none * 1e6 - rows[1]["cpp_us"]})
    cpp_by_op = {r["op"]: r["cpp_us"] for r in rows}
    buf.destroy()
    if not args.no_facade:
        rows += _facade_rows(args, x, topk_idx, topk_weights, cpp_by_op)

    meta = {"tokens": n, "hidden": h, "experts": e, "topk": k, "iters": args.iters,
            "repeat": args.repeat, "version": epcomm.__version__, "git": epcomm.git_describe,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=1))
        return 0
    print(f"# epcomm.bench: host time per call, 1 rank, {meta['gpu']}, tokens {n}, hidden {h}, "
          f"experts {e}, top-{k}; best of {args.repeat} x {args.iters} calls")
    print(f"{'op':<32}{'python us':>12}{'C++ us':>12}{'overhead us':>14}")
    for r in rows:
        print(f"{r['op']:<32}{r['python_us']:>12.2f}{r['cpp_us']:>12.2f}{r['overhead_us']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
