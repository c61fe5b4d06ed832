"""Seconds per image of each refinement (``wsss.pseudo.refine``), at the default synthetic size and
at a VOC-like 512x384, with their default parameters. Prints a markdown table.

Rows: PAR (6 dilations, 10 iterations, full resolution); the random walk alone (stride 4,
radius 5, beta 8, 16 or 256 steps, on the feature grid) and with the resampling of
``random_walk_refine``;
the affinity network's ``predict_affinity`` (ResNet-18 at output stride 16, four levels); the
dense CRF when the ``crf`` extra is installed. Scores are random distributions over
``--classes`` channels (background + the present classes), images random: neither method's
time depends on the values.

    python scripts/benchmark_refine.py                          # CPU, 112x112 and 512x384
    python scripts/benchmark_refine.py --device cuda --batch 8  # GPU

``--quality RUN_DIR`` instead scores the refinements on a finished run's pseudo-mask stage (made
with ``pseudo.save_maps=true``): the saved fused maps and calibrated thresholds of the training
split become distributions (``slot_distribution``), are refined by none / par / the random walk of
an AffinityModule trained here on the run's pseudo-masks (frozen and fine-tuned backbone), and
are scored against ground truth: mIoU with 255 counted as background (as the pipeline scores
masks), and with each confidence-ignore rule, the ignored share and the mIoU of the kept pixels.

    python scripts/benchmark_refine.py --quality checkpoints/default --affinity-epochs 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

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
    from wsss.pseudo.refine import (
        Affinities,
        crf,
        neighbour_offsets,
        par,
        random_walk,
        random_walk_refine,
    )

    gen = torch.Generator().manual_seed(0)
    b, c, device = args.batch, args.classes, args.device
    images = torch.randn(b, 3, height, width, generator=gen).to(device)
    scores = torch.rand(b, c, height, width, generator=gen).to(device)
    scores = scores / scores.sum(1, keepdim=True)
    stride, radius = 4, 5
    h, w = -(-height // stride), -(-width // stride)
    affinity = torch.rand(b, len(neighbour_offsets(radius)), h, w, generator=gen).to(device)
    cells = scores[..., ::stride, ::stride].contiguous()
    module = (
        AffinityModule(
            build_backbone("resnet18", 20, output_stride=16), stride=stride, radius=radius
        )
        .to(device)
        .eval()
    )
    rows = {
        "par": lambda: par(scores, images),
        "random walk, 16 steps (feature grid)": lambda: random_walk(
            cells, affinity, radius, beta=8.0, steps=16
        ),
        "random walk, 256 steps (feature grid)": lambda: random_walk(
            cells, affinity, radius, beta=8.0, steps=256
        ),
        "random walk, 256 steps + resampling": lambda: random_walk_refine(
            scores, Affinities(affinity, radius, stride)
        ),
        "predict_affinity (ResNet-18)": lambda: module.predict_affinity(images),
    }
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        pass
    else:
        colours = [
            (torch.rand(height, width, 3, generator=gen) * 255).byte().numpy() for _ in range(b)
        ]
        rows["dense CRF (5 iterations)"] = lambda: crf(scores, colours)
    with torch.no_grad():
        return {name: seconds_per_image(run, b, args.repeats, device) for name, run in rows.items()}


def _scores_and_truth(source, pseudo_dir, batch_size: int, limit: Optional[int] = None):
    """Batches of (batch, slot distributions, classes, valid, pixel mask) of the training split."""
    import numpy as np

    from wsss.data.datamodule import pad_collate
    from wsss.io import read_json
    from wsss.pseudo.refine import pixel_mask, slot_distribution

    thresholds = read_json(pseudo_dir / "thresholds.json")
    per_class = torch.tensor([float(thresholds["per_class"][n]) for n in source.class_names])
    count = len(source) if limit is None else min(limit, len(source))
    for start in range(0, count, batch_size):
        batch = pad_collate([source[i] for i in range(start, min(count, start + batch_size))])
        b, _, height, width = batch["image"].shape
        saved = [np.load(pseudo_dir / "maps" / f"{i}.npz") for i in batch["id"]]
        k = max(1, max(len(z["classes"]) for z in saved))
        fused = torch.zeros(b, k, height, width)
        classes = torch.ones(b, k, dtype=torch.long)
        valid = torch.zeros(b, k, dtype=torch.bool)
        for i, z in enumerate(saved):
            n, h, w = z["maps"].shape
            fused[i, :n, :h, :w] = torch.from_numpy(z["maps"].astype(np.float32))
            classes[i, :n] = torch.from_numpy(z["classes"].astype(np.int64))
            valid[i, :n] = True
        probs = slot_distribution(fused, valid, per_class[classes - 1])
        mask = pixel_mask(batch["size"], height, width)
        yield batch, probs, classes, valid, mask


def train_affinity(cfg, classifier, masks_dir, freeze: bool, epochs: int, device: str, cache=None):
    """An AffinityModule fitted on the run's training images with ``masks_dir`` as seeds (loaded
    from the checkpoint ``cache`` instead when it exists; saved there otherwise)."""
    import lightning as L

    from wsss.data.datamodule import build_source, make_loader
    from wsss.data.transforms import train_transform
    from wsss.models.affinity import AffinityModule

    mean, std = classifier.hparams.mean, classifier.hparams.std
    augment = train_transform(cfg.data.crop_size, tuple(float(m) for m in mean), seed=cfg.run.seed)
    train_set = build_source(cfg, cfg.data.train_split, augment, mean, std)
    train_set.use_masks_from(masks_dir)
    loader = make_loader(train_set, cfg, cfg.data.batch_size, shuffle=True, drop_last=True)
    torch.manual_seed(cfg.run.seed)
    module = AffinityModule(classifier.export(), freeze_backbone=freeze)
    if cache is not None and cache.is_file():
        return AffinityModule.load_from_checkpoint(cache, backbone=classifier.export()).eval().to(
            device
        ), 0.0
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cuda" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    if cache is not None:
        trainer.save_checkpoint(cache)
    return module.eval().to(device), seconds


def _par(options: dict, device: str) -> Callable:
    from wsss.pseudo.refine import par

    return lambda probs, batch, mask: par(probs, batch["image"].to(device), valid=mask, **options)


def _chain(first: Callable, second: Callable) -> Callable:
    return lambda probs, batch, mask: second(first(probs, batch, mask), batch, mask)


class _Walker:
    """The random walk of a trained AffinityModule; also counts how its affinities agree with the
    ground-truth pairs (affinity > 0.5 on same-label pairs, <= 0.5 across labels)."""

    def __init__(self, module, device: str, steps: int, beta: float) -> None:
        self.module, self.device, self.steps, self.beta = module, device, steps, beta
        self.hits = {"pos": [0, 0], "neg": [0, 0]}

    def __call__(self, probs, batch, mask):
        from wsss.models.affinity import propagate
        from wsss.pseudo.refine import affinity_labels

        affinities = self.module.predict_affinity(batch["image"].to(self.device))
        pairs = affinity_labels(batch["mask"].to(self.device), affinities.radius, affinities.stride)
        values = affinities.values
        for kind, chosen, right in (
            ("pos", pairs["bg_pos"] | pairs["fg_pos"], values > 0.5),
            ("neg", pairs["neg"], values <= 0.5),
        ):
            self.hits[kind][0] += int((right & chosen).sum())
            self.hits[kind][1] += int(chosen.sum())
        return propagate(affinities, probs, valid=mask, beta=self.beta, steps=self.steps)

    def accuracy(self) -> str:
        pos, neg = (self.hits[k][0] / max(1, self.hits[k][1]) for k in ("pos", "neg"))
        return (
            f"ground-truth pairs: {100 * pos:.1f} % of same-label and "
            f"{100 * neg:.1f} % of cross-label right"
        )


def quality(args: argparse.Namespace) -> None:
    from pathlib import Path

    from wsss.config import load_config
    from wsss.data.datamodule import build_source
    from wsss.metrics import SegmentationScores
    from wsss.models.classifier import ClassifierModule
    from wsss.pseudo.refine import distribution_labels, ignore_uncertain

    run_dir = Path(args.quality)
    cfg = load_config(run_dir / "config.yaml")
    record = json.loads((run_dir / "classifier" / "stage.json").read_text())
    classifier = ClassifierModule.load_from_checkpoint(
        run_dir / "classifier" / record["checkpoint"], map_location="cpu"
    )
    pseudo_dir = run_dir / "pseudo_masks"
    device = args.device
    methods: dict[str, Callable] = {"none": lambda probs, batch, mask: probs}
    for variant in args.par:
        iterations, dilations = variant.split("@")
        options = {
            "iterations": int(iterations),
            "dilations": tuple(int(d) for d in dilations.split(",")),
        }
        methods[f"par {variant}"] = _par(options, device)
    fit_seconds = {}
    for freeze in args.affinity_backbones:
        kind = "frozen" if freeze else "fine-tuned"
        cache = None
        if args.affinity_cache:
            cache = Path(args.affinity_cache) / f"affinity_{kind}_{args.affinity_epochs}.ckpt"
        seeds = Path(args.affinity_seeds) if args.affinity_seeds else pseudo_dir
        module, fit_seconds[kind] = train_affinity(
            cfg, classifier, seeds, freeze, args.affinity_epochs, device, cache
        )
        for walk in args.walks:
            steps, beta = walk.split(":")
            methods[f"affinity {kind} {steps} steps beta {beta}"] = _Walker(
                module, device, int(steps), float(beta)
            )
            if args.par:  # the walk from the first PAR variant's output
                first = methods[f"par {args.par[0]}"]
                walker = _Walker(module, device, int(steps), float(beta))
                methods[f"par {args.par[0]} then affinity {kind} {steps} steps beta {beta}"] = (
                    _chain(first, walker)
                )
    rules = {
        rule: ({} if rule == "none" else {rule.split(":")[0]: float(rule.split(":")[1])})
        for rule in args.rules
    }
    source = build_source(
        cfg, cfg.data.train_split, None, classifier.hparams.mean, classifier.hparams.std
    )
    meters: dict[tuple[str, str], list] = {}
    seconds = {name: 0.0 for name in methods}
    images = 0
    with torch.no_grad():
        for batch, probs, classes, valid, mask in _scores_and_truth(
            source, pseudo_dir, args.batch, args.limit
        ):
            probs, classes, valid, mask = (
                probs.to(device),
                classes.to(device),
                valid.to(device),
                mask.to(device),
            )
            truth = batch["mask"].to(device)
            images += len(truth)
            for name, method in methods.items():
                start = time.perf_counter()
                refined = method(probs, batch, mask)
                _sync(device)
                seconds[name] += time.perf_counter() - start
                labels = distribution_labels(refined, classes, valid)
                for rule, options in rules.items():
                    out = ignore_uncertain(labels, refined, pixel_mask=mask, **options)
                    all_meter, kept_meter, counts = meters.setdefault(
                        (name, rule),
                        [
                            SegmentationScores(source.num_classes),
                            SegmentationScores(source.num_classes),
                            [0, 0],
                        ],
                    )
                    ignored = out == 255
                    all_meter.update(out.masked_fill(ignored, 0), truth)
                    kept_meter.update(out.masked_fill(ignored, 0), truth.masked_fill(ignored, 255))
                    counts[0] += int((ignored & mask).sum())
                    counts[1] += int(mask.sum())
    print(
        f"run {run_dir}, {images} training images, device {device}; affinity: "
        f"{args.affinity_epochs} epochs on the run's pseudo-masks\n"
    )
    print(
        "| refinement | ignore rule | mIoU (255 as bg) | ignored | mIoU of kept pixels | s / image |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for (name, rule), (all_meter, kept_meter, counts) in meters.items():
        print(
            f"| {name} | {rule} | {100 * all_meter.compute()['miou']:.1f} "
            f"| {100 * counts[0] / counts[1]:.1f} % | "
            f"{100 * kept_meter.compute()['miou']:.1f} | {seconds[name] / images:.3f} |"
        )
    for name, method in methods.items():
        if isinstance(method, _Walker):
            print(f"\n{name}: {method.accuracy()}")
    for kind, value in fit_seconds.items():
        print(f"affinity {kind}: trained in {value:.0f} s (0: loaded from --affinity-cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["112x112", "384x512"], help="HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--classes", type=int, default=3, help="channels: background + present classes"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--quality", default=None, help="a run directory: score the refinements instead"
    )
    parser.add_argument("--affinity-epochs", type=int, default=8)
    parser.add_argument(
        "--limit", type=int, default=None, help="--quality: score only the first N images"
    )
    parser.add_argument(
        "--affinity-cache", default=None, help="--quality: folder to keep trained affinity nets"
    )
    parser.add_argument(
        "--affinity-seeds",
        default=None,
        help="--quality: label PNGs that train the affinity net (default: the run's pseudo-masks)",
    )
    parser.add_argument(
        "--walks", nargs="*", default=["256:8"], help="--quality: random walks STEPS:BETA"
    )
    parser.add_argument(
        "--par",
        nargs="*",
        default=["10@1,2,4,8,12,24"],
        help="--quality: PAR variants ITERATIONS@DILATIONS",
    )
    parser.add_argument(
        "--rules",
        nargs="*",
        default=["none", "margin:0.1", "margin:0.2", "quantile:0.1"],
        help="--quality: ignore rules none | margin:BAND | quantile:Q",
    )
    parser.add_argument(
        "--affinity-backbones",
        nargs="*",
        type=lambda v: v == "frozen",
        default=[True, False],
        help="frozen and/or tuned",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        quality(args)
        return
    results = {}
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        results[size] = measure(height, width, args)
    names = list(next(iter(results.values())))
    print(
        f"device {args.device}, batch {args.batch}, {args.classes} channels, "
        f"{torch.get_num_threads()} threads; seconds per image (median of {args.repeats})\n"
    )
    print("| refinement | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(
            f"| {name} | "
            + " | ".join(f"{results[s].get(name, float('nan')):.3f}" for s in results)
            + " |"
        )


if __name__ == "__main__":
    main()
