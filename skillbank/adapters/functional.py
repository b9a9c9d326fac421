"""The fused op behind every adapted linear map: ``y = x W^T + b + (x A^T * s) B^T``.

Autograd on the plain formula computes two gradients for ``x`` (through W and
through A) and then adds them; here the second is accumulated in place into
the first, the frozen base weight gets no gradient, and the forward adds the
low-rank term into the base output without a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LoRALinear(torch.autograd.Function):
    """x: (N, in); w: (out, in); a: (R, in); b: (out, R); s: (R,) per-rank scales."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        out = F.linear(x, w, bias)
        h = F.linear(x, a) * s
        out.addmm_(h, b.t())
        ctx.save_for_backward(x, w, a, b, s, h)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, a, b, s, h = ctx.saved_tensors
        gh = (g @ b) * s
        gx = gw = gbias = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ w
            gx.addmm_(gh, a)
        if ctx.needs_input_grad[1]:
            gw = g.t() @ x
        if ctx.needs_input_grad[2]:
            gbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            ga = gh.t() @ x
        if ctx.needs_input_grad[4]:
            gb = g.t() @ h
        return gx, gw, gbias, ga, gb, None


def lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """``LoRALinear`` on inputs of any leading shape.

    Args:
        x: (..., in) inputs.
        w: (out, in) base weight.
        bias: (out,) base bias or None.
        a: (R, in) down factors, all adapters side by side.
        b: (out, R) up factors.
        s: (R,) per-rank scales.
    """
    y = LoRALinear.apply(x.reshape(-1, x.shape[-1]), w, bias, a, b, s)
    return y.view(*x.shape[:-1], y.shape[-1])
