"""Vision-transformer classifiers for the CAM pipeline: timm ViT / DeiT and torchvision ViT.

`build_vit_backbone(name, num_classes, ...)` gives a `TokenClassifier`: the model's patch
embedding, class token, blocks and final norm, with
- position embeddings resampled to each image's patch grid (bicubic), so the classifier takes
  the training crops and the full images of the pseudo-mask stage alike, and RelevanceCAM can
  trace it (the resampling is one leaf module, a bias for LRP: it gets no relevance);
- a linear head on the class token (token_pool="token") or on the mean of the patch tokens
  (token_pool="gap", as ToCo and MoRe use).
Module paths are timm's (`blocks.i`) for every model, torchvision's included, so the default
CAM layers are `blocks.i` at 1/3, 2/3 and the last block.
"""

from __future__ import annotations

import difflib
import functools

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from wsss.cam import DEFAULT_PRESET, register_rule

TOKEN_POOLS = ("token", "gap")
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
TIMM_VITS = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
)
VIT_BACKBONES = TIMM_VITS + TORCHVISION_VITS
# The Relevance-CAM preset a ViT backbone gets when cam.preset is unset (CNNs: "default").
DEFAULT_VIT_CAM_PRESET = "transformer"


def is_vit_backbone(name: str) -> bool:
    return name in VIT_BACKBONES


def default_cam_preset(backbone: str) -> str:
    """The Relevance-CAM preset of a backbone's family, what cam.preset unset means:
    DEFAULT_VIT_CAM_PRESET for a ViT backbone, the CNN default for any other model name."""
    return DEFAULT_VIT_CAM_PRESET if is_vit_backbone(backbone) else DEFAULT_PRESET


def resample_grid(pos: Tensor, prefix: int, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Position embeddings (1, prefix + gh·gw, D) for a grid of `size` patches: the prefix
    tokens' rows kept, the patch rows interpolated bicubically over the grid."""
    if tuple(size) == tuple(grid):
        return pos
    head, patches = pos[:, :prefix], pos[:, prefix:]
    image = patches.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False)
    patches = image.to(pos.dtype).flatten(2).transpose(1, 2)
    return torch.cat([head, patches], 1)


class GridPositionEmbedding(nn.Module):
    """tokens + position embeddings resampled to the image's patch grid (a leaf for tracing:
    relevance passes to the tokens, the embedding is a bias)."""

    def __init__(self, pos: Tensor, prefix: int, grid: tuple[int, int]):
        super().__init__()
        self.pos = nn.Parameter(pos.detach().clone())
        self.prefix, self.grid = prefix, tuple(grid)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return tokens + resample_grid(self.pos, self.prefix, self.grid, (int(h), int(w)))


class TokenClassifier(nn.Module):
    """Patch embedding (a conv), class token, position embeddings, blocks, norm, linear head."""

    def __init__(
        self,
        patch: nn.Conv2d,
        cls_token: Tensor,
        pos: Tensor,
        grid: tuple[int, int],
        blocks: nn.Sequential,
        norm: nn.Module,
        num_classes: int,
        token_pool: str,
    ):
        super().__init__()
        if token_pool not in TOKEN_POOLS:
            raise ValueError(f"token_pool must be one of {TOKEN_POOLS}, got {token_pool!r}")
        self.patch = patch
        self.cls_token = nn.Parameter(cls_token.detach().clone().reshape(1, 1, -1))
        self.pos_embed = GridPositionEmbedding(pos.reshape(1, -1, pos.shape[-1]), 1, grid)
        self.blocks, self.norm, self.token_pool = blocks, norm, token_pool
        self.head = nn.Linear(self.cls_token.shape[-1], num_classes)
        self.num_prefix_tokens = 1
        self.patch_size = tuple(patch.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1)
        t = self.norm(self.blocks(self.pos_embed(t, h, w)))
        pooled = t[:, 0] if self.token_pool == "token" else t[:, 1:].mean(1)
        return self.head(pooled)


def _from_timm(name: str, pretrained: bool, in_channels: int) -> dict:
    import timm  # only when a timm ViT is asked for: timm comes with segmentation-models-pytorch

    vit = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels)
    if vit.num_prefix_tokens != 1 or not isinstance(vit.norm_pre, nn.Identity):
        raise ValueError(f"{name}: only ViTs with one class token and no pre-norm are supported")
    return dict(
        patch=vit.patch_embed.proj,
        cls_token=vit.cls_token,
        pos=vit.pos_embed,
        grid=tuple(vit.patch_embed.grid_size),
        blocks=vit.blocks,
        norm=vit.norm,
    )


def _from_torchvision(name: str, pretrained: bool, in_channels: int) -> dict:
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    vit = torchvision.models.get_model(name, weights=weights)
    patch = vit.conv_proj
    if in_channels != 3:
        new = nn.Conv2d(in_channels, patch.out_channels, patch.kernel_size, patch.stride)
        with torch.no_grad():
            new.weight.copy_(patch.weight.mean(1, keepdim=True).expand_as(new.weight))
            new.bias.copy_(patch.bias)
        patch = new
    side = vit.image_size // vit.patch_size
    return dict(
        patch=patch,
        cls_token=vit.class_token,
        pos=vit.encoder.pos_embedding,
        grid=(side, side),
        blocks=nn.Sequential(*vit.encoder.layers),
        norm=vit.encoder.ln,
    )


def build_vit_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    token_pool: str = "token",
    in_channels: int = 3,
) -> TokenClassifier:
    """A ViT / DeiT classifier over num_classes (see the module docstring)."""
    check_vit_backbone(name)
    parts = (_from_timm if name in TIMM_VITS else _from_torchvision)(name, pretrained, in_channels)
    if parts["patch"].in_channels != in_channels:
        raise ValueError(f"{name}: could not give the patch embedding {in_channels} channels")
    return TokenClassifier(**parts, num_classes=num_classes, token_pool=token_pool)


def check_vit_backbone(name: str) -> None:
    if name not in VIT_BACKBONES:
        close = difflib.get_close_matches(name, VIT_BACKBONES, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not a supported ViT{hint} (one of {list(VIT_BACKBONES)})")


@functools.lru_cache(maxsize=16)
def vit_depth(name: str) -> int:
    """The number of blocks of a ViT backbone (12 for the -S / -B / DeiT models)."""
    check_vit_backbone(name)
    with torch.device("meta"):
        parts = (_from_timm if name in TIMM_VITS else _from_torchvision)(name, False, 3)
    return len(parts["blocks"])


def default_vit_cam_layers(name: str) -> tuple[str, ...]:
    """blocks at 1/3, 2/3 and the last block (blocks.3, blocks.7, blocks.11 for 12 blocks)."""
    n = vit_depth(name)
    picks = sorted({max(0, round(n / 3) - 1), max(0, round(2 * n / 3) - 1), n - 1})
    return tuple(f"blocks.{i}" for i in picks)


def check_vit_cam_layers(name: str, layers: list[str]) -> None:
    """ValueError naming the closest module when a layer is not one of the backbone's."""
    n = vit_depth(name)
    blocks = [f"blocks.{i}" for i in range(n)]
    for layer in layers:
        if (
            layer not in blocks
            and layer != "input"
            and not layer.startswith(tuple(b + "." for b in blocks))
        ):
            close = difflib.get_close_matches(layer, blocks, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(
                f"{layer!r} is not a block of {name} (blocks.0 … blocks.{n - 1}){hint}; "
                f"default layers: {list(default_vit_cam_layers(name))}"
            )


register_rule(GridPositionEmbedding, "identity")  # position embeddings are a bias
