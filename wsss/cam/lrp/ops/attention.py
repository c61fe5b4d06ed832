"""Attention (AttnLRP): the softmax rule, the uniform rule for products of two signals (q·kᵀ,
A·v), scaled dot-product attention as one fused op, and nn.MultiheadAttention as one module.

Relevance R is (B*K, ...), recorded values (B, ...); docs/ALGORITHMS.md derives each rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from wsss.cam.lrp.composites import LayerInfo
from wsss.cam.lrp.ops.common import reduce_to
from wsss.cam.lrp.ops.layers import linear_map
from wsss.cam.lrp.ops.types import NodeContext, Shape, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute, propagate

EPSILON = 1e-6  # the stabiliser of the products' denominators (as Rule.epsilon)


def _per_class(t: Tensor, batched: bool) -> Tensor:
    """A per-image tensor (B, ...) made to broadcast against (B, K, ...); constants as they are."""
    return t.unsqueeze(1) if batched else t


def stabilised(y: Tensor, eps: float = EPSILON) -> Tensor:
    """y moved away from 0 by eps with its sign (sign(0) = +1)."""
    return y + torch.where(y >= 0, eps, -eps)


def bilinear_relevance(
    a: Tensor,
    b: Tensor,
    r: Tensor,
    share: tuple[float, float] = (0.5, 0.5),
    batched: tuple[bool, bool] = (True, True),
    eps: float = EPSILON,
) -> tuple[Tensor, Tensor]:
    """Relevance of y = a @ b split between the factors, each by its gradient × input with ε.

    a, b: the factors (B, ..., n, m) and (B, ..., m, p), or constants without the batch
    dimension (batched False); r: (B*K, ..., n, p). share: the fraction each factor keeps
    (½ each for two signals; (1, 0) when b is a constant). Returns (R_a, R_b), each (B*K, ...)
    in its factor's shape (summed over broadcast dimensions).
    """
    n_images = next(t.shape[0] for t, is_b in zip((a, b), batched) if is_b)
    g = r.view(n_images, -1, *r.shape[1:]) / stabilised(a @ b, eps).unsqueeze(1)
    pa, pb = _per_class(a, batched[0]), _per_class(b, batched[1])
    ra = (share[0] * pa * (g @ pb.transpose(-2, -1))).flatten(0, 1) if share[0] else None
    rb = (share[1] * pb * (pa.transpose(-2, -1) @ g)).flatten(0, 1) if share[1] else None
    if ra is not None and batched[0]:
        ra = reduce_to(ra, a.shape)
    if rb is not None and batched[1]:
        rb = reduce_to(rb, b.shape)
    return ra, rb


def softmax_relevance(x: Tensor, r: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule R_in = x ⊙ (R − s ⊙ Σ_dim R), s = softmax(x): gradient × input
    with the input as the reference point. Masked inputs (−∞) get 0."""
    s = torch.softmax(x, dim)
    b = x.shape[0]
    rv = r.view(b, -1, *r.shape[1:])
    d = dim + x.dim() if dim < 0 else dim
    out = x.unsqueeze(1) * (rv - s.unsqueeze(1) * rv.sum(d + 1, keepdim=True))
    return torch.where(torch.isfinite(x).unsqueeze(1), out, 0.0).flatten(0, 1)


