"""Our AttnLRP relevance against lxt's (the AttnLRP authors' library) on DeiT-Tiny, float64.

The ViT classifier of `wsss.models.vit_backbones` (timm's deit_tiny_patch16_224 blocks, a
class-token head, random weights) is run twice from the same embedded tokens:
- ours: RelevanceCAM, preset `lrp` with the ε-rule on every Linear (bias in the denominator,
  as AttnLRP), the start relevance 1 at the target logit;
- lxt: the same forward written with lxt's explicit functional rules (linear_epsilon, softmax,
  matmul, add2 on the residuals, the identity rule on GELU), whose backward pass carries
  relevance itself, seeded with 1 at the target logit.
The relevance at every block output is compared: max |R_ours − R_lxt| / max |R_lxt| per block.

LayerNorm: ours moves relevance through unchanged (the identity rule, docs/ALGORITHMS.md §7.4).
`--layernorm identity` gives lxt the same rule (lxt.explicit.rules.identity: the oracle
comparison); `--layernorm lxt` uses lxt's own lf.layer_norm (the ε-rule on the σ-detached map),
which differs by design. The ε of lxt's ops is matched to ours (`--lxt-defaults` keeps lxt's).

lxt is not a dependency; it imports with torch alone:

    pip install --no-deps --target /tmp/lxtpkg lxt
    PYTHONPATH=$PWD:/tmp/lxtpkg python scripts/compare_lxt.py [--qk-scale 8] [--layernorm lxt]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsss.cam import RelevanceCAM, Rule  # noqa: E402
from wsss.cam.lrp.ops import attention  # noqa: E402
from wsss.models.vit_backbones import TokenClassifier, build_vit_backbone  # noqa: E402

EPSILON = 1e-6  # ours: the products' ε (fixed), and the Linear ε-rule's by default


def build(qk_scale: float, classes: int, seed: int) -> TokenClassifier:
    """DeiT-Tiny as our token classifier, float64, q/k projections scaled so that the softmax
    is not nearly uniform (timm's initialisation gives scores of order 1e-3)."""
    torch.manual_seed(seed)
    model = build_vit_backbone("deit_tiny_patch16_224", classes, token_pool="token")
    model = model.double().eval()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim].mul_(qk_scale)
        model.head.weight.normal_(0.0, 0.1)
    return model


def embedded(model: TokenClassifier, images: Tensor) -> Tensor:
    """The tokens the first block reads: patches, class token, position embeddings."""
    h, w = images.shape[-2] // model.patch_size[0], images.shape[-1] // model.patch_size[1]
    t = model.patch(images).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], 1)
    return model.pos_embed(t, h, w)


def lxt_forward(
    model: TokenClassifier,
    t: Tensor,
    layernorm: str,
    defaults: bool,
    epsilon: float,
    product_epsilon: float,
    keep: list,
):
    """The blocks, norm and head on tokens t with lxt's rules; `keep` gets each block output."""
    import lxt.explicit.functional as lf  # optional: only this script uses lxt
    import lxt.explicit.rules as lr

    eps = {} if defaults else {"epsilon": epsilon}
    # ours halves a product's relevance over y ± ε; lxt divides by 2y + ε
    product = {} if defaults else {"epsilon": 2 * product_epsilon}
    residual = {} if defaults else {"epsilon": 0.0}  # ours splits a + b with no ε

    def norm(module: nn.LayerNorm, x: Tensor) -> Tensor:
        if layernorm == "identity":
            return lr.identity(module, x)
        return lf.layer_norm(x, module.weight, module.bias, module.eps)

    def linear(module: nn.Linear, x: Tensor) -> Tensor:
        return lf.linear_epsilon(x, module.weight, module.bias, **eps)

    for block in model.blocks:
        attn = block.attn
        for part in (attn.q_norm, attn.k_norm, attn.norm, block.ls1, block.ls2, block.mlp.norm):
            if not isinstance(part, nn.Identity):
                raise ValueError(f"{type(part).__name__} in a block: only plain DeiT blocks")
        b, n, c = t.shape
        qkv = linear(attn.qkv, norm(block.norm1, t))
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q = lf.mul2(q, attn.scale)  # a constant factor: all relevance to q
        scores = lf.matmul(q, k.transpose(-2, -1), **product)
        o = lf.matmul(lf.softmax(scores, -1), v, **product)
        o = linear(attn.proj, o.transpose(1, 2).reshape(b, n, c))
        t = lf.add2(t, o, **residual)
        h = lr.identity(block.mlp.act, linear(block.mlp.fc1, norm(block.norm2, t)))
        t = lf.add2(t, linear(block.mlp.fc2, h), **residual)
        t.retain_grad()
        keep.append(t)
    return linear(model.head, norm(model.norm, t)[:, 0])


