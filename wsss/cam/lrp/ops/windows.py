"""torchvision Swin's fx-wrapped helpers as single nodes: shifted window attention (padding, the
cyclic shift, window partition, the q/k/v and output projections, relative position bias and
the shift mask) and patch merging's pad-and-gather.

Relevance (B*K, H, W, C) is moved like the values (pad, roll, partition and their inverses);
the projections use the composite's Linear rule and the attention the AttnLRP rules of
attention.py, the bias and the mask being constants added to the scores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from wsss.cam.lrp.composites import LayerInfo
from wsss.cam.lrp.ops.attention import attention_relevance
from wsss.cam.lrp.ops.layers import linear_map
from wsss.cam.lrp.ops.types import NodeContext, Shape, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute, propagate

_FUNCTIONAL = nn.Module()  # stands for the projections' module in the composite's LayerInfo


def _windows(x: Tensor, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """(N, H, W, C) -> (N, nW, T, C): padded to whole windows, shifted by -shift, partitioned."""
    n, h, w, c = x.shape
    pad_b, pad_r = (-h) % window[0], (-w) % window[1]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ph, pw = x.shape[1] // window[0], x.shape[2] // window[1]
    x = x.view(n, ph, window[0], pw, window[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, ph * pw, window[0] * window[1], c)


def _unwindows(
    x: Tensor, size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> Tensor:
    """The transpose of `_windows` (it only moves values): (N, nW, T, C) -> (N, H, W, C)."""
    n, c = x.shape[0], x.shape[-1]
    ph, pw = -(-size[0] // window[0]), -(-size[1] // window[1])
    x = x.view(n, ph, pw, window[0], window[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, ph * window[0], pw * window[1], c)
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, : size[0], : size[1]]


def _shift_mask(
    padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], like: Tensor
) -> Tensor:
    """The additive mask (nW, T, T) of shifted windows: -100 between tokens that came from
    different regions before the cyclic shift, as torchvision builds it."""
    regions = like.new_zeros(padded)
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    ids = _windows(regions[None, :, :, None], window, (0, 0))[0, :, :, 0]  # (nW, T)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.where(diff != 0, -100.0, 0.0).to(like.dtype)


def plan_shifted_window_attention(ctx: NodeContext) -> Step:
    names = (
        "input",
        "qkv_weight",
        "proj_weight",
        "relative_position_bias",
        "window_size",
        "num_heads",
        "shift_size",
        "attention_dropout",
        "dropout",
        "qkv_bias",
        "proj_bias",
        "logit_scale",
        "training",
    )
    args = ctx.bind(names, qkv_bias=None, proj_bias=None, logit_scale=None, training=True)
    if args["logit_scale"] is not None:
        raise UnsupportedOp("cosine attention (Swin V2's logit_scale)")
    if args["training"] is not False:
        raise UnsupportedOp("training mode (trace the model in eval mode)")
    x = ctx.signal(args["input"])
    tensors = ("qkv_weight", "proj_weight", "relative_position_bias", "qkv_bias", "proj_bias")
    for name in tensors:
        if ctx.is_signal(args[name]):
            raise UnsupportedOp(f"its {name} depends on the image")
    reads = (x,) + tuple(args[n] for n in tensors if isinstance(args[n], fx.Node))
    window, heads = tuple(args["window_size"]), args["num_heads"]
    info = lambda name: LayerInfo(f"{ctx.path}.{name}", _FUNCTIONAL, "linear", False, 0.5)  # noqa: E731
    qkv_rule, proj_rule = ctx.config.rule_for(info("qkv")), ctx.config.rule_for(info("proj"))

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        it = iter(values)
        xin = as_compute(next(it), r.dtype)
        got = {n: next(it) if isinstance(args[n], fx.Node) else args[n] for n in tensors}
        w_qkv, w_proj, bias, b_qkv, b_proj = (
            None if got[n] is None else got[n].detach().to(r.dtype) for n in tensors
        )
        b, h, w, c = xin.shape
        k = r.shape[0] // b
        padded = (h + (-h) % window[0], w + (-w) % window[1])
        shift = tuple(0 if window[i] >= padded[i] else args["shift_size"][i] for i in range(2))
        xw = _windows(xin, window, shift)  # (B, nW, T, C)
        n_windows, tokens = xw.shape[1], xw.shape[2]
        xw = xw.flatten(0, 1)  # (B·nW, T, C): one "image" per window
        qkv = F.linear(xw, w_qkv, b_qkv)
        q, kk, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        scale = (c // heads) ** -0.5
        mask = bias.reshape(1, heads, tokens, tokens)
        if any(shift):
            shifted = _shift_mask(padded, window, shift, xin)  # (nW, T, T)
            mask = (mask + shifted.unsqueeze(1).repeat(b, 1, 1, 1)).reshape(
                -1, heads, tokens, tokens
            )
        attn = torch.softmax(q * scale @ kk.transpose(-2, -1) + mask, -1)
        o = (attn @ v).transpose(1, 2).flatten(2)  # (B·nW, T, C)
        # relevance in the windows' layout, ordered (image, window, class)
        rw = _windows(r, window, shift).view(b, k, n_windows, tokens, c).transpose(1, 2)
        rw = rw.reshape(-1, tokens, c)
        r_o = propagate(proj_rule, linear_map(w_proj, b_proj), o, rw)
        r_heads = r_o.unflatten(-1, (heads, -1)).transpose(1, 2)
        r_q, r_k, r_v = attention_relevance(q, kk, v, r_heads, scale, mask)
        r_qkv = torch.stack([r_q, r_k, r_v], 0).permute(1, 3, 0, 2, 4).flatten(2)
        r_x = propagate(qkv_rule, linear_map(w_qkv, b_qkv), xw, r_qkv, qkv)  # (B·nW·K, T, C)
        r_x = (
            r_x.view(b, n_windows, k, tokens, c)
            .transpose(1, 2)
            .reshape(b * k, n_windows, tokens, c)
        )
        return [_unwindows(r_x, (h, w), window, shift)]

    return Step((x,), reads, backward)


def plan_patch_merging_pad(ctx: NodeContext) -> Step:
    """x (.., H, W, C) -> the 2×2 neighbours side by side (.., H/2, W/2, 4C), odd sizes padded:
    relevance goes back to the neighbour each channel block came from."""
    x = ctx.signal(ctx.args[0])

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        shape = values[0]
        h, w = shape[-3], shape[-2]
        full = r.new_zeros(*r.shape[:-3], h + h % 2, w + w % 2, r.shape[-1] // 4)
        for piece, (i, j) in zip(r.chunk(4, -1), ((0, 0), (1, 0), (0, 1), (1, 1))):
            full[..., i::2, j::2, :] = piece
        return [full[..., :h, :w, :]]

    return Step((x,), (Shape(x),), backward)