def attention_relevance(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Relevance (R_q, R_k, R_v) of O = softmax(q kᵀ·scale + mask) v, from r at O: the rules of
    the unfused form composed (A·v uniform, softmax, q·kᵀ uniform; mask and scale constants).

    The composition is written out so that everything that does not depend on the class is
    computed once per image: with G = (R ⊘ O_ε) vᵀ, the softmax rule on R_A = ½ A ⊙ G followed
    by the division of the q·kᵀ rule is F ⊙ (G − Σ_j A_j G_j), where F = ½ S ⊙ A ⊘ (q kᵀ·c)_ε
    (S the softmax input, 0 where masked) and Σ_j A_j G_j = Σ_d (R ⊘ O_ε) ⊙ O. Per class that
    leaves the four products of the gradient and two passes over the scores.
    """
    qs = q * scale
    scores = qs @ k.transpose(-2, -1)
    logits = scores if mask is None else scores + mask
    attn = torch.softmax(logits, -1)
    out = attn @ v
    finite = torch.where(torch.isfinite(logits), logits, 0.0)
    factor = (0.5 * finite * attn / stabilised(scores)).unsqueeze(1)  # (B, 1, ..., n, n)
    b = q.shape[0]
    g = r.view(b, -1, *r.shape[1:]) / stabilised(out).unsqueeze(1)  # (B, K, ..., n, d)
    r_v = 0.5 * v.unsqueeze(1) * _per_image_matmul(attn.transpose(-2, -1), g)
    g_scores = g @ v.unsqueeze(1).transpose(-2, -1)  # (B, K, ..., n, n)
    g_scores.sub_((g * out.unsqueeze(1)).sum(-1, keepdim=True)).mul_(factor)
    r_q = 0.5 * qs.unsqueeze(1) * (g_scores @ k.unsqueeze(1))
    r_k = 0.5 * k.unsqueeze(1) * (g_scores.transpose(-2, -1) @ qs.unsqueeze(1))
    return r_q.flatten(0, 1), r_k.flatten(0, 1), r_v.flatten(0, 1)


def _per_image_matmul(a: Tensor, g: Tensor) -> Tensor:
    """a (B, ..., n, m) @ g (B, K, ..., m, p) for every class, a not copied K times: the
    classes go side by side in the columns of one product per image."""
    k, p = g.shape[1], g.shape[-1]
    out = a @ g.movedim(1, -2).flatten(-2)  # (B, ..., n, K·p)
    return out.unflatten(-1, (k, p)).movedim(-2, 1)


# ---------------------------------------------------------------------------- the plans


def plan_softmax(ctx: NodeContext) -> Step:
    """softmax(x, dim) (function, method or nn.Softmax): AttnLRP's rule on the recorded input."""
    if ctx.module is not None:
        x, dim = ctx.signal(ctx.args[0]), ctx.module.dim
    else:
        args = ctx.bind(("input", "dim"), dim=None)
        x, dim = ctx.signal(args["input"]), args["dim"]
    if dim is None:
        raise UnsupportedOp("softmax without an explicit dim")
    if dim == 0:
        raise UnsupportedOp("it normalises along the batch dimension")

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        return [softmax_relevance(as_compute(values[0], r.dtype), r, dim)]

    return Step((x,), (x,), backward)


def plan_matmul(ctx: NodeContext) -> Step:
    """a @ b: the uniform rule for two signals (½ each), the whole share to a signal times a
    constant."""
    args = ctx.bind(("input", "other"))
    a, b = args["input"], args["other"]
    signal = (ctx.is_signal(a), ctx.is_signal(b))
    if not any(signal):
        raise UnsupportedOp("none of its inputs depends on the image")
    share = (0.5, 0.5) if all(signal) else (float(signal[0]), float(signal[1]))
    sources = tuple(v for v, s in zip((a, b), signal) if s)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        va, vb = (as_compute(v, r.dtype) for v in values)
        for v, s in zip((va, vb), signal):
            if s and v.dim() < 3 and all(signal):
                raise RuntimeError(
                    f"RelevanceCAM: node {ctx.node.name!r} ({ctx.path}) multiplies two signals "
                    f"of shapes {tuple(va.shape)} and {tuple(vb.shape)}; each needs the batch "
                    "dimension and two matrix dimensions"
                )
        ra, rb = bilinear_relevance(va, vb, r, share, signal)
        return [t for t, s in zip((ra, rb), signal) if s]

    return Step(sources, (a, b), backward)


def _sdpa_mask(
    args: dict[str, Any], values: dict[str, Tensor], q: Tensor, k: Tensor
) -> Tensor | None:
    """The additive mask of scaled dot-product attention (a float mask, a boolean mask where True
    keeps, or the causal mask)."""
    mask = values.get("attn_mask")
    if args.get("is_causal"):
        n, m = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        return torch.zeros(n, m, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)
    if mask is not None and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
    return None if mask is None else as_compute(mask, q.dtype)


def plan_sdpa(ctx: NodeContext) -> Step:
    """F.scaled_dot_product_attention as one op, its rule the composition of the unfused form."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = ctx.bind(names, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)
    if args.get("enable_gqa"):
        raise UnsupportedOp("grouped-query attention (enable_gqa=True)")
    if not isinstance(args["dropout_p"], (int, float)) or args["dropout_p"] != 0:
        raise UnsupportedOp("attention dropout (trace the model in eval mode)")
    mask_node = args["attn_mask"]
    if ctx.is_signal(mask_node):
        raise UnsupportedOp("its attention mask depends on the image")
    q, k, v = (ctx.signal(args[n], n) for n in names[:3])
    reads: tuple[Any, ...] = (q, k, v) + ((mask_node,) if isinstance(mask_node, fx.Node) else ())

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        vq, vk, vv = (as_compute(t, r.dtype) for t in values[:3])
        extra = {"attn_mask": values[3]} if len(values) > 3 else {}
        scale = args["scale"] if args["scale"] is not None else vq.shape[-1] ** -0.5
        mask = _sdpa_mask(args, extra, vq, vk)
        return list(attention_relevance(vq, vk, vv, r, scale, mask))

    return Step((q, k, v), reads, backward)


def plan_multihead_attention(ctx: NodeContext) -> Step:
    """nn.MultiheadAttention (batch_first, one packed or three projections, no mask) as one
    node: the composite's Linear rule for the projections, the attention rules between them.
    Its output is a tuple: relevance arrives for element 0, the attention output."""
    mha = ctx.module
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    args = ctx.bind(names, key_padding_mask=None, attn_mask=None, is_causal=False)
    if not mha.batch_first:
        raise UnsupportedOp("batch_first=False (the batch is not the first dimension)")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedOp("bias_k / bias_v / add_zero_attn")
    if args["key_padding_mask"] is not None or args["attn_mask"] is not None or args["is_causal"]:
        raise UnsupportedOp("a key padding mask, an attention mask or is_causal")
    sources = tuple(ctx.signal(args[n], n) for n in names[:3])
    heads = mha.num_heads
    layer = lambda name, m: LayerInfo(f"{ctx.path}.{name}", m, "linear", False, 0.5)  # noqa: E731
    rule = ctx.config.rule_for(layer("out_proj", mha.out_proj))

    def weights(r: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.detach().to(r.dtype).chunk(3)
        else:
            ws = [getattr(mha, f"{n}_proj_weight").detach().to(r.dtype) for n in "qkv"]
        bias = mha.in_proj_bias
        bs = bias.detach().to(r.dtype).chunk(3) if bias is not None else [None] * 3
        return list(zip(ws, bs))

    def heads_of(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    def backward(parts: dict[int, Tensor], values: list[Any]) -> list[Tensor | None]:
        r = parts.get(0)
        if r is None:
            return [None, None, None]
        xs = [as_compute(t, r.dtype) for t in values]
        projections = weights(r)
        ys = [F.linear(x, w, b) for x, (w, b) in zip(xs, projections)]
        q, k, v = (heads_of(y) for y in ys)
        scale = q.shape[-1] ** -0.5
        o = torch.softmax((q * scale) @ k.transpose(-2, -1), -1) @ v
        o = o.transpose(1, 2).flatten(2)
        w_out = mha.out_proj.weight.detach().to(r.dtype)
        b_out = mha.out_proj.bias.detach().to(r.dtype) if mha.out_proj.bias is not None else None
        r_o = propagate(rule, linear_map(w_out, b_out), o, r)
        r_heads = attention_relevance(q, k, v, heads_of(r_o), scale)
        out = []
        for name, x, (w, b), y, rh in zip(("q", "k", "v"), xs, projections, ys, r_heads):
            in_rule = ctx.config.rule_for(layer(f"in_proj.{name}", mha))
            out.append(propagate(in_rule, linear_map(w, b), x, rh.transpose(1, 2).flatten(2), y))
        return out

    return Step(sources, sources, backward)


def plan_additive_mask(ctx: NodeContext) -> Step:
    """scores + mask where the mask never depends on the pixels (timm's maybe_add_mask, whose
    mask is built from the scores' size and dtype only): all relevance to the scores."""
    scores = ctx.signal(ctx.args[0], "scores")
    return Step((scores,), (Shape(scores),), lambda r, v: [reduce_to(r, v[0])])
