"""Shared by the training modules: stopping cleanly on a non-finite loss, RNG states kept in
checkpoints, the optimizer with its per-step learning-rate schedule."""

from __future__ import annotations

import math
import random
from typing import Any

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
        f"trainer.precision=32-true; no checkpoint of these weights was written")


class RNGStateCallback(L.Callback):
    """Keeps the random number generators' states in every checkpoint and restores them on
    resume, so a training stage resumed from ``last.ckpt`` draws the same numbers (dropout,
    anything random in the model) as an uninterrupted run. Data order and augmentation do not
    use these generators (see ``wsss.data.samplers``)."""

    KEY = "wsss_rng_states"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
        numpy_state = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss), "gauss": float(gauss)}
        states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state,
                                  "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(self.KEY)
        if states is None:  # a checkpoint from before RNG states were kept
            return
        torch.set_rng_state(states["torch"])
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                             n["gauss"]))
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def optimizer_with_schedule(module: L.LightningModule, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``configure_optimizers``'s answer for parameter ``groups`` (each with its own ``lr``):
    AdamW or SGD with momentum by ``hparams.optimizer``, weight decay ``hparams.weight_decay``,
    and the ``hparams.schedule`` multiplier stepped every optimizer step."""
    from wsss.models.classifier import lr_lambda, planned_steps

    hp = module.hparams
    if hp.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.schedule, planned_steps(module)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
