# SPDX-License-Identifier: Apache-2.0
"""Autograd functions for training: dispatch and combine through ``epcomm.deep_ep.Buffer``.

- ``dispatch(buffer, x, topk_idx, topk_weights, ...)`` -> (recv_x, recv_topk_idx,
  recv_topk_weights, num_recv_tokens_per_expert_list, handle). Backward: combine of grad(recv_x)
  through the handle (a token's copies on several ranks sum their gradients), and the combined
  weights of grad(recv_topk_weights) as grad(topk_weights) (DeepEP's combined_topk_weights).
- ``combine(buffer, x, handle, recv_topk_weights=None)`` -> [num_tokens, hidden]. Backward: a
  cached dispatch of grad(out) through the handle. With ``recv_topk_weights`` each row is first
  scaled by the sum of its (local) weights, so out[t] = sum over ranks of
  (sum of t's weights there) * row; the weights' gradient then flows back through dispatch.

The HT facade returns fresh tensors (not buffer views), so autograd may save them. Communication
is in BF16 (the gradients too); FP8 dispatch has no backward here.
"""
import torch

__all__ = ["dispatch", "combine", "DispatchFunction", "CombineFunction"]


class _Box:
    """Carries the handle and the host counts out of a Function (which returns tensors only)."""

    __slots__ = ("handle", "counts")


class DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer, layout, expert_alignment,
                num_worst_tokens, box):
        num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = layout
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x.to(torch.bfloat16).contiguous(), topk_idx=topk_idx,
            topk_weights=topk_weights.float().contiguous(),
            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_expert=num_tokens_per_expert,
            is_token_in_rank=is_token_in_rank, expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens)
        box.handle, box.counts = handle, counts
        ctx.buffer, ctx.handle = buffer, handle
        ctx.x_dtype, ctx.w_dtype = x.dtype, topk_weights.dtype
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_idx, grad_recv_w):
        (recv_idx,) = ctx.saved_tensors
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((ctx.handle.num_recv, ctx.buffer._buf.hidden),
                                      dtype=torch.bfloat16, device=recv_idx.device)
        if grad_recv_w is not None:
            # Entries of experts on other ranks were set to 0 in the forward: no gradient there.
            grad_recv_w = grad_recv_w.float().masked_fill(recv_idx < 0, 0).contiguous()
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.to(torch.bfloat16).contiguous(),
                                               ctx.handle, topk_weights=grad_recv_w)
        grad_x = grad_x.to(ctx.x_dtype)
        grad_w = None if grad_w is None else grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        out, _, _ = buffer.combine(x.to(torch.bfloat16).contiguous(), handle)
        ctx.buffer, ctx.handle, ctx.x_dtype = buffer, handle, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, _, _, _, _, _ = ctx.buffer.dispatch(grad_out.to(torch.bfloat16).contiguous(),
                                                    handle=ctx.handle)
        return grad_x.to(ctx.x_dtype), None, None


def dispatch(buffer, x, topk_idx, topk_weights, num_tokens_per_rank=None,
             num_tokens_per_expert=None, is_token_in_rank=None, expert_alignment=1,
             num_worst_tokens=0):
    """Differentiable HT dispatch (x and topk_weights). Returns (recv_x, recv_topk_idx,
    recv_topk_weights, num_recv_tokens_per_expert_list, handle)."""
    box = _Box()
    recv_x, recv_idx, recv_w = DispatchFunction.apply(
        x, topk_weights, topk_idx, buffer,
        (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank), expert_alignment,
        num_worst_tokens, box)
    return recv_x, recv_idx, recv_w, box.counts, box.handle


def combine(buffer, x, handle, recv_topk_weights=None):
    """Differentiable HT combine of expert outputs x [rows, hidden] (rows as dispatch received
    them). With recv_topk_weights [rows, num_topk] each row is scaled by the sum of its weights
    first (a token's experts on one rank share its row); autograd differentiates that too."""
    if recv_topk_weights is not None:
        x = x * recv_topk_weights.sum(dim=1, keepdim=True).to(x.dtype)
    return CombineFunction.apply(x, buffer, handle)
