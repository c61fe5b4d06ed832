"""Relevance-CAM on vision transformers (AttnLRP rules): each rule against its closed form, a
small ViT written here against an autograd oracle, the conservation ledger, batching, layers in
one sweep, token maps, refusals, and timm / torchvision ViTs with random weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss.cam import GradCAM, LiftCAM, RelevanceCAM, Rule, TokenLayout, to_grid, token_layout
from wsss.cam.lrp.ops.attention import (
    EPSILON,
    attention_relevance,
    bilinear_relevance,
    softmax_relevance,
)

C = 5
G = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=G, dtype=dtype)


# ---- each rule against its closed form, element by element ---------------------------------


def test_softmax_rule_closed_form():
    x, r = randn(1, 2, 4), randn(3, 2, 4)  # B = 1 image, K = 3 classes
    got = softmax_relevance(x, r, -1)
    for k, row, i in itertools.product(range(3), range(2), range(4)):
        s = [math.exp(float(x[0, row, j])) for j in range(4)]
        s_i = s[i] / sum(s)
        total = sum(float(r[k, row, j]) for j in range(4))
        want = float(x[0, row, i]) * (float(r[k, row, i]) - s_i * total)
        assert abs(float(got[k, row, i]) - want) < 1e-12


def test_softmax_rule_masked_entries_get_zero_not_nan():
    x = randn(1, 3, 4)
    x[0, :, 3] = -math.inf
    r = torch.softmax(x, -1) * randn(1, 3, 4)  # no relevance where the softmax output is 0
    got = softmax_relevance(x, r, -1)
    assert torch.isfinite(got).all() and (got[..., 3] == 0).all()


def test_bilinear_rule_closed_form_and_conservation():
    a, b, r = randn(2, 3, 4), randn(2, 4, 5), randn(2 * 2, 3, 5)  # B = 2, K = 2
    ra, rb = bilinear_relevance(a, b, r)
    y = a @ b
    for n, j, i in itertools.product(range(4), range(3), range(4)):
        img = n // 2
        want = 0.5 * sum(
            float(a[img, j, i] * b[img, i, k] * r[n, j, k])
            / (float(y[img, j, k]) + math.copysign(EPSILON, float(y[img, j, k])))
            for k in range(5)
        )
        assert abs(float(ra[n, j, i]) - want) < 1e-10
    for n, i, k in itertools.product(range(4), range(4), range(5)):
        img = n // 2
        want = 0.5 * sum(
            float(a[img, j, i] * b[img, i, k] * r[n, j, k])
            / (float(y[img, j, k]) + math.copysign(EPSILON, float(y[img, j, k])))
            for j in range(3)
        )
        assert abs(float(rb[n, i, k]) - want) < 1e-10
    ratio = (y / (y + EPSILON * torch.where(y >= 0, 1.0, -1.0))).repeat_interleave(2, 0)
    torch.testing.assert_close(ra.sum((1, 2)) + rb.sum((1, 2)), (r * ratio).sum((1, 2)))


def test_bilinear_rule_with_a_constant_factor_gives_it_nothing():
    a, w, r = randn(2, 3, 4), randn(4, 5), randn(2, 3, 5)
    ra, rw = bilinear_relevance(a, w, r, share=(1.0, 0.0), batched=(True, False))
    assert rw is None
    y = a @ w
    want = a * ((r / (y + EPSILON * torch.where(y >= 0, 1.0, -1.0))) @ w.t())
    torch.testing.assert_close(ra, want)


def test_attention_rule_composes_the_unfused_rules():
    q, k, v = randn(1, 2, 3, 4), randn(1, 2, 3, 4), randn(1, 2, 3, 4)
    r = randn(2, 2, 3, 4)
    rq, rk, rv = attention_relevance(q, k, v, r, 0.5)
    qs = q * 0.5
    scores = qs @ k.transpose(-2, -1)
    attn = torch.softmax(scores, -1)
    r_attn, want_v = bilinear_relevance(attn, v, r)
    r_scores = softmax_relevance(scores, r_attn, -1)
    want_q, want_kt = bilinear_relevance(qs, k.transpose(-2, -1), r_scores)
    torch.testing.assert_close(rv, want_v)
    torch.testing.assert_close(rq, want_q)
    torch.testing.assert_close(rk, want_kt.transpose(-2, -1))


def test_attention_rule_with_a_mask_and_several_images_and_classes():
    """The per-image factors of the composed rule against the unfused rules node by node, with
    an additive mask (a finite bias and −∞ entries), 2 images and 3 classes."""
    b, k, heads, n, d = 2, 3, 2, 5, 4
    q, kk, v = randn(b, heads, n, d), randn(b, heads, n, d), randn(b, heads, n, d)
    r = randn(b * k, heads, n, d)
    mask = randn(1, heads, n, n)
    mask[..., 1, 3] = -math.inf
    mask[..., 4, 0] = -math.inf
    rq, rk, rv = attention_relevance(q, kk, v, r, 0.3, mask)
    qs = q * 0.3
    scores = qs @ kk.transpose(-2, -1)
    attn = torch.softmax(scores + mask, -1)
    r_attn, want_v = bilinear_relevance(attn, v, r)
    r_scores = softmax_relevance(scores + mask, r_attn, -1)
    want_q, want_kt = bilinear_relevance(qs, kk.transpose(-2, -1), r_scores)
    for got, want in ((rv, want_v), (rq, want_q), (rk, want_kt.transpose(-2, -1))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---- a small ViT written here, and an independent oracle ------------------------------------
#
# LRP as the gradient of a modified forward: each rule's surrogate keeps the value and carries
# the rule in its gradient, y' = z·[y/z] + [y − z·[y/z]] with [·] detached, so activation ⊙
# gradient at a tensor is its relevance. The softmax needs no surrogate: its rule *is* gradient
# × input. The products use z = ½(a·[b] + [a]·b) with y/y_ε; LayerNorm and GELU pass
# relevance through (z = their input); a constant added (position embedding) gets nothing.


def surrogate(z, y):
    ratio = torch.where(z != 0, y / torch.where(z != 0, z, 1.0), 0.0).detach()
    return z * ratio + (y - z * ratio).detach()


def zplus_linear(lin, x):
    w = lin.weight
    z = x.clamp(min=0) @ w.clamp(min=0).t() + x.clamp(max=0) @ w.clamp(max=0).t()
    return surrogate(z, lin(x))


def epsilon_linear(lin, x):
    """The ε-rule with the bias counted: R_in = x ⊙ Wᵀ(R ⊘ y_ε), y the layer's output."""
    y = lin(x)
    z = x @ lin.weight.t()
    ratio = (y / (y + EPSILON * torch.where(y >= 0, 1.0, -1.0))).detach()
    return z * ratio + (y - z * ratio).detach()


