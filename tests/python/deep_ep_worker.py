# SPDX-License-Identifier: Apache-2.0
"""One rank of the epcomm.deep_ep and autograd multi-rank tests (launched by test_deep_ep_mp.py
and test_autograd_mp.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):

    python deep_ep_worker.py intranode|low_latency|autograd

Written from DeepEP's documented behaviour (its test_intranode.py / test_low_latency.py checks:
receive counts, handle reuse, combined ~ x * number of ranks, weights reduced). Every rank makes
every rank's inputs from one seed and checks what it must receive against a torch reference on
the CPU. Ranks use GPU rank % device_count. Prints "<rank>: OK" or exits non-zero.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "python"))

import epcomm.deep_ep as deep_ep  # noqa: E402

FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print(f"rank {dist.get_rank()}: FAIL {what}", flush=True)


def close(a, b, rel, what):
    a, b = a.double().cpu(), b.double().cpu()
    err = (a - b).norm().item() / max(b.norm().item(), 1e-12)
    check(err <= rel, f"{what}: relative error {err:.3g} > {rel}")


def routing(gen, size, tokens, experts, topk):
    """topk_idx [size, tokens, topk]: distinct experts per token, token 0 routed nowhere, a -1
    slot in token 1, a repeated id in token 2 (counts once)."""
    idx = torch.rand(size, tokens, experts, generator=gen).argsort(dim=-1)[..., :topk]
    idx[:, 0, :] = -1
    idx[:, 1, 1] = -1
    idx[:, 2, 1] = idx[:, 2, 0]
    return idx.long()


def dedup(idx):
    """idx with every repetition of an id within a row made -1 (epcomm's routing policy)."""
    out = idx.clone()
    for j in range(1, idx.shape[-1]):
        rep = (idx[..., j:j + 1] == idx[..., :j]).any(-1) & (idx[..., j] >= 0)
        out[..., j][rep] = -1
    return out


def intranode(rank, size, dev):
    H, E, K, T = 256, 4 * size, 4, 64
    L = E // size
    gen = torch.Generator().manual_seed(11)
    idx_all = routing(gen, size, T, E, K)
    w_all = torch.rand(size, T, K, generator=gen) + 0.1
    x_all = torch.randn(size, T, H, generator=gen).to(torch.bfloat16)
    clean = dedup(idx_all)
    in_rank = torch.zeros(size, T, size, dtype=torch.bool)
    for r in range(size):
        in_rank[..., r] = ((clean >= r * L) & (clean < (r + 1) * L)).any(-1)

    nvl = deep_ep.Config().get_nvl_buffer_size_hint(H * 2, size)
    buf = deep_ep.Buffer(dist.group.WORLD, nvl, 0)
    x, idx, w = x_all[rank].to(dev), idx_all[rank].to(dev), w_all[rank].to(dev)

    # Layout, as DeepEP returns it.
    ntr, ntrr, nte, itr, ev = buf.get_dispatch_layout(idx, E)
    check(ntrr is None, "num_tokens_per_rdma_rank is None on one node")
    check(torch.equal(itr.cpu(), in_rank[rank]), "is_token_in_rank")
    check(torch.equal(ntr.cpu(), in_rank[rank].sum(0).int()), "num_tokens_per_rank")
    ref_nte = torch.stack([(clean[rank] == e).any(-1).sum() for e in range(E)]).int()
    check(torch.equal(nte.cpu(), ref_nte), "num_tokens_per_expert")
    check(ntr.dtype == torch.int32 and nte.dtype == torch.int32 and itr.dtype == torch.bool,
          "layout dtypes")

    # What this rank receives: rank-major, token order within a source rank.
    src = [(r, t) for r in range(size) for t in range(T) if in_rank[r, t, rank]]
    ref_x = torch.stack([x_all[r, t] for r, t in src]) if src else torch.empty(0, H)
    loc = clean - rank * L
    loc = torch.where((loc >= 0) & (loc < L), loc, torch.full_like(loc, -1))
    ref_idx = torch.stack([loc[r, t] for r, t in src]) if src else torch.empty(0, K).long()
    ref_w = torch.stack([torch.where(loc[r, t] >= 0, w_all[r, t], 0.0) for r, t in src]) \
        if src else torch.empty(0, K)

    for align in (1, 4):
        recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
            x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
            topk_idx=idx, topk_weights=w, expert_alignment=align)
        check(ev.event is None, "no event without async_finish")
        check(recv_x.shape == (len(src), H), f"recv_x shape {tuple(recv_x.shape)}")
        check(torch.equal(recv_x.cpu(), ref_x.to(torch.bfloat16)), f"recv_x (align {align})")
        check(torch.equal(recv_idx.cpu(), ref_idx), f"recv_topk_idx (align {align})")
        close(recv_w, ref_w, 1e-6, f"recv_topk_weights (align {align})")
        ref_counts = [(int((ref_idx == e).any(-1).sum()) + align - 1) // align * align
                      for e in range(L)]
        check(counts == ref_counts, f"num_recv_tokens_per_expert_list {counts} != {ref_counts}")

    # Cached dispatch reuses the handle: same rows, no top-k outputs.
    x2 = (x.float() * 2).to(torch.bfloat16)
    out = buf.dispatch(x2, handle=handle)
    check(out[1:5] == (None, None, None, None), "cached dispatch returns Nones")
    check(torch.equal(out[0].cpu(), (ref_x.float() * 2).to(torch.bfloat16)), "cached recv_x")

    # Combine: unweighted sum over the ranks a token went to (DeepEP: ~ x * ranks), and the
    # received weights reduced back.
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    ranks_of = in_rank[rank].sum(-1, keepdim=True).float()
    close(combined, x_all[rank].float() * ranks_of, 1e-2, "combined_x ~ x * ranks")
    ref_cw = torch.where(clean[rank] >= 0, w_all[rank], 0.0)
    close(combined_w, ref_cw, 1e-6, "combined_topk_weights")
    combined2, cw2, _ = buf.combine(recv_x, handle)
    check(cw2 is None, "no combined weights without topk_weights")
    close(combined2, combined, 1e-2, "combine without weights")

    # Bias (DeepEP's two-tensor form).
    b0 = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    combined3, _, _ = buf.combine(recv_x, handle, bias=(b0, None))
    close(combined3, x_all[rank].float() * ranks_of + b0.float().cpu(), 1e-2, "combine bias")

    # async_finish / previous_event.
    prev = deep_ep.Buffer.capture()
    recv_x4, _, _, _, handle4, ev4 = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                                  previous_event=prev, async_finish=True)
    check(ev4.event is not None, "async_finish returns an event")
    with ev4:
        pass
    check(torch.equal(recv_x4.cpu(), ref_x.to(torch.bfloat16)), "async dispatch recv_x")

    # Static shapes (num_worst_tokens): fixed rows, padding rows -1 / 0, no host counts.
    worst = size * T
    rx, ri, rw, counts, hw, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                             num_worst_tokens=worst)
    n = len(src)
    check(rx.shape[0] == worst and ri.shape[0] == worst, "num_worst_tokens rows")
    check(counts == [], "num_worst_tokens: empty count list")
    check(torch.equal(rx[:n].cpu(), ref_x.to(torch.bfloat16)), "num_worst_tokens recv_x")
    check(bool((ri[n:] == -1).all()) and bool((rw[n:] == 0).all()) and
          bool((rx[n:] == 0).all()), "num_worst_tokens padding")
    check(torch.equal(ri[:n].cpu(), ref_idx), "num_worst_tokens recv_topk_idx")
    close(rw[:n], ref_w, 1e-6, "num_worst_tokens recv_topk_weights")
    cw_, cww, _ = buf.combine(rx, hw, topk_weights=rw)
    close(cw_, x_all[rank].float() * ranks_of, 1e-2, "num_worst_tokens combine")

    # FP8: (x, scales) in, (recv_x, recv_scales) out, rows as sent.
    g8 = torch.Generator().manual_seed(100 + rank)  # different on every rank, gathered below
    scales = (torch.rand(T, H // 128, generator=g8) + 0.5).to(dev)
    xq = torch.randn(T, H, generator=g8).clamp(-4, 4).to(torch.float8_e4m3fn).to(dev)
    (rq, rs), _, _, _, _, _ = buf.dispatch((xq, scales), topk_idx=idx, topk_weights=w)
    xq_all = [None] * size
    s_all = [None] * size
    dist.all_gather_object(xq_all, xq.view(torch.uint8).cpu())
    dist.all_gather_object(s_all, scales.cpu())
    ref_q = torch.stack([xq_all[r][t] for r, t in src]) if src else torch.empty(0, H)
    ref_s = torch.stack([s_all[r][t] for r, t in src]) if src else torch.empty(0, H // 128)
    check(torch.equal(rq.view(torch.uint8).cpu(), ref_q.to(torch.uint8)), "FP8 recv_x")
    check(torch.equal(rs.cpu(), ref_s), "FP8 recv_x_scales")

    # Static shapes with the layout, FP8 and no weights (the library copies every output in the
    # dispatch call): received weights are 0, padding rows 0 / -1; then a cached re-dispatch.
    (rq6, rs6), ri6, rw6, c6, h6, _ = buf.dispatch(
        (xq, scales), num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
        topk_idx=idx, num_worst_tokens=worst)
    check(rq6.shape[0] == worst and rs6.shape[0] == worst and rw6.shape == (worst, K),
          "FP8 num_worst_tokens rows")
    check(c6 == [], "FP8 num_worst_tokens: empty count list")
    check(torch.equal(rq6[:n].view(torch.uint8).cpu(), ref_q.to(torch.uint8)) and
          torch.equal(rs6[:n].cpu(), ref_s), "FP8 num_worst_tokens recv_x / scales")
    check(bool((rq6[n:].view(torch.uint8) == 0).all()) and bool((rs6[n:] == 0).all()),
          "FP8 num_worst_tokens padding")
    check(torch.equal(ri6[:n].cpu(), ref_idx) and bool((ri6[n:] == -1).all()),
          "FP8 num_worst_tokens recv_topk_idx")
    check(bool((rw6 == 0).all()), "num_worst_tokens without topk_weights: weights 0")
    rq7, rs7 = buf.dispatch((xq, scales), handle=h6)[0]
    check(rq7.shape[0] == worst and torch.equal(rq7.view(torch.uint8).cpu(),
                                                rq6.view(torch.uint8).cpu()) and
          torch.equal(rs7.cpu(), rs6.cpu()), "cached FP8 dispatch on a num_worst_tokens handle")

    # Dispatch from the layout alone (no top-k): DeepEP returns no top-k outputs then.
    rx5, ri5, rw5, _, h5, _ = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                           num_tokens_per_expert=nte)
    check(ri5 is None and rw5 is None, "layout-only dispatch: no top-k outputs")
    check(torch.equal(rx5.cpu(), ref_x.to(torch.bfloat16)), "layout-only recv_x")
    rx8, ri8, rw8, c8, _, _ = buf.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                           num_tokens_per_expert=nte, num_worst_tokens=worst)
    check(ri8 is None and rw8 is None and c8 == [], "layout-only static dispatch outputs")
    check(torch.equal(rx8[:n].cpu(), ref_x.to(torch.bfloat16)) and bool((rx8[n:] == 0).all()),
          "layout-only num_worst_tokens recv_x")
    buf.destroy()


def low_latency(rank, size, dev):
    H, E, K, T = 512, 4 * size, 4, 32
    L = E // size
    gen = torch.Generator().manual_seed(23)
    idx_all = routing(gen, size, T, E, K)
    w_all = torch.rand(size, T, K, generator=gen) + 0.1
    x_all = torch.randn(size, T, H, generator=gen).to(torch.bfloat16)
    clean = dedup(idx_all)
    nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, size, E)
    buf = deep_ep.Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True,
                         num_qps_per_rank=L)
    x, idx, w = x_all[rank].to(dev), idx_all[rank].to(dev), w_all[rank].to(dev)
    stats = torch.zeros(L, dtype=torch.int32, device=dev)
    ref_count = [int(((clean == rank * L + e).any(-1)).sum()) for e in range(L)]

    for use_fp8 in (False, True):
        for hook_mode in (False, True):
            recv, count, handle, ev, hook = buf.low_latency_dispatch(
                x, idx, T, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
                return_recv_hook=hook_mode)
            check((hook is not None) == hook_mode, "hook only with return_recv_hook")
            if hook_mode:
                hook()
            torch.cuda.synchronize()
            rx = recv[0] if use_fp8 else recv
            check(rx.shape == (L, size * T, H), f"LL recv_x shape {tuple(rx.shape)}")
            check(count.tolist() == ref_count, f"LL recv_count {count.tolist()} != {ref_count}")
            if use_fp8:
                sc = recv[1]
                check(sc.shape == (L, size * T, H // 128) and sc.stride(1) == 1,
                      "LL FP8 scales column-major in the last two dims")
                deq = (rx.float().view(L, size * T, H // 128, 128) * sc.unsqueeze(-1)) \
                    .view(L, size * T, H)
            else:
                deq = rx.float()
            info = handle.recv_src_info.cpu()
            for e in range(L):
                got = sorted(int(v) for v in info[e, :ref_count[e]])
                want = sorted(r * T + t for r in range(size) for t in range(T)
                              if (clean[r, t] == rank * L + e).any())
                check(got == want, f"LL expert {e} sources")
                for i, s in enumerate(info[e, :ref_count[e]].tolist()):
                    ref = x_all[s // T, s % T].float()
                    close(deq[e, i].cpu(), ref, 0.07 if use_fp8 else 0, f"LL row e{e} i{i}")
            # Combine with identity experts: out[t] = sum of t's valid weights * x[t].
            expert_out = deq.to(torch.bfloat16)
            out, ev2, hook2 = buf.low_latency_combine(expert_out, idx, w, handle,
                                                      return_recv_hook=hook_mode)
            if hook_mode:
                hook2()
            wsum = torch.where(clean[rank] >= 0, w_all[rank], 0.0).sum(-1, keepdim=True)
            close(out, x_all[rank].float() * wsum, 0.08 if use_fp8 else 1e-2,
                  f"LL combine (fp8={use_fp8}, hook={hook_mode})")
            check(bool((out[0] == 0).all()), "LL combine: a token routed nowhere is zero")
    check(stats.cpu().tolist() == [4 * c for c in ref_count], "cumulative recv stats")

    # zero_copy through get_next_low_latency_combine_buffer.
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    zbuf = buf.get_next_low_latency_combine_buffer(handle)
    zbuf.copy_(recv)
    out, _, _ = buf.low_latency_combine(zbuf, idx, w, handle, zero_copy=True)
    wsum = torch.where(clean[rank] >= 0, w_all[rank], 0.0).sum(-1, keepdim=True)
    close(out, x_all[rank].float() * wsum, 1e-2, "LL zero_copy combine")
    buf.destroy()


def autograd(rank, size, dev):
    from moe_layer import MoELayer, reference_forward

    H, E, K, T = 128, 4 * size, 3, 48
    L = E // size
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(size, T, H, generator=gen, dtype=torch.float64)
    idx = routing(gen, size, T, E, K)
    idx[:, 2, 1] = -1  # the layer's reference has no duplicate policy; keep ids distinct
    router = torch.randn(E, H, generator=gen, dtype=torch.float64) * H ** -0.5
    experts = torch.randn(E, H, H, generator=gen, dtype=torch.float64) * H ** -0.5
    G = torch.randn(size, T, H, generator=gen, dtype=torch.float64)

    buf = deep_ep.Buffer(dist.group.WORLD, int(2e8), hidden=H, num_experts=E)
    layer = MoELayer(buf, H, E, K, rank, size).to(dev)
    with torch.no_grad():
        layer.router.weight.copy_(router)
        layer.experts.copy_(experts[rank * L:(rank + 1) * L])
    x = X[rank].float().to(dev).requires_grad_()
    out = layer(x, idx[rank].to(dev))
    (out * G[rank].float().to(dev)).sum().backward()

    Xr = X.reshape(-1, H).clone().requires_grad_()
    Rr = router.clone().requires_grad_()
    Er = experts.clone().requires_grad_()
    ref = reference_forward(Xr, idx.reshape(-1, K), Rr, Er)
    (ref * G.reshape(-1, H)).sum().backward()
    sl = slice(rank * T, (rank + 1) * T)
    close(out, ref[sl].detach(), 2e-2, "MoE forward")
    close(x.grad, Xr.grad[sl], 2e-2, "grad x")
    close(layer.experts.grad, Er.grad[rank * L:(rank + 1) * L], 2e-2, "grad expert weights")
    g = layer.router.weight.grad.detach().cpu().double()
    dist.all_reduce(g)  # the router is replicated: the ranks' gradients sum to the reference's
    close(g, Rr.grad, 2e-2, "grad router weights")
    buf.destroy()


def main():
    scenario = sys.argv[1]
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if os.environ.get("EPCOMM_FAKE_CORE") == "1":  # CPU stand-in for the core (fake_core.py)
        import fake_core

        fake_core.install()
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    try:
        {"intranode": intranode, "low_latency": low_latency, "autograd": autograd}[scenario](
            rank, size, dev)
    except Exception as e:  # a failure on one rank: report it, let the others time out
        import traceback

        traceback.print_exc()
        FAILS.append(repr(e))
    torch.cuda.synchronize()
    print(f"{rank}: {'OK' if not FAILS else 'FAILED ' + '; '.join(FAILS)}", flush=True)
    sys.stdout.flush()
    os._exit(0 if not FAILS else 1)


if __name__ == "__main__":
    main()
