"""Conformance of every CAM method over a zoo of timm CNNs with random weights.

For each model (small variants, 64 px, batch 2, two target classes per image) and each method
(Relevance-CAM with every preset, Grad-CAM, Grad-CAM++, LIFT-CAM, Libra-CAM), the checks of
`wsss.cam.conformance`: builds and runs, finite maps, batched equal to one image and class at a
time, total relevance conserved at each captured layer (for the conservative presets), no hooks
left; and once per model, that no cache keeps the model alive after its CAM is closed.
CAM layers: the last three feature stages of timm's `model.feature_info`.

    python scripts/cam_conformance.py                      # the whole zoo, a markdown table
    python scripts/cam_conformance.py --models resnet18,tf_efficientnet_b0 --details
    python scripts/cam_conformance.py --torchvision        # every torchvision CNN up to 60M params
    python scripts/cam_conformance.py --torchvision --min-params 30 --max-params 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsss.cam.conformance import ALL_METHODS, check_method, released  # noqa: E402

# (name, create_model keyword arguments): families as the docstring says
ZOO: list[tuple[str, dict]] = [
    ("resnet18", {}),
    ("tf_efficientnet_b0", {}),  # TensorFlow "same" padding
    ("tf_mobilenetv3_small_100", {}),  # "same" padding, hard-swish
    ("tf_efficientnetv2_b0", {}),
    ("mobilenetv3_small_050", {}),  # hard-swish, hard-sigmoid SE
    ("efficientnet_b0", {}),
    ("lcnet_050", {}),
    ("regnetx_002", {}),
    ("regnety_002", {}),  # SE
    ("cspresnet50", {}),
    ("cs3darknet_s", {}),
    ("resnest14d", {}),  # split attention
    ("skresnet18", {}),  # selective kernel
    ("ghostnet_100", {}),
    ("rexnet_100", {}),
    ("dla34", {}),
    ("nf_resnet26", {}),  # weight-standardised convs
    ("nf_regnet_b0", {}),
    ("ecaresnet26t", {}),  # ECA gate
    ("seresnext26d_32x4d", {}),  # SE gate
    ("resnet18_cbam", {"name": "resnet18", "block_args": {"attn_layer": "cbam"}}),
    ("convnext_atto", {}),
    ("densenet121", {}),
    ("mixnet_s", {}),  # mixed kernels (split)
    ("res2net50_14w_8s", {}),
    ("ese_vovnet19b_dw", {}),
    ("hrnet_w18_small", {}),  # upsampling
    ("repvgg_a0", {}),
    ("dpn68", {}),
]


def build(name: str, kwargs: dict, classes: int) -> torch.nn.Module:
    kwargs = dict(kwargs)
    name = kwargs.pop("name", name)
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        if name[3:] in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=False)
        model = torchvision.models.get_model(name[3:], weights=None, num_classes=classes, **kwargs)
        return model.eval()
    import timm

    return timm.create_model(name, pretrained=False, num_classes=classes, **kwargs).eval()


def torchvision_cnns(
    max_params: float, min_params: float = 0.0
) -> tuple[list[tuple[str, dict]], list[str]]:
    """Every torchvision classification CNN ("tv:" + name) with more than `min_params` and at
    most `max_params` million parameters, and the names left out for their size."""
    import torchvision

    from wsss.models.backbones import _NOT_CNNS, family_of

    kept, skipped = [], []
    for name in torchvision.models.list_models(module=torchvision.models):
        if family_of(name) in _NOT_CNNS:
            continue
        params = parameter_millions(name)
        (kept if min_params < params <= max_params else skipped).append(f"tv:{name}")
    return [(n, {}) for n in kept], skipped


def parameter_millions(name: str) -> float:
    """A torchvision model's parameter count in millions, with the survey's 6 classes, without
    allocating it (on the meta device). RegNet computes its widths with tensors, which the meta
    device refuses: there the count in torchvision's weights metadata (with the 1000-class
    head, a few million more for the widest) is used, so that regnet_y_128gf is never built
    just to be counted."""
    import torchvision

    try:
        with torch.device("meta"):  # no memory, no init
            model = build(f"tv:{name}", {}, 6)
        return sum(p.numel() for p in model.parameters()) / 1e6
    except (NotImplementedError, RuntimeError):
        weights = next(iter(torchvision.models.get_model_weights(name)))
        return weights.meta["num_params"] / 1e6


def stage_layers(model: torch.nn.Module, count: int = 3, size: int = 64) -> list[str]:
    """The module names of the last `count` feature stages timm reports whose output is one
    (B, C, h, w) map; when none is (HRNet's stages return lists of branch maps), the last
    top-level module that returns one (HRNet: final_layer, the head's fused map). For a
    torchvision model, the family's default CAM layers (wsss.models.backbones.default_cam_layers)."""
    if getattr(model, "_conformance_name", "").startswith("tv:"):
        from wsss.models.backbones import default_cam_layers

        return list(default_cam_layers(model._conformance_name[3:]))
    info = getattr(model, "feature_info", None) or []
    modules = dict(model.named_modules())
    names = [d["module"] for d in info if d.get("module") in modules]
    children = [n for n, _ in model.named_children() if n not in names]
    maps: dict[str, bool] = {}

    def probe(name: str):
        def hook(module, args, out) -> None:
            maps.setdefault(name, isinstance(out, torch.Tensor) and out.dim() == 4)

        return hook

    hooks = [modules[n].register_forward_hook(probe(n)) for n in names + children]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    stages = [n for n in names if maps.get(n)][-count:]
    return stages or [n for n in maps if maps[n] and n in children][-1:]


def survey(models: list[tuple[str, dict]], methods: list[str], size: int, classes: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g)
    targets = torch.tensor([[1, 4], [2, 5]]) % classes
    rows = []
    for label, kwargs in models:
        start = time.perf_counter()
        try:
            model = build(label, kwargs, classes)
            model._conformance_name = label
            layers = stage_layers(model)
        except Exception as exc:
            rows.append((label, [], {m: f"model not built: {exc}" for m in methods}, None, 0.0))
            continue
        x = images if label != "tv:inception_v3" else F.interpolate(images, size=96)
        results = {m: check_method(model, m, layers, x, targets) for m in methods}
        try:
            free = released(lambda: build(label, kwargs, classes), methods[0], layers, x)
        except Exception as exc:
            free = f"n/a ({type(exc).__name__})"
        rows.append((label, layers, results, free, time.perf_counter() - start))
        print(f"# {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        print(table(rows[-1:], methods).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def _cell(result) -> str:
    if isinstance(result, str):
        return result
    if result.passed:
        notes = []
        if result.batch_rounding:
            notes.append(
                f"float32 {result.batch_error:.1e}, float64 {result.batch_error_float64:.0e}"
            )
        worst = max(result.conservation.values(), default=None)
        if worst is not None:
            notes.append(f"{worst:.0e}")
        return f"pass ({'; '.join(notes)})" if notes else "pass"
    reason = result.reason.replace("|", "/")
    return reason if len(reason) <= 140 else reason[:137] + "..."


def table(rows, methods: list[str]) -> str:
    short = [m.replace("relevance:", "R:") for m in methods]
    lines = [
        "| model | layers | " + " | ".join(short) + " | freed |",
        "|---" * (len(methods) + 3) + "|",
    ]
    for label, layers, results, free, _ in rows:
        cells = [_cell(results[m]) for m in methods]
        lines.append(f"| {label} | {', '.join(layers)} | " + " | ".join(cells) + f" | {free} |")
    return "\n".join(lines)


def details(rows, methods: list[str]) -> str:
    out = []
    for label, _, results, _, seconds in rows:
        out.append(f"## {label} ({seconds:.1f} s)")
        for m in methods:
            r = results[m]
            if isinstance(r, str):
                out.append(f"- {m}: {r}")
                continue
            cons = ", ".join(f"{k}: {v:.1e}" for k, v in r.conservation.items())
            out.append(
                f"- {m}: {'pass' if r.passed else r.reason}; batch {r.batch_error:.1e} "
                f"(float64 rerun {r.batch_error_float64:.1e}); "
                f"finite {r.finite}; hooks left {r.hooks_left}; conservation {{{cons}}}"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: the zoo)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--details", action="store_true", help="every number, per method")
    parser.add_argument(
        "--torchvision",
        action="store_true",
        help="every torchvision classification CNN instead of the timm zoo",
    )
    parser.add_argument("--max-params", type=float, default=60.0, help="millions (--torchvision)")
    parser.add_argument(
        "--min-params",
        type=float,
        default=0.0,
        help="millions (--torchvision): only models with more parameters than this",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = dict(ZOO)
    names = [n for n in args.models.split(",") if n] or list(zoo)
    models = [(n, zoo.get(n, {})) for n in names]
    if args.torchvision:
        models, skipped = torchvision_cnns(args.max_params, args.min_params)
        window = f"{args.min_params:g}M-{args.max_params:g}M" if args.min_params else ""
        print(
            f"left out ({'outside ' + window if window else f'over {args.max_params:g}M'} "
            f"parameters): {', '.join(skipped)}\n"
        )
    methods = [m for m in args.methods.split(",") if m]
    rows = survey(models, methods, args.size, args.classes)
    print(table(rows, methods))
    if args.details:
        print()
        print(details(rows, methods))


if __name__ == "__main__":
    main()
