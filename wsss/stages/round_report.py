"""The self-training rounds in report.json and report.md: per round, the mIoU (and per-class IoU)
of the masks it trained on against the training ground truth, and of its segmenter on the val
split. Only runs with ``segmenter.rounds`` > 1 have these keys; others keep their report as is."""

from __future__ import annotations

from typing import Any, Optional

from wsss.config import Config
from wsss.stages.markdown import class_table
from wsss.stages.markdown import percent as _pct
from wsss.stages.registry import round_name

ROUND_KEYS = (
    "round_masks_miou",
    "round_seg_miou",
    "round_masks_per_class_iou",
    "round_per_class_iou",
    "round_seconds",
)


def _round(value: Any) -> Optional[float]:
    return None if not isinstance(value, (int, float)) else round(float(value), 4)


def _per_class(values: Optional[list], names: list[str]) -> Optional[dict[str, Optional[float]]]:
    if values is None:
        return None
    return {name: _round(v) for name, v in zip(names, values)}


def _segmenter_per_class(record: dict[str, Any], names: list[str]) -> Optional[dict]:
    """A segmenter's val per-class IoU from its training metrics (``val/iou_<class>``)."""
    metrics = record.get("metrics") or {}
    if not any(key.startswith("val/iou_") for key in metrics):
        return None
    return {name: _round(metrics.get(f"val/iou_{name}")) for name in names}


def round_keys(
    cfg: Config, records: dict[str, dict[str, Any]], pseudo: dict[str, Any], names: list[str]
) -> dict[str, Any]:
    """report.json's round keys, each a dict keyed by the round number as a string ("1", "2",
    ...); round 1's masks are the pseudo-masks (refined where a refinement ran; None when the
    segmenter trained on ground truth or a folder of masks)."""
    if cfg.segmenter.rounds < 2:
        return {}
    final = "refined" if pseudo.get("refined_miou") is not None else "pseudo"
    on_pseudo = cfg.segmenter.masks == "pseudo"
    out: dict[str, dict[str, Any]] = {key: {} for key in ROUND_KEYS}
    for index in range(1, cfg.segmenter.rounds + 1):
        record = records.get(round_name(index)) or {}
        key = str(index)
        if index == 1:
            miou = pseudo.get(f"{final}_miou") if on_pseudo else None
            per_class = pseudo.get(f"{final}_per_class_iou") if on_pseudo else None
        else:
            miou, per_class = record.get("masks_miou"), record.get("masks_per_class_iou")
        out["round_masks_miou"][key] = _round(miou)
        out["round_masks_per_class_iou"][key] = _per_class(per_class, names)
        out["round_seg_miou"][key] = _round((record.get("metrics") or {}).get("val/miou"))
        out["round_per_class_iou"][key] = _segmenter_per_class(record, names)
        out["round_seconds"][key] = record.get("seconds")
    return out


def rounds_markdown(report: dict[str, Any]) -> list[str]:
    """report.md's self-training section: one row per round, then per-class IoU per round."""
    seg = report.get("round_seg_miou")
    if not seg:
        return []
    masks, seconds = report.get("round_masks_miou") or {}, report.get("round_seconds") or {}
    lines = [
        "## Self-training rounds",
        "",
        "Round 1 trains on the pseudo-masks; round r on round r-1's predictions of the training "
        "split. Masks scored on the training split, segmenters on the val split (no test-time "
        "augmentation); evaluation scores the last round. Each round r > 1 draws its masks "
        "beside round r-1's in `segmenter_round<r>/panels.png` (with `pseudo.num_panels` > 0).",
        "",
        "| round | masks mIoU (%) | segmenter mIoU (%) | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r} | {_pct(masks.get(r))} | {_pct(seg.get(r))} | {seconds.get(r, 'n/a')} |"
        for r in seg
    ]
    names = report.get("class_names") or []
    tables = [
        (f"{kind} r{r}", table)
        for kind, key in (
            ("masks", "round_masks_per_class_iou"),
            ("segmenter", "round_per_class_iou"),
        )
        for r, table in (report.get(key) or {}).items()
        if table
    ]
    if names and tables:
        lines += ["", *class_table(names, tables)]
    return lines + [""]
