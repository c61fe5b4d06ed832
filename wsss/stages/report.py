"""report.json (the DESIGN.md contract) and report.md, built from the stages' records."""

from __future__ import annotations

from typing import Any, Optional

from wsss.config import Config
from wsss.io import write_json_atomic, write_text_atomic
from wsss.stages.base import STAGES, is_global_zero, read_stage


def _named(values: Optional[list[float]], names: list[str]) -> Optional[dict[str, float]]:
    if values is None:
        return None
    return {name: None if v is None else round(float(v), 4) for name, v in zip(names, values)}


def build_report(cfg: Config) -> dict[str, Any]:
    """report.json: the headline numbers of every finished stage (DESIGN.md contract)."""
    records = {stage: read_stage(cfg, stage) or {} for stage in STAGES}
    pseudo, evaluation = records["pseudo_masks"], records["evaluation"]
    names = evaluation.get("class_names") or pseudo.get("class_names") or []
    return {
        "run": cfg.run.name,
        "data": cfg.data.name,
        "cam_method": cfg.cam.method,
        "seed_miou": pseudo.get("seed_miou"),
        "pseudo_miou": pseudo.get("pseudo_miou"),
        "seg_miou": evaluation.get("miou"),
        "per_class_iou": _named(evaluation.get("per_class_iou"), names),
        "pseudo_per_class_iou": _named(pseudo.get("pseudo_per_class_iou"), names),
        "seed_per_class_iou": _named(pseudo.get("seed_per_class_iou"), names),
        "thresholds": pseudo.get("thresholds"),
        "ignore_fraction": pseudo.get("ignore_fraction"),
        "classifier": records["classifier"].get("metrics"),
        "stage_seconds": {stage: records[stage].get("seconds") for stage in STAGES},
        "segmenter_masks": records["segmenter"].get("masks"),
    }


def report_markdown(report: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{100 * value:.1f}" if isinstance(value, float) else str(value))

    lines = [f"# wsss report: {report['run']}", "",
             f"data `{report['data']}`, CAM method `{report['cam_method']}`, segmenter trained on "
             f"`{report['segmenter_masks']}` masks.", "",
             "| stage | mIoU (%) |", "|---|---|",
             f"| seeds (fixed threshold, train split) | {fmt(report['seed_miou'])} |",
             f"| pseudo-masks (calibrated, train split) | {fmt(report['pseudo_miou'])} |",
             f"| segmenter (val split) | {fmt(report['seg_miou'])} |", ""]
    tables = [("seeds", report["seed_per_class_iou"]), ("pseudo-masks", report["pseudo_per_class_iou"]),
              ("segmenter", report["per_class_iou"])]
    names = next((list(t) for _, t in tables if t), [])
    if names:
        lines += ["## Per-class IoU (%)", "", "| class | " + " | ".join(n for n, _ in tables) + " |",
                  "|---|" + "---|" * len(tables)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(fmt((t or {}).get(name)) for _, t in tables) + " |")
        lines.append("")
    thresholds = report.get("thresholds") or {}
    if thresholds:
        lines += ["## Thresholds", "", f"method `{thresholds.get('method')}`, objective "
                  f"`{thresholds.get('objective')}`, global {thresholds.get('global')}", ""]
        per_class = thresholds.get("per_class") or {}
        pairs = thresholds.get("pairs") or {}
        if per_class:
            lines += ["| class | threshold | calibration pairs |", "|---|---|---|"]
            lines += [f"| {k} | {v:.3f} | {pairs.get(k, 'n/a')} |" for k, v in per_class.items()]
            if thresholds.get("low_confidence_pairs"):
                lines.append(f"\n{thresholds['low_confidence_pairs']} (image, class) pairs left out: the "
                             f"classifier scored them under pseudo.min_confidence on the whole image.")
            lines.append("")
    lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else 'n/a'} |" for k, v in report["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def write_report(cfg: Config) -> dict[str, Any]:
    report = build_report(cfg)
    if not is_global_zero():
        return report
    write_json_atomic(cfg.run_dir / "report.json", report)
    write_text_atomic(cfg.run_dir / "report.md", report_markdown(report))
    return report
