"""Shared by the training modules: stopping cleanly on a non-finite loss, RNG states kept in
checkpoints, the optimizer with its per-step learning-rate schedule."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the optimizer step or a checkpoint."""


def check_finite_loss(module: L.LightningModule, loss: Tensor) -> None:
    """Raise NonFiniteLossError (step, learning rate, last finite loss) if ``loss`` is not finite.

    Raised inside ``training_step``, i.e. before the optimizer step, so no NaN weights are ever
    stepped into or saved.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        module._last_finite_loss = value
        return
    lr = None
    trainer = module._trainer
    if trainer is not None and trainer.optimizers:
        lr = [group["lr"] for group in trainer.optimizers[0].param_groups]
    last = getattr(module, "_last_finite_loss", None)
    raise NonFiniteLossError(
        f"non-finite loss ({value}) at step {module.global_step}; learning rate(s) {lr}; last finite "
        f"loss {last}. Lower the learning rate (e.g. classifier.lr / segmenter.lr) or use "
        f"trainer.precision=32-true; no checkpoint of these weights was written"
    )


class RNGStateCallback(L.Callback):
    """Keeps the random number generators' states in every checkpoint and restores them on
    resume, so a training stage resumed from ``last.ckpt`` draws the same numbers (dropout,
    anything random in the model) as an uninterrupted run. Data order and augmentation do not
    use these generators (see ``wsss.data.samplers``)."""

    KEY = "wsss_rng_states"

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
        numpy_state = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
        states: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": numpy_state,
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.KEY] = states

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get(self.KEY)
        if states is None:  # a checkpoint from before RNG states were kept
            return
        torch.set_rng_state(states["torch"])
        n = states["numpy"]
        np.random.set_state(
            (
                n["name"],
                n["keys"].numpy().astype(np.uint32),
                n["position"],
                n["has_gauss"],
                n["gauss"],
            )
        )
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def lr_lambda(schedule: str, total_steps: int | Callable[[], int]) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimizer step.

    ``total_steps`` may be a callable, resolved at the first step after step 0 (the multiplier
    at step 0 is 1 whatever the total). Modules pass ``trainer.estimated_stepping_batches`` that
    way: asking for it in ``configure_optimizers`` makes Lightning build the training iterator
    before a resumed fit has restored its epoch, so a loader with workers would replay epoch 0.
    """
    resolved: list[int] = []

    def total() -> int:
        if not resolved:
            resolved.append(max(1, int(total_steps() if callable(total_steps) else total_steps)))
        return resolved[0]

    if schedule == "poly":
        return lambda step: 1.0 if step == 0 else max(0.0, 1.0 - step / total()) ** 0.9
    if schedule == "cosine":
        return lambda step: (
            1.0 if step == 0 else (0.5 * (1.0 + math.cos(math.pi * min(step, total()) / total())))
        )
    return lambda step: 1.0


def planned_steps(module: L.LightningModule) -> Callable[[], int]:
    """The optimizer steps of the whole fit, asked of the trainer only when first needed."""
    return lambda: (
        int(module.trainer.estimated_stepping_batches) if module._trainer is not None else 1
    )


def optimizer_with_schedule(
    module: L.LightningModule, groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """``configure_optimizers``'s answer for parameter ``groups`` (each with its own ``lr``):
    AdamW or SGD with momentum by ``hparams.optimizer``, weight decay ``hparams.weight_decay``,
    and the ``hparams.schedule`` multiplier stepped every optimizer step."""
    hp = module.hparams
    if hp.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(hp.schedule, planned_steps(module))
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
