# SPDX-License-Identifier: Apache-2.0
"""An expert-parallel MoE layer trained through epcomm's autograd dispatch/combine.

    torchrun --nproc-per-node 4 examples/python/moe_layer.py

Each rank holds num_experts / num_ranks experts (one linear map each) and a replica of the
router. Forward: router -> softmax -> top-k -> dispatch (tokens and their weights to the ranks of
their experts) -> per local expert, weight * expert(x) summed per received row -> combine (back
to the token's rank, summed). Backward runs the same in reverse (epcomm/autograd.py), including
the router weights' gradient through the dispatched top-k weights. ``reference_forward`` is the
same layer on one process (any dtype), used by tests/python/test_autograd_mp.py.
"""
import torch

import epcomm.deep_ep as deep_ep
from epcomm import autograd as ep_autograd


class MoELayer(torch.nn.Module):
    def __init__(self, buffer, hidden, num_experts, topk, rank, num_ranks):
        super().__init__()
        assert num_experts % num_ranks == 0
        self.buffer, self.topk, self.num_experts = buffer, topk, num_experts
        self.num_local = num_experts // num_ranks
        self.router = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.Parameter(torch.empty(self.num_local, hidden, hidden))
        torch.nn.init.normal_(self.experts, std=hidden ** -0.5)

    def route(self, x):
        probs = self.router(x).float().softmax(dim=-1)
        weights, idx = probs.topk(self.topk, dim=-1)
        return idx, weights

    def forward(self, x, topk_idx=None):
        """x [tokens, hidden]. topk_idx overrides the router's choice (the weights still come
        from the router's probabilities at those ids), so tests can fix the routing."""
        probs = self.router(x).float().softmax(dim=-1)
        if topk_idx is None:
            _, topk_idx = probs.topk(self.topk, dim=-1)
        weights = probs.gather(1, topk_idx.clamp(min=0)).masked_fill(topk_idx < 0, 0)
        ntr, _, nte, itr, _ = self.buffer.get_dispatch_layout(topk_idx, self.num_experts)
        recv_x, recv_idx, recv_w, _, handle = ep_autograd.dispatch(
            self.buffer, x, topk_idx, weights, ntr, nte, itr)
        xr = recv_x.float()
        y = xr.new_zeros(xr.shape)
        for e in range(self.num_local):
            sel = recv_idx == e                      # [rows, topk]
            rows = sel.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            w = (recv_w * sel).sum(dim=1)[rows]      # this expert's weight for each row
            y = y.index_add(0, rows, w[:, None] * (xr[rows] @ self.experts[e]))
        return ep_autograd.combine(self.buffer, y, handle).float()


def reference_forward(x, topk_idx, router_weight, experts):
    """The layer on one process: x [T, H], topk_idx [T, K] (global ids, -1 = none),
    router_weight [E, H], experts [E, H, H]; any dtype (float64 for references)."""
    probs = (x @ router_weight.t()).softmax(dim=-1)
    weights = probs.gather(1, topk_idx.clamp(min=0)).masked_fill(topk_idx < 0, 0)
    out = torch.zeros_like(x)
    for k in range(topk_idx.shape[1]):
        ids = topk_idx[:, k]
        ok = ids >= 0
        y = torch.einsum("th,thg->tg", x[ok], experts[ids[ok]])
        out = out.index_add(0, ok.nonzero().squeeze(1), weights[ok, k, None] * y)
    return out


def main():
    import os

    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    hidden, experts, topk, tokens = 1024, 8 * size, 4, 512
    buffer = deep_ep.Buffer(dist.group.WORLD, int(1e9), hidden=hidden, num_experts=experts)
    layer = MoELayer(buffer, hidden, experts, topk, rank, size).cuda()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    for step in range(10):
        x = torch.randn(tokens, hidden, device="cuda")
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        for p in layer.router.parameters():  # the router is replicated: average its gradient
            dist.all_reduce(p.grad)
            p.grad /= size
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f}")
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
