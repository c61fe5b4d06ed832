"""The built-in table: which plan each torch module, function and Tensor method gets."""

from __future__ import annotations

import operator
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import swin_transformer as tv_swin

from wsss.cam.lrp.canonize import BATCHNORMS, CONVS
from wsss.cam.lrp.ops.arithmetic import plan_add, plan_div, plan_mul, plan_sub
from wsss.cam.lrp.ops.attention import (
    plan_additive_mask,
    plan_matmul,
    plan_multihead_attention,
    plan_sdpa,
    plan_softmax,
)
from wsss.cam.lrp.ops.common import plan_pass
from wsss.cam.lrp.ops.layers import FUNCTIONAL_LAYERS, plan_conv, plan_functional_layer, plan_linear
from wsss.cam.lrp.ops.padding import PAD_MODULES, plan_conv_same, plan_pad, timm_pad_functions
from wsss.cam.lrp.ops.pooling import (
    plan_adaptive_avg_pool,
    plan_adaptive_max_pool,
    plan_avg_pool,
    plan_max_pool,
    plan_mean,
)
from wsss.cam.lrp.ops.registry import bump_version, registry_for
from wsss.cam.lrp.ops.resample import INTERPOLATIONS, SUMS, plan_interpolate, plan_sum
from wsss.cam.lrp.ops.shapes import (
    plan_cat,
    plan_channel_shuffle,
    plan_chunk,
    plan_reshape,
    plan_split,
    plan_stack,
    plan_transpose,
)
from wsss.cam.lrp.ops.stacks import plan_getitem_or_slot, plan_permute_or_stack, plan_unbind
from wsss.cam.lrp.ops.types import NodeContext, OpRule, Step
from wsss.cam.lrp.ops.windows import plan_patch_merging_pad, plan_shifted_window_attention

# timm (a dependency of segmentation-models-pytorch) keeps this helper a leaf of fx graphs
try:
    from timm.layers.attention import maybe_add_mask  # optional: only when timm has it
except ImportError:  # an older timm or none: its attention adds masks with plain `+`
    maybe_add_mask = None

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Tanh,
)
GATES = (nn.Sigmoid, nn.Hardsigmoid)
IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm)


