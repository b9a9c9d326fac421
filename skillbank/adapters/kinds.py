"""The module kinds that can carry adapters, and the registry that finds them.

Each kind says only what differs: factor shapes, how its base op runs with a
given weight, and how the low-rank term joins that op's output. Merging,
the active set and dispatch live in ``AdapterLayer``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedModule
from .calls import MixPlan, RowPlan, current
from .functional import lora_linear
from .layer import AdapterLayer, Factors

ADAPTER_KINDS: dict[type[nn.Module], type[AdapterLayer]] = {}


def register_kind(base_type: type[nn.Module]):
    """Class decorator: ``base_type`` modules (and subclasses) get this layer.

    Args:
        base_type: the module class the decorated AdapterLayer subclass adapts.
    """

    def deco(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        ADAPTER_KINDS[base_type] = cls
        return cls

    return deco


def kind_for(module: nn.Module) -> type[AdapterLayer] | None:
    """The layer class for ``module``, found along its MRO (subclasses inherit support).

    Args:
        module: a module that may carry adapters.
    """
    for cls in type(module).__mro__:
        if cls in ADAPTER_KINDS:
            return ADAPTER_KINDS[cls]
    return None


def _flat_rows(x: torch.Tensor, out: torch.Tensor):
    return x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])


class _LinearMap(AdapterLayer):
    """Shared by kinds whose adapted op is a matrix product on the last dim."""

    linear_input = True
    stack_transposed = True

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add
    ) -> torch.Tensor:
        """``x W^T + b`` plus ``add``'s low-rank term; the active set runs fused when it can."""
        if add == self.lowrank_add and self._fusable(x, weight):
            pairs = [(self.factors_2d(n), w * self.scaling[n]) for n, w in self.active]
            a = torch.cat([a for (a, _), _ in pairs]) if len(pairs) > 1 else pairs[0][0][0]
            b = torch.cat([b for (_, b), _ in pairs], dim=1) if len(pairs) > 1 else pairs[0][0][1]
            s = torch.cat([a.new_full((a_.shape[0],), c) for (a_, _), c in pairs])
            return lora_linear(x, weight, bias, a, b, s)
        out = F.linear(x, weight, bias)
        return out if add is None else add(x, out)

    def _fusable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # Dropout masks and autocast casts belong to the generic path.
        if torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype:
            return False
        return all(
            isinstance(self.lora_dropout[n], nn.Identity) and self.lora_A[n].dtype == x.dtype
            for n, _ in self.active
        )

    def lowrank_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x2, o2 = _flat_rows(x, out)
        for name, weight in self.active:
            a, b = self.factors_2d(name)
            h = F.linear(self.lora_dropout[name](x2).to(a.dtype), a)
            h = h * (weight * self.scaling[name])  # scale the r-wide tensor, not the output
            # in place: the base op's fresh output is not needed by its backward,
            # and accumulating into it saves copying a rows x d_out tensor
            o2.addmm_(h.to(o2.dtype), b.t().to(o2.dtype))
        return out

    def mixed_add(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        # BGMV: gather each row's (A, B) from the stacks, then two batched matmuls.
        self._check_rows("mixed_batch was given", plan.local.shape[0], x)
        a_t, b_t, rows = self.row_stacks(plan)  # (K+1, in, r), (K+1, r, out): no copies in bmm
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(a_t.dtype)
        h = torch.bmm(x3, a_t.index_select(0, rows))
        o3 = out.view(n, -1, out.shape[-1])
        o3.baddbmm_(h.to(o3.dtype), b_t.index_select(0, rows).to(o3.dtype))
        return out

    def mix_add(self, x: torch.Tensor, out: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        a, b, unit = self.concatenated(plan.names)
        n = x.shape[0]
        h = x.reshape(n, -1, x.shape[-1]).to(a.dtype) @ a.t()  # (n, tokens, R)
        h = h * plan.weights[:, unit].unsqueeze(1).to(h.dtype)
        out.view(n, -1, out.shape[-1]).add_((h @ b.t()).to(out.dtype))
        return out


@register_kind(nn.Linear)
class LinearAdapter(_LinearMap):
    @classmethod
    def fans(cls, module: nn.Linear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def new_factors(self, rank):
        m = self.base
        return torch.empty(rank, m.in_features), torch.zeros(m.out_features, rank)

    def factors_2d(self, name):
        return self.lora_A[name], self.lora_B[name]

    def run(self, weight, add, x):
        return self.project(x, weight, self.base.bias, add)


@register_kind(nn.Conv2d)
class Conv2dAdapter(AdapterLayer):
    """A: a conv with the base's kernel, stride and padding into r channels; B: 1x1."""

    @classmethod
    def check(cls, module: nn.Conv2d, rank: int, path: str) -> None:
        if module.groups != 1:
            raise UnsupportedModule(
                f"'{path}' is a grouped Conv2d (groups={module.groups}); only groups=1 is supported"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedModule(
                f"'{path}' uses padding_mode={module.padding_mode!r}; only 'zeros' is supported"
            )
        super().check(module, rank, path)

    @classmethod
    def fans(cls, module: nn.Conv2d) -> tuple[int, int]:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels

    def new_factors(self, rank):
        m = self.base
        return torch.empty(rank, m.in_channels, *m.kernel_size), torch.zeros(
            m.out_channels, rank, 1, 1
        )

    def factors_2d(self, name):
        a, b = self.lora_A[name], self.lora_B[name]
        return a.flatten(1), b.flatten(1)

    def _down(self, x, a, groups=1):
        m = self.base
        return F.conv2d(x, a, None, m.stride, m.padding, m.dilation, groups)

    def run(self, weight, add, x):
        out = self.base._conv_forward(x, weight, self.base.bias)
        return out if add is None else add(x, out)

    def lowrank_add(self, x, out):
        for name, weight in self.active:
            a, b = self.lora_A[name], self.lora_B[name]
            h = self._down(self.lora_dropout[name](x).to(a.dtype), a) * (
                weight * self.scaling[name]
            )
            out.add_(F.conv2d(h, b).to(out.dtype))  # in place, as for linear maps
        return out

    def mixed_add(self, x, out, plan):
        # One grouped conv over the whole batch: row i is group i with its own kernels.
        self._check_rows("mixed_batch was given", plan.local.shape[0], x)
        a_stack, b_stack, rows = self.row_stacks(plan)
        n, c, hgt, wid = x.shape
        r = a_stack.shape[1]
        a = a_stack[rows].reshape(n * r, c, *self.base.kernel_size)
        h = self._down(x.reshape(1, n * c, hgt, wid).to(a.dtype), a, groups=n)
        b = b_stack[rows].reshape(n * out.shape[1], r, 1, 1)
        return out.add_(F.conv2d(h, b, groups=n).view(out.shape).to(out.dtype))

    def mix_add(self, x, out, plan):
        a, b, unit = self.concatenated(plan.names)
        h = self._down(x.to(a.dtype), a.view(len(unit), -1, *self.base.kernel_size))
        h = h * plan.weights[:, unit, None, None].to(h.dtype)
        return out.add_(F.conv2d(h, b[:, :, None, None]).to(out.dtype))


@register_kind(nn.MultiheadAttention)
class MultiheadAttentionAdapter(_LinearMap):
    """Adapts the packed in-projection: q, k and v each get their own (A, B).

    Stored as A: (3, r, E) and B: (3, E, r); as one linear map this is
    ``cat(B_q A_q, B_k A_k, B_v A_v)``, i.e. A stacked and B block-diagonal.
    With adapters active the attention runs here (in-projection, scaled
    dot-product attention, then ``out_proj`` called as a module so its own
    adapter applies); otherwise the native module runs untouched.
    """

    sites = ("[q]", "[k]", "[v]")
    rank_axes = (1, 2)

    @classmethod
    def check(cls, module: nn.MultiheadAttention, rank: int, path: str) -> None:
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedModule(
                f"'{path}': nn.MultiheadAttention with kdim/vdim != embed_dim, add_bias_kv or "
                "add_zero_attn is not supported"
            )
        super().check(module, rank, path)

    @classmethod
    def fans(cls, module: nn.MultiheadAttention) -> tuple[int, int]:
        return module.embed_dim, module.embed_dim

    def base_weight(self):
        return self.base.in_proj_weight

    def new_factors(self, rank):
        e = self.base.embed_dim
        return torch.empty(3, rank, e), torch.zeros(3, e, rank)

    def factors_2d(self, name):
        a, b = self.lora_A[name], self.lora_B[name]
        return a.reshape(-1, a.shape[-1]), torch.block_diag(*b.unbind(0))

    def split_sites(self, name, a, b) -> list[Factors]:
        s = self.scaling[name]
        return [Factors(site, a[i], b[i], 0, 1, s) for i, site in enumerate(self.sites)]

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        call = current(self)
        if call is None:
            native = not self.active or self.merged is not None
        else:  # off, or none of a mixed batch's adapters here (merged: the wrapper raises)
            native = self.merged is None and (
                call.off or (call.mix is None and not call.rows.names)
            )
        if native:
            return self.base(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return super().forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )

    def run(
        self,
        weight,
        add,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        m = self.base
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, heads = m.embed_dim, m.num_heads

        def project(x):
            return self.project(x, weight, m.in_proj_bias, add)

        if query is key and key is value:
            q, k, v = project(query).chunk(3, dim=-1)
        else:
            q = project(query)[..., :e]
            k, v = (
                project(key)[..., e:].chunk(2, dim=-1)
                if key is value
                else (project(key)[..., e : 2 * e], project(value)[..., 2 * e :])
            )
        n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, -1, heads, e // heads).transpose(1, 2) for t in (q, k, v))
        mask = _attention_mask(attn_mask, key_padding_mask, n, heads, lq, lk, q.dtype)
        p = m.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(
                    torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            attn = scores.softmax(-1)
            out = F.dropout(attn, p) @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
            weights = None
        out = m.out_proj(out.transpose(1, 2).reshape(n, lq, e))
        return (out if m.batch_first else out.transpose(0, 1)), weights


def _attention_mask(attn_mask, key_padding_mask, n, heads, lq, lk, dtype):
    """Both masks of ``nn.MultiheadAttention`` as one additive float mask (or None)."""

    def additive(m):
        return (
            torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
            if m.dtype == torch.bool
            else m.to(dtype)
        )

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, heads, lq, lk) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(n, 1, 1, lk)
        mask = kpm if mask is None else mask + kpm
    return mask
