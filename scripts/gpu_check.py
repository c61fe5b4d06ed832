"""GPU check: one short script to run when a GPU machine is lent; prints one table.

    python scripts/gpu_check.py                 # on the GPU machine (about 3-6 minutes)
    python scripts/gpu_check.py --device cpu --quick    # the same checks, small, on a CPU (a dry run)

Rows:
1. CUDA maps equal CPU maps: RelevanceCAM (3 layers, 2 classes) and Grad-CAM on a random-weight
   ResNet-50, in float32 and under bf16 autocast (max |difference| over max |map|, and the
   correlation).
2. RelevanceCAM / forward+backward: 3 layers, ResNet-50, batch 8 at 224 px, K = 1 and K = 3
   (the docs/DESIGN.md speed target; the unit is one full training forward + backward).
3. The pseudo stage's maps: images per second on ResNet-50 at 448 px, 4 scales + flip, 2 classes
   per image, fused over 3 layers (``PseudoMaskModule.fused_maps``), and peak GPU memory.
4. With two GPUs: `wsss make-pseudo-masks` on a tiny synthetic run under ``trainer.strategy=ddp``
   with 1 and 2 devices: images per second and whether the masks are identical.
Weights are random (no download on the lent machine); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsss.cam import GradCAM, RelevanceCAM  # noqa: E402
from wsss.models.pseudo_labeler import PseudoMaskModule  # noqa: E402

LAYERS = ["layer2", "layer3", "layer4"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def resnet50(num_classes: int = 20) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None, num_classes=num_classes).eval()


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Worst relative max-difference and worst correlation over layers."""
    worst_diff, worst_corr = 0.0, 1.0
    for name in a:
        x, y = a[name].float().cpu().flatten(), b[name].float().cpu().flatten()
        worst_diff = max(worst_diff, float((x - y).abs().max() / x.abs().max().clamp(min=1e-12)))
        worst_corr = min(worst_corr, float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    return worst_diff, worst_corr


def check_agreement(device: torch.device, size: int) -> list[tuple[str, str]]:
    model = resnet50()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[3, 7], [0, 11]])
    rows = []
    for name, make in (
        ("RelevanceCAM", lambda m: RelevanceCAM(m, LAYERS, preset="reference")),
        ("Grad-CAM", lambda m: GradCAM(m, LAYERS)),
    ):
        with make(model) as cam:
            reference = cam(images, targets)
        gpu_model = resnet50().to(device)
        for precision in ("fp32", "bf16"):
            with (
                make(gpu_model) as cam,
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
            ):
                maps = cam(images.to(device), targets.to(device))
            diff, corr = agreement(reference, maps)
            rows.append(
                (
                    f"{name} {device.type} vs cpu, {precision}",
                    f"max rel diff {diff:.1e}, corr {corr:.5f}",
                )
            )
    return rows


def check_speed(device: torch.device, batch: int, size: int, repeats: int) -> list[tuple[str, str]]:
    model = resnet50().to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 20, (batch,), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()

    unit = timed(forward_backward, device, repeats)
    rows = [(f"forward+backward ResNet-50, batch {batch}, {size} px", f"{1000 * unit:.1f} ms")]
    for k in (1, 3):
        targets = torch.randint(0, 20, (batch, k), device=device)
        with RelevanceCAM(model, LAYERS) as cam:
            seconds = timed(lambda: cam(images, targets), device, repeats)
        rows.append(
            (
                f"RelevanceCAM 3 layers, K={k}",
                f"{1000 * seconds:.1f} ms = {seconds / unit:.2f}x fwd+bwd",
            )
        )
    return rows


def check_pseudo_throughput(
    device: torch.device, batch: int, size: int, repeats: int
) -> list[tuple[str, str]]:
    module = PseudoMaskModule(resnet50(), layers=LAYERS, scales=[0.5, 1.0, 1.5, 2.0], flip=True).to(
        device
    )
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, 20, device=device)
    labels[:, 2] = labels[:, 5] = 1.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: module.fused_maps(images, labels), device, repeats)
    rows = [
        (
            f"pseudo maps ResNet-50 {size} px, 4 scales + flip, K=2, batch {batch}",
            f"{batch / seconds:.2f} images/s",
        )
    ]
    if device.type == "cuda":
        rows.append(("  peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"))
    return rows


def check_ddp_pseudo_stage(work: Path) -> list[tuple[str, str]]:
    """A tiny run trained on one GPU, then its pseudo stage on 1 and on 2 GPUs."""
    tiny = [
        "data.num_train=256",
        "data.num_val=16",
        "data.image_size=224",
        "data.crop_size=192",
        "data.batch_size=32",
        "classifier.max_epochs=1",
        "classifier.backbone=resnet50",
        "cam.batch_size=16",
        "pseudo.calibration_images=32",
        "logger.kind=none",
        "trainer.accelerator=gpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def wsss(run_dir: Path, *args: str) -> None:
        command = [
            sys.executable,
            "-m",
            "wsss.cli",
            *args,
            "configs/default.yaml",
            f"run.dir={run_dir}",
            *tiny,
        ]
        subprocess.run(
            command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=400
        )

    rows = []
    wsss(work / "one", "train-classifier", "trainer.devices=1")
    masks = {}
    for devices in (1, 2):
        run = work / f"gpus{devices}"
        if devices == 2:
            subprocess.run(["cp", "-r", str(work / "one"), str(run)], check=True)
        else:
            run = work / "one"
        wsss(run, "make-pseudo-masks", f"trainer.devices={devices}", "trainer.strategy=ddp")
        record = json.loads((run / "default" / "pseudo_masks" / "stage.json").read_text())
        masks[devices] = {
            p.name: p.read_bytes() for p in (run / "default" / "pseudo_masks").glob("syn_*.png")
        }
        rows.append(
            (
                f"pseudo stage, {devices} GPU(s), ddp",
                f"{record['images_per_second']} images/s, shares {record['rank_counts']}",
            )
        )
    rows.append(("  masks identical on 1 and 2 GPUs", str(masks[1] == masks[2])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --device cpu --quick for a dry run")
    quick = args.quick
    rows = [
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        ("torch", torch.__version__),
    ]
    started = time.perf_counter()
    rows += check_agreement(device, 64 if quick else 224)
    rows += check_speed(device, 2 if quick else 8, 64 if quick else 224, 1 if quick else 10)
    rows += check_pseudo_throughput(
        device, 1 if quick else 8, 96 if quick else 448, 1 if quick else 3
    )
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as work:
            rows += check_ddp_pseudo_stage(Path(work))
    else:
        rows.append(("DDP pseudo stage", "skipped: needs two GPUs"))
    rows.append(("wall time of this check", f"{time.perf_counter() - started:.0f} s"))
    width = max(len(name) for name, _ in rows)
    print("| check | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
