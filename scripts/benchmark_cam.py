"""Speed and peak memory of RelevanceCAM and Grad-CAM against two units of cost.

Units (both timed here, both in the table):
- ``cam_unit``: forward + backward to the input of the lowest captured layer, input gradients
  only (no weight gradients, nothing below that layer): what any gradient CAM must pay;
- ``train_step``: a full training forward + backward (weight gradients everywhere), labelled as such.

Case: a torchvision or timm model (weights=None, 20 classes; default ResNet-50), batch 8, 224 px, three
layers (default: the family's default CAM layers, wsss.models.backbones.default_cam_layers).
Each row runs in a fresh subprocess so its peak RSS (CPU) or peak CUDA memory is its own.
Prints a markdown table; ``--sweep`` prints the ratios over batch 1 / 8 and 64 / 224 / 448 px.

pytorch-grad-cam is not a row: it back-propagates into every parameter, copies to numpy and
resizes every map, so a time against raw maps says nothing like for like.

    python scripts/benchmark_cam.py                          # CPU, ResNet-50, all rows
    python scripts/benchmark_cam.py --model densenet121      # any torchvision classifier
    python scripts/benchmark_cam.py --model deit_small_patch16_224 --layers blocks.3,blocks.7,blocks.11
    python scripts/benchmark_cam.py --threads 1 --clock process --interleave   # a busy machine
    python scripts/benchmark_cam.py --device cuda            # GPU (peak = torch.cuda.max_memory_allocated)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROWS = {
    "cam_unit": "1. forward + backward to the lowest captured layer, input gradients only (CAM unit)",
    "train_step": "2. full training forward + backward, weight gradients (training step)",
    "relevance_k1": "3. RelevanceCAM 3 layers, K=1",
    "relevance_k3": "4. RelevanceCAM 3 layers, K=3",
    "gradcam": "5. wsss GradCAM 3 layers, K=1",
}
SWEEP = [(1, 64), (1, 224), (1, 448), (8, 64), (8, 224), (8, 448)]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _setup(args: argparse.Namespace):
    """The model, a batch and targets for 1 and 3 classes per image."""
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(args.model, weights=None, num_classes=20)
    else:  # a timm model (e.g. deit_small_patch16_224); timm is only needed for those
        import timm

        model = timm.create_model(args.model, pretrained=False, num_classes=20)
    model = model.to(args.device).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    targets1 = torch.randint(0, 20, (args.batch,), device=args.device)
    targets3 = torch.randint(0, 20, (args.batch, 3), device=args.device)
    return model, images, targets1, targets3


def make_step(row: str, args: argparse.Namespace, model, images, targets1, targets3):
    """The callable one row times, or a string saying why the row is skipped."""
    layers = args.layers.split(",")
    if row == "train_step":

        def step():
            model.zero_grad(set_to_none=True)
            model(images).sum().backward()

        return step
    if row == "cam_unit":
        return _cam_unit(model, images, layers)
    if row.startswith("relevance"):
        from wsss.cam import RelevanceCAM

        cam = RelevanceCAM(model, layers, preset=args.preset)
        targets = targets1 if row == "relevance_k1" else targets3
        return lambda: cam(images, targets)
    if row == "gradcam":
        from wsss.cam import GradCAM

        cam = GradCAM(model, layers)
        return lambda: cam(images, targets1)
    raise ValueError(row)


def _cam_unit(model, images, layers: list[str]):
    """Forward, then the gradient of the logits' sum with respect to the input of the first
    captured layer the forward reaches; parameters need no gradient, nothing below is touched."""
    import torch

    order = [name for name, _ in model.named_modules() if name in layers]
    lowest = model.get_submodule(order[0])
    held: dict[str, torch.Tensor] = {}

    def grad_from_here(module, args):
        held["x"] = args[0].detach().requires_grad_(True)
        return (held["x"], *args[1:])

    def step():
        for p in model.parameters():
            p.requires_grad_(False)
        handle = lowest.register_forward_pre_hook(grad_from_here)
        try:
            logits = model(images)  # below the lowest layer nothing needs a graph
            torch.autograd.grad(logits.sum(), held["x"])
        finally:
            handle.remove()
            for p in model.parameters():
                p.requires_grad_(True)

    return step


def _timed(step, args: argparse.Namespace) -> float:
    clock = time.process_time if args.clock == "process" else time.perf_counter
    start = clock()
    step()
    _sync(args.device)
    return clock() - start


def measure_row(row: str, args: argparse.Namespace) -> dict:
    """Time one row (warm-up, then the median of repeats) in this process, with its peak memory."""
    import torch

    step = make_step(row, args, *_setup(args))
    if isinstance(step, str):
        return {"row": row, "skipped": step}
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    _sync(args.device)
    times = [_timed(step, args) for _ in range(args.repeats)]
    result = {
        "row": row,
        "median_s": statistics.median(times),
        "times": times,
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_interleaved(rows: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """All rows in one process, timed in rounds (row 1, row 2, ..., row 1, ...), so a machine
    whose load changes over time slows every row alike. No memory figures."""
    setup = _setup(args)
    steps = {row: make_step(row, args, *setup) for row in rows}
    results = {
        row: {"row": row, "skipped": step} for row, step in steps.items() if isinstance(step, str)
    }
    steps = {row: step for row, step in steps.items() if not isinstance(step, str)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {row: [] for row in steps}
    for _ in range(args.repeats):
        for row, step in steps.items():
            times[row].append(_timed(step, args))
    for row, t in times.items():
        results[row] = {"row": row, "median_s": statistics.median(t), "times": t}
        print(f"{row}: {results[row]}", file=sys.stderr)
    return {row: results[row] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet50", help="torchvision classification model name")
    parser.add_argument("--layers", help="comma-separated layers (default: the family's default)")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (steady when other work shares "
        "the CPU; with --threads 1 it is the single-core time)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--preset",
        help="Relevance-CAM preset (default: the model family's, as cam.preset unset: transformer "
        "for the ViT backbones, default otherwise)",
    )
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time all rows in one process, in rounds (fairer on a machine whose "
        "load changes; no memory column)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="ratios over batch 1 / 8 and 64 / 224 / 448 px"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args()
    if args.layers is None:
        from wsss.models.backbones import default_cam_layers

        args.layers = ",".join(default_cam_layers(args.model))
    if args.preset is None:
        from wsss.models.vit_backbones import default_cam_preset

        args.preset = default_cam_preset(args.model)

    if args.row:
        print(json.dumps(measure_row(args.row, args)))
        return

    if args.sweep:
        sweep(args)
        return
    results = run_rows(args.rows.split(","), args)
    cam_unit = results.get("cam_unit", {}).get("median_s")
    train = results.get("train_step", {}).get("median_s")
    mem_col = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB (above setup)"
    print(
        f"\n{args.model}, layers {args.layers}, batch {args.batch}, {args.size} px, {args.device}, "
        f"{args.threads} threads, {args.clock} clock, preset={args.preset}, "
        f"median of {args.repeats}{', interleaved' if args.interleave else ''}\n"
    )
    print(f"| row | median s | × CAM unit (row 1) | × training step (row 2) | {mem_col} |")
    print("|---|---|---|---|---|")
    for row, res in results.items():
        if "skipped" in res:
            print(f"| {ROWS[row]} | skipped: {res['skipped']} | | | |")
            continue
        ratios = [f"{res['median_s'] / unit:.2f}" if unit else "-" for unit in (cam_unit, train)]
        if args.interleave:
            mem = "-"
        elif args.device == "cuda":
            mem = f"{res['peak_cuda_mb']:.0f}"
        else:
            mem = f"{res['peak_rss_mb']:.0f} ({res['peak_rss_mb'] - res['setup_rss_mb']:.0f})"
        print(f"| {ROWS[row]} | {res['median_s']:.3f} | {ratios[0]} | {ratios[1]} | {mem} |")


def run_rows(rows: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each row in its own subprocess (its own peak memory), or all interleaved in this one."""
    if args.interleave:
        return measure_interleaved(rows, args)
    results = {}
    for row in rows:
        cmd = [sys.executable, __file__, "--row", row] + [
            f"--{k}={v}"
            for k, v in vars(args).items()
            if k not in ("row", "rows", "interleave", "sweep") and v is not None and v is not False
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[row] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row}: {results[row]}", file=sys.stderr)
    return results


def sweep(args: argparse.Namespace) -> None:
    """The ratios at batch 1 / 8 and 64 / 224 / 448 px: how the cost depends on the size."""
    print(
        f"\n{args.model}, layers {args.layers}, {args.device}, {args.threads} threads, {args.clock} clock, "
        f"median of {args.repeats}, interleaved\n"
    )
    print(
        "| batch | px | CAM unit s | training step s | RelevanceCAM K=1 × CAM unit | K=3 × CAM unit | "
        "per extra class × CAM unit | Grad-CAM × CAM unit | RelevanceCAM K=1 × training step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, size in SWEEP:
        args.batch, args.size, args.interleave = batch, size, True
        r = {row: res["median_s"] for row, res in measure_interleaved(list(ROWS), args).items()}
        unit = r["cam_unit"]
        print(
            f"| {batch} | {size} | {unit:.3f} | {r['train_step']:.3f} | {r['relevance_k1'] / unit:.2f} | "
            f"{r['relevance_k3'] / unit:.2f} | {(r['relevance_k3'] - r['relevance_k1']) / 2 / unit:.2f} | "
            f"{r['gradcam'] / unit:.2f} | {r['relevance_k1'] / r['train_step']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