def uniform_matmul(a, b):
    y = a @ b
    z = 0.5 * (a @ b.detach() + a.detach() @ b)  # the value of y, half the gradient to each
    ratio = (y / (y + EPSILON * torch.where(y >= 0, 1.0, -1.0))).detach()
    return z * ratio + (y - z * ratio).detach()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused, self.scale = heads, fused, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.scores, self.probs = nn.Identity(), nn.Identity()  # capture points for the ledger

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.probs(self.scores((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            o = attn @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def lrp_forward(self, x, keep, path, lin=zplus_linear):
        b, n, c = x.shape
        qkv = lin(self.qkv, x)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = keep(f"{path}.scores", uniform_matmul(q * self.scale, k.transpose(-2, -1)))
        attn = keep(f"{path}.probs", scores.softmax(dim=-1))
        o = uniform_matmul(attn, v)
        return keep(path, lin(self.proj, o.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, fused: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, 2, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    def lrp_forward(self, x, keep, path, lin=zplus_linear):
        x = x + self.attn.lrp_forward(surrogate(x, self.norm1(x)), keep, f"{path}.attn", lin)
        h = lin(self.fc1, surrogate(x, self.norm2(x)))
        return keep(path, x + lin(self.fc2, surrogate(h, self.act(h))))


class TinyViT(nn.Module):
    """Patch embedding, a class token, position embeddings, two blocks, LayerNorm, a class-token
    (or GAP over patch tokens) linear head."""

    def __init__(self, fused: bool = False, dim: int = 8, pool: str = "token"):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 1 + 16, dim) * 0.5)
        self.blocks = nn.Sequential(Block(dim, fused), Block(dim, fused))
        self.norm, self.head, self.pool = nn.LayerNorm(dim), nn.Linear(dim, C), pool
        self.num_prefix_tokens, self.patch_size = 1, 4

    def embed(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1)

    def pooled(self, t):
        return t[:, 0] if self.pool == "token" else t[:, 1:].mean(1)

    def forward(self, x):
        return self.head(self.pooled(self.norm(self.blocks(self.embed(x) + self.pos))))

    def lrp_forward(self, x, keep, lin=zplus_linear):
        t = self.embed(x)
        t = surrogate(t, t + self.pos)  # the position embedding is a bias: no relevance
        for i, block in enumerate(self.blocks):
            t = block.lrp_forward(t, keep, f"blocks.{i}", lin)
        n = surrogate(t, self.norm(t))
        if self.pool == "token":
            return lin(self.head, n[:, 0])
        s = n[:, 1:]  # z⁺ through the mean, sign-aware: in proportion to s⁺ (s⁻ where < 0)
        p = s.mean(1)
        z = torch.where(p >= 0, s.clamp(min=0).mean(1), s.clamp(max=0).mean(1))
        return lin(self.head, surrogate(z, p))


def tiny_vit(fused: bool = False, pool: str = "token") -> TinyViT:
    torch.manual_seed(0)
    net = TinyViT(fused, pool=pool).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)  # scores of order 1, so the softmax matters
    return net


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
T = torch.tensor([[1, 3], [2, 0]])
LAYERS = ["blocks.0", "blocks.0.attn", "blocks.1.attn.scores", "blocks.1.attn.probs", "blocks.1"]


def oracle(net, x, t, names, lin=zplus_linear):
    kept = {}

    def keep(name, tensor):
        tensor.retain_grad()
        kept[name] = tensor
        return tensor

    logits = net.lrp_forward(x, keep, lin)
    torch.testing.assert_close(logits, net(x))  # the surrogates keep every value
    seed = torch.zeros_like(logits).scatter_(1, t[:, None], 1.0) / logits.gather(1, t[:, None])
    logits.backward(seed)
    return {name: kept[name].detach() * kept[name].grad for name in names}


def test_small_vit_matches_autograd_oracle():
    net = tiny_vit()
    t = torch.tensor([1, 4])
    with RelevanceCAM(net, LAYERS, preset="lrp") as cam:
        got = cam.relevance(X, t)
    want = oracle(net, X, t, LAYERS)
    for layer in LAYERS:
        torch.testing.assert_close(got[layer][1][:, 0], want[layer], rtol=1e-6, atol=1e-9)


def test_small_vit_gap_head_matches_autograd_oracle():
    net = tiny_vit(pool="mean")
    t = torch.tensor([0, 2])
    with RelevanceCAM(net, ["blocks.1", "blocks.0"], preset="lrp") as cam:
        got = cam.relevance(X, t)
    want = oracle(net, X, t, ["blocks.1", "blocks.0"])
    for layer in want:
        torch.testing.assert_close(got[layer][1][:, 0], want[layer], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_small_vit_with_epsilon_on_linear_layers_matches_autograd_oracle(fused):
    """The ε-rule with the bias counted (the attnlrp preset's Linear rule), which takes its
    denominator from the recorded Linear outputs, against the oracle's ε surrogate."""
    net = tiny_vit(fused=fused)
    t = torch.tensor([1, 4])
    with RelevanceCAM(
        net, LAYERS[:2] + LAYERS[4:], preset="lrp", linear=Rule("epsilon", bias=1.0)
    ) as cam:
        got = cam.relevance(X, t)
    want = oracle(net, X, t, LAYERS[:2] + LAYERS[4:], lin=epsilon_linear)
    for layer in want:
        torch.testing.assert_close(got[layer][1][:, 0], want[layer], rtol=1e-6, atol=1e-9)


def test_fused_attention_equals_unfused():
    fused, unfused = tiny_vit(fused=True), tiny_vit(fused=False)
    layers = ["blocks.0", "blocks.1"]
    with RelevanceCAM(fused, layers, preset="lrp") as a:
        ra = a.relevance(X, T)
    with RelevanceCAM(unfused, layers, preset="lrp") as b:
        rb = b.relevance(X, T)
    for layer in layers:
        torch.testing.assert_close(ra[layer][1], rb[layer][1], rtol=1e-9, atol=1e-12)


def test_conservation_ledger_at_each_block():
    """Σ R(block input) = Σ R(block output) − what the softmax absorbs (Σ R(probs) − Σ R(scores)),
    up to the ε of the products; the last block carries exactly the start relevance.

    The Linear layers use the ε-rule without bias here: z⁺ drops the relevance of an output whose
    every contribution is negative (likely somewhere with 8 channels), which is not the
    attention's doing."""
    net = tiny_vit()
    layers = ["blocks.0", "blocks.1"] + [
        f"blocks.{i}.attn.{p}" for i in range(2) for p in ("scores", "probs")
    ]
    linear = Rule("epsilon", epsilon=1e-12, bias=0.0)
    with RelevanceCAM(net, layers, preset="lrp", linear=linear) as cam:
        rel = cam.relevance(X, T)
    total = {layer: rel[layer][1].flatten(2).sum(2) for layer in layers}
    torch.testing.assert_close(total["blocks.1"], torch.ones_like(total["blocks.1"]))
    absorbed = total["blocks.1.attn.probs"] - total["blocks.1.attn.scores"]
    assert absorbed.abs().min() > 1e-3  # the softmax does absorb: plain conservation fails
    torch.testing.assert_close(total["blocks.0"], total["blocks.1"] - absorbed, rtol=1e-4, atol=0)


def assert_batched_equals_one_by_one(cam, layers):
    """The (B=2, K=2) call's maps equal those of each image and class alone; returns them."""
    maps = cam(X, T)
    for b, k in itertools.product(range(2), range(2)):
        alone = cam(X[b : b + 1], T[b, k : k + 1])
        for layer in layers:
            torch.testing.assert_close(maps[layer][b, k], alone[layer][0, 0])
    return maps


def test_batched_equals_one_at_a_time_and_layers_in_one_sweep():
    net = tiny_vit()
    layers = ["blocks.0", "blocks.1"]
    with RelevanceCAM(net, layers) as cam:
        maps = assert_batched_equals_one_by_one(cam, layers)
    for layer in layers:
        with RelevanceCAM(net, [layer]) as cam:
            torch.testing.assert_close(cam(X, T)[layer], maps[layer])


def test_token_map_is_relevance_weighted_patch_tokens():
    net = tiny_vit()
    with RelevanceCAM(net, ["blocks.1"]) as cam:
        a, r = cam.relevance(X, T)["blocks.1"]
        maps = cam(X, T)["blocks.1"]
    assert maps.shape == (2, 2, 4, 4)
    alpha = r.sum(2)  # over all 17 tokens, the class token included
    want = torch.einsum("bkc,bnc->bkn", alpha, a[:, 1:]).view(2, 2, 4, 4)
    torch.testing.assert_close(maps, want)


@pytest.mark.parametrize("layer", ["blocks.1", "blocks.0"])
def test_position_weights_map_is_the_token_relevance_of_the_autograd_oracle(layer):
    """weights="position": each patch token's map value is its relevance summed over channels,
    here the gradient × input of the oracle's surrogate net (GAP head, one-hot start), which the
    channel-wide α·A map of the same relevance does not equal."""
    net = tiny_vit(pool="mean")
    t = torch.tensor([0, 2])
    with RelevanceCAM(net, [layer], preset="lrp", weights="position") as cam:
        maps = cam(X, t)[layer]
    with RelevanceCAM(net, [layer], preset="lrp") as cam:
        channel_wide = cam(X, t)[layer]
    relevance = oracle(net, X, t, [layer])[layer]  # (B, 17, C)
    want = relevance[:, 1:].sum(-1).view(2, 1, 4, 4)
    torch.testing.assert_close(maps, want, rtol=1e-6, atol=1e-9)
    assert (channel_wide - want).abs().max() > 1e-2 * want.abs().max()


def test_unsupported_attention_variant_fails_at_construction_naming_the_node():
    class EinsumAttention(Attention):
        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3).unbind(0)
            attn = torch.einsum("bnc,bmc->bnm", q, k).softmax(-1)
            return self.proj(attn @ v)

    net = tiny_vit()
    net.blocks[1].attn = EinsumAttention(8, 2, False).double()
    with pytest.raises(NotImplementedError) as info:
        RelevanceCAM(net, ["blocks.0"])
    message = str(info.value)
    for part in ("'einsum'", "torch.functional.einsum", "module 'blocks.1.attn'", "register_rule"):
        assert part in message, (part, message)
    RelevanceCAM(net, ["blocks.1"])  # above the einsum: fine


# ---- token layouts --------------------------------------------------------------------------


def test_to_grid_drops_prefix_tokens_row_major():
    tokens = torch.arange(21.0).view(1, 7, 3)
    layout = TokenLayout(prefix_tokens=1, patch_size=(4, 4))
    grid = to_grid(tokens, (8, 12), layout)  # 2 x 3 patches after one prefix token
    assert grid.shape == (1, 3, 2, 3)
    for i, j in itertools.product(range(2), range(3)):
        torch.testing.assert_close(grid[0, :, i, j], tokens[0, 1 + 3 * i + j])
    lead = to_grid(tokens.unsqueeze(1).expand(1, 4, 7, 3), (8, 12), layout, lead=2)
    assert lead.shape == (1, 4, 3, 2, 3) and torch.equal(lead[0, 2], grid[0])
    channels_last = torch.randn(1, 2, 3, 5)
    torch.testing.assert_close(
        to_grid(channels_last, (8, 12), TokenLayout(channels_last=True)),
        channels_last.permute(0, 3, 1, 2),
    )
    with pytest.raises(ValueError, match="do not fit"):
        to_grid(tokens, (16, 16), layout)


def timm_model(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=C, **kwargs).eval()


def test_token_layouts_of_timm_and_torchvision_models():
    assert token_layout(timm_model("deit_tiny_patch16_224", img_size=32)) == TokenLayout(
        1, (16, 16)
    )
    distilled = timm_model("deit_tiny_distilled_patch16_224", img_size=32)
    assert token_layout(distilled) == TokenLayout(2, (16, 16))
    tv = torchvision.models.vit_b_32(weights=None, num_classes=C, image_size=64)
    assert token_layout(tv) == TokenLayout(1, (32, 32))
    assert token_layout(torchvision.models.resnet18(weights=None)) == TokenLayout()


# ---- real models, random weights, small sizes -------------------------------------------------


def torchvision_vit(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=C, image_size=64).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)  # torchvision starts the head at zero
    return model


REAL = [
    pytest.param(
        lambda: timm_model("deit_tiny_patch16_224", img_size=64),
        "blocks",
        id="deit_tiny_64",
    ),
    pytest.param(
        lambda: timm_model("vit_small_patch16_224", img_size=64), "blocks", id="vit_small_64"
    ),
    pytest.param(
        lambda: torchvision_vit("vit_b_16"), "encoder.layers.encoder_layer_", id="vit_b_16"
    ),
    pytest.param(
        lambda: torchvision_vit("vit_b_32"), "encoder.layers.encoder_layer_", id="vit_b_32"
    ),
]


@pytest.mark.parametrize("build,prefix", REAL)
def test_real_vits_batching_layers_and_last_block_conservation(build, prefix):
    model = build()
    sep = "." if prefix == "blocks" else ""
    layers = [f"{prefix}{sep}{i}" for i in (3, 7, 11)]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # the signed residual split amplifies float32 rounding where a + b nearly cancels; the
    # positive split does not, so batched and single runs can be compared at 1e-4
    options = dict(preset="lrp", residual="positive")
    with RelevanceCAM(model, layers, **options) as cam:
        rel = cam.relevance(x, T)
        maps = cam(x, T)
        last = rel[layers[-1]][1].flatten(2).sum(2)  # head: LayerNorm, a token, z⁺ Linear
        torch.testing.assert_close(last, torch.ones_like(last), rtol=1e-4, atol=0)
        grid = 64 // token_layout(model).patch_size[0]
        for layer in layers:
            assert maps[layer].shape == (2, 2, grid, grid) and torch.isfinite(maps[layer]).all()
        alone = cam(x[1:], T[1, 1:])
    for layer in layers:
        scale = maps[layer].abs().max()
        assert (alone[layer][0, 0] - maps[layer][1, 1]).abs().max() <= 1e-4 * scale
    with RelevanceCAM(model, [layers[0]], **options) as cam:
        one = cam(x, T)[layers[0]]
        assert (one - maps[layers[0]]).abs().max() <= 1e-4 * maps[layers[0]].abs().max()


def test_timm_fused_and_unfused_attention_agree_in_float64():
    fused = timm_model("deit_tiny_patch16_224", img_size=32).double()
    unfused = timm_model("deit_tiny_patch16_224", img_size=32).double()
    for block in unfused.blocks:
        block.attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layers = ["blocks.2", "blocks.9"]
    with (
        RelevanceCAM(fused, layers, preset="lrp") as a,
        RelevanceCAM(unfused, layers, preset="lrp") as b,
    ):
        ra, rb = a.relevance(x, T[:1]), b.relevance(x, T[:1])
    for layer in layers:
        torch.testing.assert_close(ra[layer][1], rb[layer][1], rtol=1e-8, atol=1e-12)


def test_gradcam_on_tokens_is_the_reshape_transform():
    model = timm_model("deit_tiny_patch16_224", img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with GradCAM(model, ["blocks.11"]) as cam:
        maps = cam(x, T)["blocks.11"]
        _, acts, grads = cam.target_gradients(x, T)
    a = acts["blocks.11"].detach()[:, 1:]  # (B, 4, C): the class token dropped
    for k in range(2):
        g = grads[k][0][:, 1:]
        want = torch.einsum("bc,bnc->bn", g.mean(1), a).view(2, 2, 2)
        torch.testing.assert_close(maps[:, k], want)


# ---- Swin: a small torchvision Swin against the same kind of oracle --------------------------


def region_ids(padded, window, shift):
    """Which of the 3×3 regions of the padded map (split at −window and −shift) each position is
    in: tokens of different regions must not attend to each other after the cyclic shift."""
    rows = torch.arange(padded[0])
    cols = torch.arange(padded[1])
    rh = (rows >= padded[0] - window[0]).long() + (rows >= padded[0] - shift[0]).long()
    rw = (cols >= padded[1] - window[1]).long() + (cols >= padded[1] - shift[1]).long()
    return rh[:, None] * 3 + rw[None, :]


def window_attention_lrp(attn, x):
    b, h, w, c = x.shape
    window, heads = attn.window_size, attn.num_heads
    pad_b, pad_r = (-h) % window[0], (-w) % window[1]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if window[i] >= (ph, pw)[i] else attn.shift_size[i] for i in range(2)]
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))

    def part(t):
        t = t.reshape(t.shape[0], ph // window[0], window[0], pw // window[1], window[1], -1)
        return t.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], t.shape[-1])

    xw = part(x)
    qkv = zplus_linear(attn.qkv, xw)
    q, k, v = qkv.reshape(xw.shape[0], xw.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    scores = uniform_matmul(q * (c // heads) ** -0.5, k.transpose(-2, -1))
    shifted = scores + attn.get_relative_position_bias()
    if any(shift):
        ids = part(region_ids((ph, pw), window, shift)[None, :, :, None].double())[..., 0]
        mask = torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)  # (nW, T, T)
        shifted = shifted + mask.repeat(b, 1, 1).unsqueeze(1)
    probs = surrogate(scores, shifted).softmax(-1)  # bias and mask: constants
    o = uniform_matmul(probs, v).transpose(1, 2).reshape(xw.shape[0], xw.shape[1], c)
    o = zplus_linear(attn.proj, o)
    o = o.view(b, ph // window[0], pw // window[1], window[0], window[1], c)
    o = o.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if any(shift):
        o = torch.roll(o, (shift[0], shift[1]), (1, 2))
    return o[:, :h, :w]


def swin_block_lrp(block, x):
    x = x + window_attention_lrp(block.attn, surrogate(x, block.norm1(x)))
    fc1, act, fc2 = block.mlp[0], block.mlp[1], block.mlp[3]
    u = zplus_linear(fc1, surrogate(x, block.norm2(x)))
    return x + zplus_linear(fc2, surrogate(u, act(u)))


def swin_lrp_forward(model, x, keep):
    f = model.features
    h = f[0](x)  # below the lowest captured layer: plain
    for block in f[1]:
        h = swin_block_lrp(block, h)
    h = keep("features.1", h)
    h = F.pad(h, (0, 0, 0, h.shape[2] % 2, 0, h.shape[1] % 2))
    h = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], -1)
    h = zplus_linear(f[2].reduction, surrogate(h, f[2].norm(h)))
    for block in f[3]:
        h = swin_block_lrp(block, h)
    h = keep("features.3", h)
    n = surrogate(h, model.norm(h)).permute(0, 3, 1, 2)
    p = n.mean((2, 3))
    z = torch.where(p >= 0, n.clamp(min=0).mean((2, 3)), n.clamp(max=0).mean((2, 3)))
    return zplus_linear(model.head, surrogate(z, p))


def tiny_swin():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=C,
    )
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 0.5)
    return model


