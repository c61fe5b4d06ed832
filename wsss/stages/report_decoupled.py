"""The report's part on the context-decoupling round (``classifier.context_decoupling``):
report.json keys beside round one's, which keep theirs, and report.md's comparison of the two
rounds. Only a run with the key on has any of them."""

from __future__ import annotations

from typing import Any, Callable

from wsss.stages.markdown import percent as pct

STEPS = ("seed", "pseudo", "refined")  # the pseudo-mask stage's scored steps, in order

DECOUPLING_STAGES = ("decoupled_classifier", "decoupled_pseudo_masks")


def decoupled_keys(
    records: dict[str, dict[str, Any]], names: list[str], named: Callable[..., Any]
) -> dict[str, Any]:
    """The context-decoupling round's figures, beside round one's (which keep their keys): the
    round-2 classifier's val metrics and the scores of the masks the segmenter trained on."""
    pseudo = records["decoupled_pseudo_masks"]
    keys: dict[str, Any] = {
        "decoupled_classifier": records["decoupled_classifier"].get("metrics"),
        "decoupled_thresholds": pseudo.get("thresholds"),
        "decoupled_ignore_fraction": pseudo.get("ignore_fraction"),
    }
    for step in STEPS:
        keys[f"decoupled_{step}_miou"] = pseudo.get(f"{step}_miou")
        keys[f"decoupled_{step}_per_class_iou"] = named(pseudo.get(f"{step}_per_class_iou"), names)
    return keys


def decoupled_lines(report: dict[str, Any]) -> list[str]:
    """report.md's section on the context-decoupling round: both rounds side by side."""
    if "decoupled_classifier" not in report:
        return []
    first, second = report.get("classifier") or {}, report.get("decoupled_classifier") or {}
    lines = [
        "## Context decoupling (second classifier round on copy-paste images)",
        "",
        "| step | round 1 | round 2 (the segmenter's masks) |",
        "|---|---|---|",
        f"| classifier mAP (val split) | {pct(first.get('val/mAP'))} | "
        f"{pct(second.get('val/mAP'))} |",
    ]
    for step in STEPS:
        if report.get(f"{step}_miou") is None and report.get(f"decoupled_{step}_miou") is None:
            continue
        lines.append(
            f"| {step} mIoU (train split) | {pct(report.get(f'{step}_miou'))} | "
            f"{pct(report.get(f'decoupled_{step}_miou'))} |"
        )
    names = report.get("class_names") or []
    final = next((s for s in reversed(STEPS) if report.get(f"decoupled_{s}_per_class_iou")), None)
    if final and names:
        one = report.get(f"{final}_per_class_iou") or {}
        two = report[f"decoupled_{final}_per_class_iou"]
        lines += ["", f"| class | round 1 {final} IoU | round 2 {final} IoU |", "|---|---|---|"]
        lines += [f"| {n} | {pct(one.get(n))} | {pct(two.get(n))} |" for n in names]
    return lines + [""]