def register_builtins() -> None:
    """Fill the registry with the rules of every torch op the engine knows."""

    def add(
        targets: Sequence[Any], plan: Callable[[NodeContext], Step], kind: str, gate: bool = False
    ) -> None:
        for target in targets:
            registry_for(target)[target] = OpRule(plan, gate, kind)

    linear, elementwise = "linear", "elementwise"
    add(CONVS, plan_conv, linear)
    add([nn.Linear], plan_linear, linear)
    add(FUNCTIONAL_LAYERS, plan_functional_layer, linear)
    add(BATCHNORMS + IDENTITIES, plan_pass, linear)
    add(NORMS, plan_pass, "other")
    add(ACTIVATIONS, plan_pass, elementwise)
    add(GATES, plan_pass, elementwise, gate=True)
    add(
        [
            F.relu,
            torch.relu,
            F.relu6,
            F.leaky_relu,
            F.elu,
            F.selu,
            F.silu,
            F.gelu,
            F.hardswish,
            F.mish,
            F.hardtanh,
            F.softplus,
            torch.tanh,
            F.tanh,
            torch.relu_,
            F.relu_,
            "relu",
            "relu_",
            "tanh",
            "clamp_min",
            "clamp_min_",
        ],
        plan_pass,
        elementwise,
    )
    add(
        [
            torch.sigmoid,
            F.sigmoid,
            F.hardsigmoid,
            "sigmoid",
            "sigmoid_",
        ],
        plan_pass,
        elementwise,
        gate=True,
    )
    add(
        [
            F.dropout,
            F.dropout1d,
            F.dropout2d,
            F.dropout3d,
            F.alpha_dropout,
            torchvision.ops.stochastic_depth,
            F.batch_norm,
            "contiguous",
            "clone",
            "float",
            "to",
            "type_as",
        ],
        plan_pass,
        linear,
    )
    add([F.layer_norm, F.group_norm], plan_pass, "other")
    add(
        [operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"],
        plan_add,
        linear,
    )
    add([operator.sub, operator.isub, torch.sub, "sub", "sub_"], plan_sub, linear)
    add([operator.mul, operator.imul, torch.mul, "mul", "mul_"], plan_mul, linear)
    add([operator.truediv, operator.itruediv, torch.div, "div", "div_"], plan_div, linear)
    add([torch.cat, torch.concat, torch.concatenate], plan_cat, linear)
    add([torch.stack], plan_stack, linear)
    add([torch.chunk, "chunk"], plan_chunk, linear)
    add([torch.split, "split"], plan_split, linear)
    add([operator.getitem], plan_getitem_or_slot, linear)
    add(
        [
            nn.Flatten,
            nn.Unflatten,
            torch.flatten,
            torch.reshape,
            torch.squeeze,
            torch.unsqueeze,
            "flatten",
            "view",
            "reshape",
            "squeeze",
            "unsqueeze",
            "unflatten",
            "view_as",
            "reshape_as",
        ],
        plan_reshape,
        linear,
    )
    add([torch.permute, "permute"], plan_permute_or_stack, linear)
    for target in (torch.unbind, "unbind"):
        registry_for(target)[target] = OpRule(plan_unbind, kind=linear, multi_output=True)
    # attention (AttnLRP): a softmax output still gates a signal it multiplies element-wise
    add([torch.softmax, F.softmax, "softmax", nn.Softmax], plan_softmax, "other", gate=True)
    add(
        [torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"],
        plan_matmul,
        "other",
    )
    add([F.scaled_dot_product_attention], plan_sdpa, "other")
    add([tv_swin.shifted_window_attention], plan_shifted_window_attention, "other")
    add([tv_swin._patch_merging_pad], plan_patch_merging_pad, linear)
    if maybe_add_mask is not None:
        add([maybe_add_mask], plan_additive_mask, linear)
    registry_for(nn.MultiheadAttention)[nn.MultiheadAttention] = OpRule(
        plan_multihead_attention, multi_output=True
    )
    add([torch.transpose, torch.swapaxes, "transpose", "swapaxes"], plan_transpose, linear)
    add([nn.ChannelShuffle, torch.channel_shuffle, F.channel_shuffle], plan_channel_shuffle, linear)
    add([nn.MaxPool2d, F.max_pool2d, torch.max_pool2d], plan_max_pool, "maxpool")
    add([nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d], plan_adaptive_max_pool, "maxpool")
    add([nn.AvgPool2d, F.avg_pool2d], plan_avg_pool, linear)
    add([nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d], plan_adaptive_avg_pool, linear)
    add([torch.mean, "mean"], plan_mean, linear)
    add(PAD_MODULES + (F.pad,), plan_pad, linear)
    add(INTERPOLATIONS, plan_interpolate, linear)
    add(SUMS, plan_sum, linear)


_OPTIONAL_DONE: set[str] = set()


def register_optional_rules() -> None:
    """Rules for ops of libraries the engine does not import itself, once each is loaded: timm's
    "same" padding (pad_same, kept one node by the tracer; Conv2dSame, one node with the conv
    rule and that padding folded in)."""
    if "timm" in _OPTIONAL_DONE or "timm.layers" not in sys.modules:
        return
    _OPTIONAL_DONE.add("timm")
    for fn in timm_pad_functions():
        registry_for(fn).setdefault(fn, OpRule(plan_pad, False, "linear"))
    conv_same = getattr(sys.modules.get("timm.layers.conv2d_same"), "Conv2dSame", None)
    if conv_same is not None:
        registry_for(conv_same).setdefault(conv_same, OpRule(plan_conv_same, False, "linear"))
    bump_version()