def test_small_swin_matches_autograd_oracle():
    model = tiny_swin()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([1, 3])
    layers = ["features.1", "features.3"]  # 5×5 tokens (padded, shifted windows), then 3×3
    with RelevanceCAM(model, layers, preset="lrp") as cam:
        got = cam.relevance(x, t)
        maps = cam(x, t)
    kept = {}

    def keep(name, tensor):
        tensor.retain_grad()
        kept[name] = tensor
        return tensor

    logits = swin_lrp_forward(model, x, keep)
    torch.testing.assert_close(logits, model(x))
    logits.backward(
        torch.zeros_like(logits).scatter_(1, t[:, None], 1.0) / logits.gather(1, t[:, None])
    )
    for layer in layers:
        want = kept[layer].detach() * kept[layer].grad
        torch.testing.assert_close(got[layer][1][:, 0], want, rtol=1e-6, atol=1e-9)
    assert maps["features.1"].shape == (2, 1, 5, 5)  # channels-last stage grids
    assert maps["features.3"].shape == (2, 1, 3, 3)


def test_swin_t_batching_and_last_stage_conservation():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=C).eval()
    layers = ["features.3", "features.5", "features.7"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with RelevanceCAM(model, layers, preset="lrp", residual="positive") as cam:
        rel = cam.relevance(x, T)
        maps = cam(x, T)
        alone = cam(x[1:], T[1, 1:])
    last = rel["features.7"][1].flatten(2).sum(2)
    torch.testing.assert_close(last, torch.ones_like(last), rtol=1e-4, atol=0)
    for layer, side in zip(layers, (8, 4, 2)):
        assert maps[layer].shape == (2, 2, side, side)
        scale = maps[layer].abs().max()
        assert (alone[layer][0, 0] - maps[layer][1, 1]).abs().max() <= 1e-4 * scale


# ---- LIFT-CAM through a ViT head (LayerNorm with σ held, class token / patch mean) ------------


def block_output(net, x, layer="blocks.1"):
    seen = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda m, a, out: seen.update(a=out.detach())
    )
    try:
        net(x)
    finally:
        handle.remove()
    return seen["a"]


