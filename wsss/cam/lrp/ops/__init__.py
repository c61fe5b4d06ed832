"""How relevance crosses each kind of node of a traced model (torch.fx): the op rules.

An op rule looks at one graph node when RelevanceCAM is built and returns a `Step`: which of the
node's inputs receive relevance, which values the forward pass must record for it, and the
function mapping the relevance at the node's output to its inputs. Rules are found by the
node's target: a module type (call_module), a function (call_function) or a method name
(call_method). `register_rule` adds or replaces one.

Built-in rules (relevance R is (B*K, ...), recorded values (B, ...)):
- Conv1d/2d/3d, Linear (also F.linear / F.conv*d with constant weights): the LRP rule the
  composite picks for that layer (rules.py), with a following BatchNorm folded in when
  batchnorm="fold" (modules only);
- BatchNorm, LayerNorm, GroupNorm: identity (BN: the reference's treatment, or folded into the
  conv before it; LN/GN: the identity-on-normalisation rule of CP-LRP / AttnLRP, which holds
  the statistics constant and ignores the affine shift);
- element-wise activations (ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish, Mish, Tanh,
  Sigmoid, Hardsigmoid, ...), dropout, stochastic depth, identity, contiguous: pass-through;
- add / sub of two signals: the residual split (signed, positive or abs parts); with a
  constant: pass-through to the signal;
- mul by a constant, div by a constant: pass-through; mul by a gate (an operand produced by a
  sigmoid / hardsigmoid / softmax, as in squeeze-excitation): the gate is held constant and all
  relevance goes to the gated input;
- cat: split by channel (or any non-batch) slices; chunk / split + getitem: reassembled;
- max pooling (also adaptive): winner-take-all; average / adaptive-average pooling and mean
  over dimensions: spread in proportion to the positive inputs (z⁺), or to the negative ones
  where the pooled value is negative (only possible without a ReLU before the pool);
- flatten / view / reshape / squeeze / unsqueeze / permute / transpose / tensor indexing /
  channel shuffle: relevance moved back to where the values came from; a stack made by a
  permute that puts the batch second (packed q, k, v), then unbind / integer slots;
- attention (AttnLRP, attention.py): softmax by gradient × input (x ⊙ (R − s ΣR)); matmul /
  bmm of two signals by the uniform rule (half to each factor, ε-stabilised);
  F.scaled_dot_product_attention and nn.MultiheadAttention as single nodes composing those;
  torchvision Swin's shifted_window_attention and patch merging as single nodes (windows.py).
- padding (pad modules, F.pad in every mode, timm's "same" pad_same and Conv2dSame): constant
  positions dropped, copies (reflect / replicate / circular) added back onto what they copy; a
  zero pad read only by a conv is folded into that conv's map (padding.py);
- interpolation (nearest: copies back; linear modes: z⁺) and sums (the shares of a mean).
"""

from wsss.cam.lrp.canonize import BATCHNORMS, CONVS, batchnorm_affine
from wsss.cam.lrp.ops.arithmetic import plan_add, plan_div, plan_mul, plan_sub, residual_split
from wsss.cam.lrp.ops.builtins import (
    ACTIVATIONS,
    GATES,
    IDENTITIES,
    NORMS,
    register_builtins,
    register_optional_rules,
)
from wsss.cam.lrp.ops.common import first_signal, plan_custom, plan_pass, reduce_to
from wsss.cam.lrp.ops.layers import (
    FUNCTIONAL_LAYERS,
    conv_map,
    linear_map,
    plan_conv,
    plan_functional_layer,
    plan_linear,
)
from wsss.cam.lrp.ops.padding import PAD_MODULES, PadFold, padding_folds, plan_pad
from wsss.cam.lrp.ops.pooling import (
    plan_adaptive_avg_pool,
    plan_adaptive_max_pool,
    plan_avg_pool,
    plan_max_pool,
    plan_mean,
)
from wsss.cam.lrp.ops.registry import (
    leaf_functions,
    module_rule,
    node_rule,
    register_handler,
    register_rule,
    registry_for,
    registry_version,
    unregister_rule,
)
from wsss.cam.lrp.ops.shapes import (
    plan_cat,
    plan_channel_shuffle,
    plan_chunk,
    plan_getitem,
    plan_permute,
    plan_reshape,
    plan_split,
    plan_transpose,
)
from wsss.cam.lrp.ops.types import NodeContext, OpRule, Part, Shape, Step, UnsupportedOp

register_builtins()

__all__ = [
    "ACTIVATIONS",
    "BATCHNORMS",
    "CONVS",
    "FUNCTIONAL_LAYERS",
    "GATES",
    "IDENTITIES",
    "NORMS",
    "NodeContext",
    "PAD_MODULES",
    "PadFold",
    "OpRule",
    "Part",
    "Shape",
    "Step",
    "UnsupportedOp",
    "batchnorm_affine",
    "conv_map",
    "first_signal",
    "linear_map",
    "leaf_functions",
    "module_rule",
    "padding_folds",
    "plan_pad",
    "register_optional_rules",
    "node_rule",
    "plan_adaptive_avg_pool",
    "plan_adaptive_max_pool",
    "plan_add",
    "plan_avg_pool",
    "plan_cat",
    "plan_channel_shuffle",
    "plan_chunk",
    "plan_conv",
    "plan_custom",
    "plan_div",
    "plan_functional_layer",
    "plan_getitem",
    "plan_linear",
    "plan_max_pool",
    "plan_mean",
    "plan_mul",
    "plan_pass",
    "plan_permute",
    "plan_reshape",
    "plan_split",
    "plan_sub",
    "plan_transpose",
    "reduce_to",
    "register_builtins",
    "register_handler",
    "register_rule",
    "registry_for",
    "registry_version",
    "residual_split",
    "unregister_rule",
]
