# SPDX-License-Identifier: Apache-2.0
"""Multi-rank check of epcomm.Buffer, one process per rank and GPU:

    mpirun -np 2 python tests/python/mp_dispatch.py [--bootstrap mpi4py|torch]

Every rank generates every rank's inputs from one seed, so each can compute what it must
receive (numpy reference) and what combine must return. Exits non-zero on a mismatch.
"""
import argparse
import os
import sys

import numpy as np

HIDDEN, EXPERTS, TOPK, TOKENS = 256, 16, 4, 40


def all_inputs(size):
    rng = np.random.default_rng(1234)
    idx = np.stack([np.stack([rng.choice(EXPERTS, TOPK, replace=False) for _ in range(TOKENS)])
                    for _ in range(size)]).astype(np.int64)
    idx[:, 0, :] = -1
    weights = rng.uniform(0.1, 1.0, (size, TOKENS, TOPK)).astype(np.float32)
    # Payload encodes (source rank, token, column) so a wrong row says where it came from.
    x = (np.arange(size)[:, None, None] * 16 + (np.arange(TOKENS)[None, :, None] % 16)
         + np.arange(HIDDEN)[None, None, :] % 8 / 8.0).astype(np.float32)
    return idx, weights, x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", choices=["mpi4py", "torch"], default="mpi4py")
    args = p.parse_args()
    from mpi4py import MPI
    import torch

    import epcomm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    if args.bootstrap == "torch":
        import torch.distributed as dist

        port = comm.bcast(29500 + os.getpid() % 1000 if rank == 0 else None, root=0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size)
        bs = epcomm.bootstrap_from_torch()
    else:
        bs = epcomm.bootstrap_from_mpi4py(comm)
    assert (bs.rank, bs.size) == (rank, size)

    idx, weights, xs = all_inputs(size)
    dev = torch.device("cuda", torch.cuda.current_device())
    per_rank = EXPERTS // size
    failures = []
    with epcomm.Buffer(bs, device=dev.index, hidden=HIDDEN, num_experts=EXPERTS, max_topk=TOPK,
                       max_tokens_per_rank=64, ll_max_tokens_per_rank=64) as buf:
        x = torch.from_numpy(xs[rank]).to(torch.bfloat16).to(dev)
        topk_idx = torch.from_numpy(idx[rank]).to(dev)
        topk_w = torch.from_numpy(weights[rank]).to(dev)
        handle = buf.create_handle()
        # Bad input on rank 1 only: rank 1 gets InvalidArgument, the others RemoteError from
        # sync(); the call is skipped everywhere and the buffer stays usable.
        try:
            if rank == 1:
                buf.dispatch(x.cpu(), handle, topk_idx=topk_idx, topk_weights=topk_w)
            else:
                buf.dispatch(x, handle, topk_idx=topk_idx, topk_weights=topk_w)
            buf.sync()
            failures.append(f"rank {rank}: the rejected dispatch raised nothing")
        except epcomm.InvalidArgument as e:
            if rank != 1:
                failures.append(f"rank {rank}: unexpected InvalidArgument {e}")
        except epcomm.RemoteError as e:
            if rank == 1 or "rank 1" not in str(e):
                failures.append(f"rank {rank}: unexpected RemoteError {e}")
        res = buf.dispatch(x, handle, topk_idx=topk_idx, topk_weights=topk_w, exact_count=True)
        buf.sync()
        # Reference: rows from rank 0 in token order, then rank 1, ...
        exp_src, exp_rows = [], []
        for s in range(size):
            for t in range(TOKENS):
                if ((idx[s, t] >= rank * per_rank) & (idx[s, t] < (rank + 1) * per_rank)).any():
                    exp_src.append(t)
                    exp_rows.append(xs[s, t])
        got_rows = res.recv_x.float().cpu().numpy()
        ref_rows = torch.from_numpy(np.array(exp_rows)).to(torch.bfloat16).float().numpy()
        if res.num_recv_tokens_host != len(exp_src):
            failures.append(f"rank {rank}: received {res.num_recv_tokens_host} rows, "
                            f"expected {len(exp_src)}")
        elif not np.array_equal(res.recv_src_idx.cpu().numpy(), exp_src):
            failures.append(f"rank {rank}: recv_src_idx differs")
        elif not np.array_equal(got_rows, ref_rows):
            bad = int(np.argwhere((got_rows != ref_rows).any(axis=1))[0][0])
            failures.append(f"rank {rank}: row {bad} is {got_rows[bad][:2]}, "
                            f"expected {ref_rows[bad][:2]}")
        # Combine of the unchanged rows: each token comes back once per destination rank.
        res.combine_input.copy_(res.recv_x)
        out = buf.combine(res.combine_input, handle)
        buf.sync()
        dest = np.array([len({int(e) // per_rank for e in idx[rank, t] if e >= 0})
                         for t in range(TOKENS)], np.float32)
        mine = torch.from_numpy(xs[rank]).to(torch.bfloat16).float().numpy()
        ref = mine * dest[:, None]
        if not np.allclose(out.float().cpu().numpy(), ref, rtol=1e-2, atol=1e-2):
            failures.append(f"rank {rank}: combine differs from the reference")
        # LL round trip, weighted.
        ll = buf.low_latency_dispatch(x, topk_idx, topk_w)
        out_ll = buf.low_latency_combine(ll.recv_x)
        buf.sync()
        scale = np.where(idx[rank] >= 0, weights[rank], 0).sum(axis=1, keepdims=True)
        if not np.allclose(out_ll.float().cpu().numpy(), mine * scale, rtol=2e-2, atol=5e-2):
            failures.append(f"rank {rank}: LL combine differs from the reference")
        buf.synchronizing_barrier()
    for f in failures:
        print(f, file=sys.stderr)
    ok = comm.allreduce(0 if failures else 1, op=MPI.MIN)
    if rank == 0:
        print(f"mp_dispatch ({args.bootstrap}, {size} ranks): {'PASS' if ok else 'FAIL'}")
    if args.bootstrap == "torch":
        # Tear the process group down before the interpreter does: a gloo worker thread that
        # drops a tensor reference during interpreter finalization aborts the process.
        del bs
        import gc

        gc.collect()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
