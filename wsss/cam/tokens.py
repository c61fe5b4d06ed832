"""Transformer layer outputs as spatial maps: (B, N, C) tokens on their (h, w) patch grid.

A ViT block outputs P prefix tokens (class, distillation, register) then h·w patch tokens in
row-major order, h = H / p and w = W / p for an H×W image and p×p patches. Swin stages output
channels-last grids (B, H, W, C). `TokenLayout` says which a model has; `token_layout(model)`
reads it from timm and torchvision models; `to_grid` turns a layer's value (or its gradient or
relevance, with extra leading dimensions) into the (..., C, h, w) layout CNN maps use.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class TokenLayout:
    """How a model lays out its tokens.

    prefix_tokens: special tokens before the patch tokens (None: the token count less h·w);
    patch_size: (p_h, p_w) of the patch embedding (None: the square grid that fits the tokens);
    channels_last: 4-d layer outputs are (B, H, W, C) grids (Swin), not (B, C, H, W).
    """

    prefix_tokens: int | None = None
    patch_size: tuple[int, int] | None = None
    channels_last: bool = False

    def grid(self, tokens: int, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(prefix tokens, h, w) for a sequence of `tokens` tokens from an image of image_hw."""
        if self.patch_size is not None:
            h, w = image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1]
            prefix = tokens - h * w if self.prefix_tokens is None else self.prefix_tokens
        else:
            prefix = self.prefix_tokens or 0
            side = round((tokens - prefix) ** 0.5)
            h = w = side
        if prefix < 0 or prefix + h * w != tokens:
            raise ValueError(
                f"{tokens} tokens do not fit a {image_hw[0]}x{image_hw[1]} image with "
                f"patches {self.patch_size} and {self.prefix_tokens} prefix tokens; "
                "give the model's layout with TokenLayout(prefix_tokens=..., patch_size=...)"
            )
        return prefix, h, w


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def token_layout(model: nn.Module) -> TokenLayout:
    """The layout of timm ViT / DeiT (num_prefix_tokens, patch_embed.patch_size), torchvision
    ViT (class token, patch_size) and Swin (channels-last stages); CNNs get the default."""
    kind = type(model).__name__
    if "Swin" in kind:
        return TokenLayout(channels_last=True)
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None and isinstance(getattr(model, "class_token", None), nn.Parameter):
        prefix = 1  # torchvision's VisionTransformer
    patch = _pair(getattr(model, "patch_size", None))
    embed = getattr(model, "patch_embed", None)
    if patch is None and embed is not None:
        patch = _pair(getattr(embed, "patch_size", None))
    return TokenLayout(prefix, patch)


def to_grid(value: Tensor, image_hw: tuple[int, int], layout: TokenLayout, lead: int = 1) -> Tensor:
    """A layer's value as (*lead dims, C, h, w), patch tokens only.

    value: (*lead, N, C) tokens, (*lead, H, W, C) when layout.channels_last, or already
    (*lead, C, h, w) (returned as it is). lead: the leading dimensions (1 for (B, ...), 2 for
    (B, K, ...) gradients and relevance).
    """
    rank = value.dim() - lead
    if rank == 2:
        prefix, h, w = layout.grid(value.shape[lead], image_hw)
        patches = value[(slice(None),) * lead + (slice(prefix, None),)]
        return patches.transpose(-2, -1).unflatten(-1, (h, w))
    if rank == 3 and layout.channels_last:
        return value.movedim(-1, lead)
    return value
