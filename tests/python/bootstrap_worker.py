# SPDX-License-Identifier: Apache-2.0
"""One rank of a host-only bootstrap check (no GPU needed), started by test_bootstrap_mp.py:

    mpirun -np 2 python bootstrap_worker.py mpi4py
    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python bootstrap_worker.py torch

Checks the bootstrap's collectives, then that a Buffer whose configuration is bad on rank 0 fails
on every rank (InvalidArgument there, an error naming rank 0 elsewhere) without a hang.
"""
import sys

import epcomm


def main(kind):
    if kind == "mpi4py":
        from mpi4py import MPI

        bs = epcomm.bootstrap_from_mpi4py(MPI.COMM_WORLD)
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        bs = epcomm.bootstrap_from_torch()
        rank, size = dist.get_rank(), dist.get_world_size()
    assert (bs.rank, bs.size) == (rank, size), (bs.rank, bs.size)
    assert bs.local_size == size and bs.num_nodes == 1
    gathered = bs.all_gather(bytes([rank, 7]))
    assert gathered == b"".join(bytes([r, 7]) for r in range(size)), gathered
    bs.barrier()
    try:
        epcomm.Buffer(bs, hidden=100 if rank == 0 else 256, num_experts=8, max_topk=2,
                      max_tokens_per_rank=16)
        raise AssertionError("Buffer creation should have failed")
    except epcomm.Error as e:
        if rank == 0:
            assert type(e) is epcomm.InvalidArgument, repr(e)
        else:
            assert "rank 0" in str(e), str(e)
    print(f"bootstrap_worker {kind} rank {rank}/{size}: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "mpi4py"))