@pytest.mark.parametrize("pool", ["token", "mean"])
def test_liftcam_vit_head_closed_form_and_completeness(pool):
    """At the last block: φ_kc(n) = A_c(n)·[(g − mean_c g)/σ(n)]_c with g = γ ⊙ W_t · s(n),
    s = 1 at the class token (token head) or 1/(h·w) at each patch (mean head); Σ φ equals
    y_t(A) − y_t(0) exactly, y_t(0) = W_t·β + b_t."""
    net = tiny_vit(pool=pool)
    a = block_output(net, X)  # (B, N, C)
    sigma = (a.var(-1, unbiased=False, keepdim=True) + net.norm.eps).sqrt()
    s = torch.zeros(a.shape[1], dtype=a.dtype)
    if pool == "token":
        s[0] = 1.0
    else:
        s[1:] = 1.0 / (a.shape[1] - 1)
    g = net.norm.weight * net.head.weight[T]  # (B, K, C)
    g = g[:, :, None, :] * s[:, None]  # (B, K, N, C)
    phi = (g - g.mean(-1, keepdim=True)) / sigma[:, None] * a[:, None]
    grid = to_grid(a, (16, 16), token_layout(net))
    want = torch.einsum("bkc,bchw->bkhw", phi.sum(2), grid)
    with LiftCAM(net, ["blocks.1"]) as cam:
        got = cam(X, T)["blocks.1"]
        contributions = LiftCAM._contributions(cam.heads["blocks.1"], a.clone(), T)
    torch.testing.assert_close(contributions, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        gained = net(X).gather(1, T) - (net.head.weight @ net.norm.bias + net.head.bias)[T]
    torch.testing.assert_close(contributions.flatten(2).sum(2), gained, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pool", ["token", "mean"])
def test_liftcam_small_vit_batched_equals_one_by_one(pool):
    net = tiny_vit(pool=pool)
    layers = ["blocks.0", "blocks.1"]
    with LiftCAM(net, layers) as cam:
        maps = assert_batched_equals_one_by_one(cam, layers)
    for layer in layers:
        assert maps[layer].shape == (2, 2, 4, 4) and torch.isfinite(maps[layer]).all()
        assert maps[layer].abs().max() > 0


def test_liftcam_deit_tiny_batched_equals_one_by_one():
    model = timm_model("deit_tiny_patch16_224", img_size=64)
    layers = ["blocks.3", "blocks.7", "blocks.11"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with LiftCAM(model, layers) as cam:
        maps = cam(x, T)
        alone = cam(x[1:], T[1, 1:])
    for layer in layers:
        assert maps[layer].shape == (2, 2, 4, 4) and torch.isfinite(maps[layer]).all()
        scale = maps[layer].abs().max()
        assert scale > 0
        assert (alone[layer][0, 0] - maps[layer][1, 1]).abs().max() <= 1e-4 * scale
