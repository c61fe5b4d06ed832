"""The pieces the config schema is built from: the error every config check raises, the Range a
number must lie in, and the field helpers that put a key's default, help, choices and range into
its dataclass field's metadata (the shared training keys declared once)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is not one of its choices."""


@dataclass(frozen=True)
class Range:
    """Where a number must lie (for a list: every item, and the list must not be empty), and how
    the error says so: ``<key>: <wording>, got <value>``. A null value of an optional key is not
    checked."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    wording: str = ""

    def admits(self, value: Any) -> bool:
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(self._admits_one(item) for item in items)

    def _admits_one(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def interval(text: str) -> Range:
    """A Range written as an interval, e.g. ``"(0, 1]"``; its error reads "must lie in (0, 1]"."""
    low, high = (float(bound) for bound in text[1:-1].split(","))
    return Range(
        low, high, open_low=text[0] == "(", open_high=text[-1] == ")", wording=f"must lie in {text}"
    )


AT_LEAST_ONE = Range(low=1, wording="must be at least 1")
NOT_NEGATIVE = Range(low=0, wording="must be >= 0")
FRACTION = interval("[0, 1]")  # a fraction of a sigmoid confidence


def choice(default: Any, *choices: Any, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def option(default: Any, help: str = "", check: Optional[Range] = None) -> Any:
    metadata = {"help": help, **({"check": check} if check else {})}
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: list(default) if isinstance(default, list) else dict(default),
            metadata=metadata,
        )
    return field(default=default, metadata=metadata)


# The keys the training groups (classifier, affinity, segmenter) share, declared once. Each group
# keeps them where they always stood, so no key moves; the help says what differs per group.


def epochs_option(default: int) -> Any:
    return option(default, "training epochs", check=AT_LEAST_ONE)


def lr_option(default: float, help: str) -> Any:
    return option(default, help, check=NOT_NEGATIVE)


def backbone_lr_mult_option() -> Any:
    return option(0.1, "backbone learning rate = lr * this")


def weight_decay_option(help: str) -> Any:
    return option(1e-4, help, check=NOT_NEGATIVE)


def momentum_option() -> Any:
    return option(0.9, "SGD momentum")


def schedule_option() -> Any:
    return choice("poly", "poly", "cosine", "constant", help="learning-rate schedule")


def optimizer_option(help: str) -> Any:
    return choice("sgd", "sgd", "adamw", help=help)
