"""Training throughput: Lightning modules against a bare PyTorch loop (same model, data, batch).

    .venv/bin/python scripts/benchmark_training.py [--steps 12] [--size 160] [--batch 16]

Data: built-in synthetic images, generated once and held in memory, so the figures measure the
training step and Lightning's per-step overhead, not image decoding. The first 2 steps of each
run are warm-up and not timed. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from wsss.data.synthetic import SyntheticSegmentation
from wsss.models.classifier import ClassifierModule
from wsss.models.segmenter import SegmenterModule

WARMUP = 2


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


def in_memory_batches(steps: int, batch: int, size: int) -> list[dict]:
    data = SyntheticSegmentation("train", num_images=batch, image_size=size, seed=0)
    items = [data[i] for i in range(batch)]
    one = {
        "image": torch.stack([i["image"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "mask": torch.stack([i["mask"] for i in items]),
        "id": [i["id"] for i in items],
    }
    return [one] * (steps + WARMUP)


def images_per_second(marks: list[float], batch: int) -> float:
    timed = marks[WARMUP - 1 :]  # intervals after the warm-up steps
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def lightning_run(module: L.LightningModule, batches: list[dict], device: str) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return images_per_second(timer.marks, len(batches[0]["image"]))


def bare_run(model: nn.Module, loss_of, batches: list[dict], device: str, lr: float) -> float:
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model.to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    marks = []
    for batch in batches:
        images = batch["image"].to(dev)
        loss = loss_of(model(images), batch, dev)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    return images_per_second(marks, len(batches[0]["image"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    batches = in_memory_batches(args.steps, args.batch, args.size)
    rows = []

    torch.manual_seed(0)
    classifier = ClassifierModule(num_classes=4, backbone="resnet18", lr=0.01)
    light = lightning_run(classifier, batches, args.device)
    torch.manual_seed(0)
    bce = nn.BCEWithLogitsLoss()
    bare = bare_run(
        ClassifierModule(num_classes=4, backbone="resnet18").model,
        lambda out, b, dev: bce(out, b["labels"].to(dev)),
        batches,
        args.device,
        0.01,
    )
    rows.append(("classifier resnet18", light, bare))

    torch.manual_seed(0)
    segmenter = SegmenterModule(num_classes=5, arch="DeepLabV3Plus", encoder="resnet18")
    light = lightning_run(segmenter, batches, args.device)
    torch.manual_seed(0)
    ce = nn.CrossEntropyLoss(ignore_index=255)
    bare = bare_run(
        SegmenterModule(num_classes=5, arch="DeepLabV3Plus", encoder="resnet18").net,
        lambda out, b, dev: ce(out, b["mask"].to(dev)),
        batches,
        args.device,
        0.01,
    )
    rows.append(("segmenter DeepLabV3+ resnet18", light, bare))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"device {args.device}, "
        f"torch {torch.__version__}, batch {args.batch}, {args.size} px, {args.steps} timed steps"
    )
    print("| stage | Lightning img/s | bare loop img/s | Lightning / bare |")
    print("|---|---|---|---|")
    for name, light, bare in rows:
        print(f"| {name} | {light:.1f} | {bare:.1f} | {light / bare:.2f} |")


if __name__ == "__main__":
    main()
