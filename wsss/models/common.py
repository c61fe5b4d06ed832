"""Shared by the training modules: stopping cleanly on a non-finite loss."""

from __future__ import annotations

import math

import lightning as L
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
