"""Seconds per image of each refinement (``wsss.pseudo.refine``), at the default synthetic size and
at a VOC-like 512x384, with their default parameters. Prints a markdown table.

Rows: PAR (6 dilations, 10 iterations, full resolution); the random walk alone (stride 4,
radius 5, beta 8, 256 steps, on the feature grid) and with the resampling of ``random_walk_refine``;
the affinity network's ``predict_affinity`` (ResNet-18 at output stride 16, four levels); the
dense CRF when the ``crf`` extra is installed. Scores are random distributions over
``--classes`` channels (background + the present classes), images random: neither method's
time depends on the values.

    python scripts/benchmark_refine.py                          # CPU, 112x112 and 512x384
    python scripts/benchmark_refine.py --device cuda --batch 8  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_image(run: Callable[[], object], batch: int, repeats: int, device: str) -> float:
    """Median over ``repeats`` (after one warm-up) of the time of ``run`` / batch size."""
    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def measure(height: int, width: int, args: argparse.Namespace) -> dict[str, float]:
    from wsss.models.affinity import AffinityModule
    from wsss.models.classifier import build_backbone
    from wsss.pseudo.refine import (Affinities, crf, neighbour_offsets, par, random_walk,
                                    random_walk_refine)

    gen = torch.Generator().manual_seed(0)
    b, c, device = args.batch, args.classes, args.device
    images = torch.randn(b, 3, height, width, generator=gen).to(device)
    scores = torch.rand(b, c, height, width, generator=gen).to(device)
    scores = scores / scores.sum(1, keepdim=True)
    stride, radius = 4, 5
    h, w = -(-height // stride), -(-width // stride)
    affinity = torch.rand(b, len(neighbour_offsets(radius)), h, w, generator=gen).to(device)
    cells = scores[..., ::stride, ::stride].contiguous()
    module = AffinityModule(build_backbone("resnet18", 20, output_stride=16), stride=stride,
                            radius=radius).to(device).eval()
    rows = {
        "par": lambda: par(scores, images),
        "random walk (feature grid)": lambda: random_walk(cells, affinity, radius, beta=8.0, steps=256),
        "random walk + resampling": lambda: random_walk_refine(scores, Affinities(affinity, radius, stride)),
        "predict_affinity (ResNet-18)": lambda: module.predict_affinity(images),
    }
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        pass
    else:
        colours = [(torch.rand(height, width, 3, generator=gen) * 255).byte().numpy() for _ in range(b)]
        rows["dense CRF (5 iterations)"] = lambda: crf(scores, colours)
    with torch.no_grad():
        return {name: seconds_per_image(run, b, args.repeats, device) for name, run in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["112x112", "384x512"], help="HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3, help="channels: background + present classes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        results[size] = measure(height, width, args)
    names = list(next(iter(results.values())))
    print(f"device {args.device}, batch {args.batch}, {args.classes} channels, "
          f"{torch.get_num_threads()} threads; seconds per image (median of {args.repeats})\n")
    print("| refinement | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[s].get(name, float('nan')):.3f}" for s in results) + " |")


if __name__ == "__main__":
    main()
