# SPDX-License-Identifier: Apache-2.0
"""Bootstraps over a process group Python already has, through the C++ CallbackBootstrap.

The C++ library all-gathers small byte strings (host identities, memory handles) while it builds
a Buffer; these helpers route that all-gather to torch.distributed or mpi4py. The GIL is released
around the collective C++ calls and re-acquired inside the callbacks.
"""
from ._epcomm import CallbackBootstrap, InvalidArgument


def single_process_bootstrap() -> CallbackBootstrap:
    """A group of one rank (this process): for single-GPU runs and tests."""
    return CallbackBootstrap(0, 1, lambda data: data)


def bootstrap_from_torch(group=None, device=None) -> CallbackBootstrap:
    """A bootstrap over a torch.distributed process group (None: the default group), any backend.

    The all-gather runs dist.all_gather on uint8 tensors, on ``device`` if given, else on the
    current CUDA device for NCCL groups and on the CPU otherwise. Collective over the group.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgument("[epcomm] bootstrap_from_torch: torch.distributed is not "
                              "initialized (call dist.init_process_group first)")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    if rank < 0:
        raise InvalidArgument("[epcomm] bootstrap_from_torch: this process is not in the group")
    fixed_device = torch.device(device) if device is not None else None
    uses_nccl = "nccl" in str(dist.get_backend(group)).lower()

    def pick_device():
        if fixed_device is not None:
            return fixed_device
        if uses_nccl:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather(data: bytes) -> bytes:
        if not data:
            return b""
        dev = pick_device()
        mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        return bytes(torch.cat(parts).cpu().tolist())

    return CallbackBootstrap(rank, size, all_gather)


def bootstrap_from_mpi4py(comm=None) -> CallbackBootstrap:
    """A bootstrap over an mpi4py communicator (None: MPI.COMM_WORLD). Collective over comm."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return CallbackBootstrap(comm.Get_rank(), comm.Get_size(), comm.allgather, comm.Barrier)


__all__ = ["bootstrap_from_mpi4py", "bootstrap_from_torch", "single_process_bootstrap"]