def lxt_relevance(
    model, t0: Tensor, targets: Tensor, layernorm: str, defaults: bool, epsilons: tuple
) -> list:
    """[per target slot k: [per block: relevance (B, N, C)]]."""
    out = []
    for k in range(targets.shape[1]):
        keep: list[Tensor] = []
        logits = lxt_forward(
            model, t0.detach().clone().requires_grad_(True), layernorm, defaults, *epsilons, keep
        )
        seed = torch.zeros_like(logits).scatter_(1, targets[:, k : k + 1], 1.0)
        logits.backward(seed)
        out.append([t.grad.detach() for t in keep])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side (16 px patches)")
    parser.add_argument("--qk-scale", type=float, default=8.0, help="q/k projection factor")
    parser.add_argument("--layernorm", choices=("identity", "lxt"), default="identity")
    parser.add_argument("--lxt-defaults", action="store_true", help="lxt's own ε values")
    parser.add_argument("--epsilon", type=float, default=EPSILON, help="the Linear layers' ε")
    parser.add_argument(
        "--product-epsilon",
        type=float,
        default=EPSILON,
        help="the products' ε, ours and lxt's (ours is a constant of the engine: set here for "
        "this diagnosis only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.product_epsilon != EPSILON:
        share, batched, _ = attention.bilinear_relevance.__defaults__
        attention.bilinear_relevance.__defaults__ = (share, batched, args.product_epsilon)
    model = build(args.qk_scale, 20, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(2, 3, args.size, args.size, generator=g, dtype=torch.float64)
    targets = torch.tensor([[3, 11], [7, 0]])
    layers = [f"blocks.{i}" for i in range(len(model.blocks))]
    linear = Rule("epsilon", epsilon=args.epsilon, bias=1.0)
    with RelevanceCAM(model, layers, preset="lrp", linear=linear) as cam:
        ours = cam.relevance(images, targets)
    with torch.no_grad():
        t0 = embedded(model, images)
        qkv = model.blocks[0].attn.qkv(model.blocks[0].norm1(t0))
    theirs = lxt_relevance(
        model, t0, targets, args.layernorm, args.lxt_defaults, (args.epsilon, args.product_epsilon)
    )
    print(
        f"DeiT-Tiny, {args.size} px, float64, q/k x{args.qk_scale} (first block's q/k std "
        f"{float(qkv[..., : 2 * qkv.shape[-1] // 3].std()):.3g}), LayerNorm rule for lxt: "
        f"{args.layernorm}, Linear eps {args.epsilon:g}, products' eps {args.product_epsilon:g}, "
        "lxt eps: "
        f"{'lxt defaults' if args.lxt_defaults else 'matched'}"
    )
    worst = 0.0
    for i, layer in enumerate(layers):
        r_ours = ours[layer][1]  # (B, K, N, C)
        r_lxt = torch.stack([theirs[k][i] for k in range(targets.shape[1])], 1)
        diff = float((r_ours - r_lxt).abs().max() / r_lxt.abs().max())
        worst = max(worst, diff)
        print(
            f"{layer:10s} sum R ours {float(r_ours.sum()):+.6f} lxt {float(r_lxt.sum()):+.6f}"
            f"  max rel diff {diff:.2e}"
        )
    print(f"max relative difference over all blocks: {worst:.2e}")


if __name__ == "__main__":
    main()
