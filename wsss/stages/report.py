"""report.json (the docs/DESIGN.md contract, keys only ever added) and report.md, built from the
stages' records; the report also goes to its own wandb run in the run's group, with the report
numbers in its summary and the files as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from wsss.config import Config
from wsss.distributed import is_global_zero
from wsss.io import read_json, write_json_atomic, write_text_atomic
from wsss.stages import registry
from wsss.stages.markdown import class_table
from wsss.stages.markdown import percent as _pct
from wsss.stages.records import read_stage, stage_dir
from wsss.stages.report_decoupled import (  # STEPS: the pseudo-mask stage's scored steps
    DECOUPLING_STAGES,
    STEPS,
    decoupled_keys,
    decoupled_lines,
)
from wsss.stages.round_report import round_keys, rounds_markdown
from wsss.tracking import close_logger, log_artifact, log_summary, make_logger, run_paths


def _named(
    values: Optional[list[Optional[float]]], names: list[str]
) -> Optional[dict[str, Optional[float]]]:
    if values is None:
        return None
    return {name: None if v is None else round(float(v), 4) for name, v in zip(names, values)}


def _reference(cfg: Config) -> Optional[dict[str, Any]]:
    """The ground-truth-trained run that ``run.reference`` names, if finished."""
    if not cfg.run.reference:
        return None
    path = Path(cfg.run.reference) / "report.json"
    if not path.is_file():
        return {"run": cfg.run.reference, "missing": True}
    other = read_json(path)
    return {
        "run": cfg.run.reference,
        "seg_miou": other.get("seg_miou"),
        "dice": other.get("dice"),
        "segmenter_masks": other.get("segmenter_masks"),
    }


def build_report(cfg: Config) -> dict[str, Any]:
    """report.json: the headline numbers of every finished stage (docs/DESIGN.md contract)."""
    records = {stage.name: read_stage(cfg, stage.name) or {} for stage in registry.expand(cfg)}
    # the refined step comes from the pseudo stage (par / crf) or the affinity stage
    pseudo = {
        **{k: v for k, v in records["affinity"].items() if k.startswith("refined_")},
        **records["pseudo_masks"],
    }
    evaluation = records["evaluation"]
    names = evaluation.get("class_names") or pseudo.get("class_names") or []
    report: dict[str, Any] = {
        "run": cfg.run.name,
        "data": cfg.data.name,
        "cam_method": cfg.cam.method,
        "seed_miou": pseudo.get("seed_miou"),
        "pseudo_miou": pseudo.get("pseudo_miou"),
        "refined_miou": pseudo.get("refined_miou"),
        # with pseudo.affinity_labels: the in-image refined masks the affinity stage learnt from
        "affinity_labels_miou": pseudo.get("affinity_labels_miou"),
        "affinity_labels_per_class_iou": _named(pseudo.get("affinity_labels_per_class_iou"), names),
        "seg_miou": evaluation.get("miou"),
        "seg_miou_crf": evaluation.get("crf_miou"),
        "per_class_iou": _named(evaluation.get("per_class_iou"), names),
        "dice": evaluation.get("dice"),
        "per_class_dice": _named(evaluation.get("per_class_dice"), names),
        "seg_pixel_accuracy": evaluation.get("pixel_accuracy"),
        "seg_mean_class_accuracy": evaluation.get("mean_class_accuracy"),
        "thresholds": pseudo.get("thresholds"),
        "ignore_fraction": pseudo.get("ignore_fraction"),
        "classifier": records["classifier"].get("metrics"),
        "stage_seconds": {
            stage: record.get("seconds")
            for stage, record in records.items()
            if record or stage not in DECOUPLING_STAGES  # a default run lists what it always did
        },
        "segmenter_masks": records[registry.final_segmenter(cfg)].get("masks"),
        "class_names": names,
        "absent_classes": {
            "segmenter": [
                names[c] for c in evaluation.get("absent_classes") or [] if c < len(names)
            ],
            "pseudo": [
                names[c] for c in pseudo.get("pseudo_absent_classes") or [] if c < len(names)
            ],
        },
        "scored_on": pseudo.get("scored_on"),
        "reference": _reference(cfg),
        "panels": str(stage_dir(cfg, "pseudo_masks") / "panels.png")
        if (stage_dir(cfg, "pseudo_masks") / "panels.png").is_file()
        else None,
        "wandb_runs": run_paths(cfg) if cfg.logger.kind == "wandb" else None,
    }
    for step in STEPS:
        report[f"{step}_per_class_iou"] = _named(pseudo.get(f"{step}_per_class_iou"), names)
        for key in ("dice", "pixel_accuracy", "mean_class_accuracy"):
            report[f"{step}_{key}"] = pseudo.get(f"{step}_{key}")
        report[f"{step}_per_class_dice"] = _named(pseudo.get(f"{step}_per_class_dice"), names)
    report.update(round_keys(cfg, records, pseudo, names))
    if cfg.classifier.context_decoupling:
        report.update(decoupled_keys(records, names, _named))
    return report


MEDICAL_SOURCES = ("folder", "synthetic_lesion")  # reports lead with each finding's Dice and IoU


def _foreground_table(report: dict[str, Any]) -> list[str]:
    """Dice and IoU of each foreground class (finding) and their means: what medical
    segmentation reports first, before the background-inclusive mIoU."""
    names = [n for n in (report.get("class_names") or [])[1:]]
    columns = [
        ("pseudo-mask Dice", report.get("pseudo_per_class_dice")),
        ("pseudo-mask IoU", report.get("pseudo_per_class_iou")),
        ("segmenter Dice", report.get("per_class_dice")),
        ("segmenter IoU", report.get("per_class_iou")),
    ]
    columns = [(title, table) for title, table in columns if table]
    if not names or not columns:
        return []

    def mean(table: dict[str, Optional[float]]) -> Optional[float]:
        values = [table.get(n) for n in names if table.get(n) is not None]
        return sum(values) / len(values) if values else None

    lines = [
        "## Findings (foreground classes)",
        "",
        "| finding | " + " | ".join(t for t, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {n} | " + " | ".join(_pct(t.get(n)) for _, t in columns) + " |" for n in names]
    lines += ["| **mean** | " + " | ".join(_pct(mean(t)) for _, t in columns) + " |", ""]
    return lines


def _summary_table(report: dict[str, Any]) -> list[str]:
    classifier = report.get("classifier") or {}
    rows = [
        (
            "classifier (val split)",
            f"mAP {_pct(classifier.get('val/mAP'))}, F1 {_pct(classifier.get('val/f1'))}",
            "",
            "",
            "",
        )
    ]
    labels = {
        "seed": "seeds (fixed threshold, train split)",
        "pseudo": "pseudo-masks (calibrated, train split)",
        "affinity_labels": "masks the affinities learn from (refined in the image, train split)",
        "refined": "refined pseudo-masks (train split)",
    }
    for step in ("seed", "pseudo", "affinity_labels", "refined"):
        if step in ("affinity_labels", "refined") and report.get(f"{step}_miou") is None:
            continue
        rows.append(
            (
                labels[step],
                _pct(report.get(f"{step}_miou")),
                _pct(report.get(f"{step}_dice")),
                _pct(report.get(f"{step}_pixel_accuracy")),
                _pct(report.get(f"{step}_mean_class_accuracy")),
            )
        )
    rows.append(
        (
            f"segmenter on `{report.get('segmenter_masks')}` masks (val split)",
            _pct(report.get("seg_miou")),
            _pct(report.get("dice")),
            _pct(report.get("seg_pixel_accuracy")),
            _pct(report.get("seg_mean_class_accuracy")),
        )
    )
    if report.get("seg_miou_crf") is not None:
        rows.append(
            ("segmenter + dense CRF (val split)", _pct(report.get("seg_miou_crf")), "", "", "")
        )
    reference = report.get("reference")
    if reference and not reference.get("missing"):
        ratio = (
            (report["seg_miou"] / reference["seg_miou"])
            if report.get("seg_miou") and reference.get("seg_miou")
            else None
        )
        rows.append(
            (
                f"ground-truth reference: `{reference['run']}`",
                _pct(reference.get("seg_miou")),
                _pct(reference.get("dice")),
                "",
                "",
            )
        )
        rows.append(
            ("segmenter / reference", "n/a" if ratio is None else f"{ratio:.2f}", "", "", "")
        )
    lines = [
        "| step | mIoU (%) | Dice (%) | pixel acc. (%) | mean class acc. (%) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return lines


SOURCE_NOTES = {
    "fixed": "fallback: no calibration pair, the fixed threshold (pseudo.threshold)",
    "global": "fallback: no calibration pair, the global median",
    "shrunk": "calibrated, shrunk toward the fixed threshold (pseudo.shrinkage)",
    "calibrated": "",
}


def _source_note(thresholds: dict[str, Any], name: str) -> str:
    """How a class's threshold was chosen, with every fallback spelt out."""
    source = (thresholds.get("sources") or {}).get(name)
    if source is None:  # a record from before sources were kept
        source = "global" if (thresholds.get("pairs") or {}).get(name) == 0 else "calibrated"
    return SOURCE_NOTES.get(source, source)


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the summary table first, then per-class tables, thresholds (fallbacks marked),
    the ignored share, stage times and where to look next (panels, wandb runs)."""
    lines = [
        f"# wsss report: {report['run']}",
        "",
        f"data `{report['data']}`, CAM method `{report['cam_method']}`. Scores count only the classes "
        f"present in each split's ground truth; Dice is the mean over foreground classes.",
        "",
    ]
    if report.get("data") in MEDICAL_SOURCES:
        lines += _foreground_table(report)
    lines += _summary_table(report) + [""]
    lines += decoupled_lines(report)
    scored_on = report.get("scored_on")
    if scored_on:
        lines += [
            f"On the `{scored_on['split']}` split ({scored_on['images']} images, as published tables report "
            f"them): seeds {_pct(scored_on.get('seed_miou'))}, pseudo-masks "
            f"{_pct(scored_on.get('pseudo_miou'))} mIoU.",
            "",
        ]
    names = report.get("class_names") or []
    columns = [(f"{step} IoU", report.get(f"{step}_per_class_iou")) for step in STEPS] + [
        ("segmenter IoU", report.get("per_class_iou")),
        ("segmenter Dice", report.get("per_class_dice")),
    ]
    columns = [(title, table) for title, table in columns if table]
    if names and columns:
        lines += ["## Per-class scores (%)", "", *class_table(names, columns)]
        absent = report.get("absent_classes") or {}
        for where, missing in absent.items():
            if missing:
                lines.append(
                    f"\nLeft out of the {where} means (no ground-truth pixel in the split): "
                    f"{', '.join(missing)}."
                )
        lines.append("")
    thresholds = report.get("thresholds") or {}
    if thresholds:
        lines += [
            "## Thresholds",
            "",
            f"method `{thresholds.get('method')}`, objective "
            f"`{thresholds.get('objective')}`, global {thresholds.get('global')}",
            "",
        ]
        if thresholds.get("layer_weights") is not None:  # pseudo.fusion_weights=calibrated
            weights = ", ".join(f"{w:g}" for w in thresholds["layer_weights"])
            lines += [f"layer fusion weights (calibrated): {weights}", ""]
        per_class = thresholds.get("per_class") or {}
        pairs = thresholds.get("pairs") or {}
        if per_class:
            lines += ["| class | threshold | calibration pairs | |", "|---|---|---|---|"]
            for name, value in per_class.items():
                lines.append(
                    f"| {name} | {value:.3f} | {pairs.get(name, 'n/a')} | "
                    f"{_source_note(thresholds, name)} |"
                )
            if thresholds.get("low_confidence_pairs"):
                lines.append(
                    f"\n{thresholds['low_confidence_pairs']} (image, class) pairs left out: the "
                    f"classifier scored them under pseudo.min_confidence on the whole image."
                )
            lines.append("")
    lines += [
        f"Ignored pixels (255) in the pseudo-masks: {_pct(report.get('ignore_fraction'))} %.",
        "",
    ]
    lines += rounds_markdown(report)
    lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [
        f"| {k} | {v if v is not None else 'n/a'} |" for k, v in report["stage_seconds"].items()
    ]
    lines += ["", "## Where to look", ""]
    if report.get("panels"):
        lines.append(
            f"- [panels.png]({Path(report['panels']).relative_to(Path(report['panels']).parents[1])}): "
            f"per sample and present class, the maps of each layer and fused, the seeds and "
            f"pseudo-mask over the image, the ground truth, and a colour legend."
        )
    for stage, paths in (report.get("wandb_runs") or {}).items():
        if paths:
            lines.append(f"- wandb `{stage}`: {paths} (upload with `wandb sync <folder>`)")
    return "\n".join(lines) + "\n"


def write_report(cfg: Config) -> dict[str, Any]:
    """report.json and report.md on global rank zero, and the report's wandb run."""
    report = build_report(cfg)
    if not is_global_zero():
        return report
    write_json_atomic(cfg.run_dir / "report.json", report)
    write_text_atomic(cfg.run_dir / "report.md", report_markdown(report))
    _track_report(cfg, report)
    return report


def _track_report(cfg: Config, report: dict[str, Any]) -> None:
    """The report numbers as a wandb run summary (job type ``report``) and the files as an
    artifact; CSV: one row of the same numbers in logs/report."""
    logger = make_logger(cfg, "report")
    if not logger:
        return
    try:
        log_summary(
            logger, {k: v for k, v in report.items() if k not in ("thresholds", "wandb_runs")}
        )
        files = [cfg.run_dir / "report.json", cfg.run_dir / "report.md"]
        if report.get("panels"):
            files.append(Path(report["panels"]))
        log_artifact(logger, f"{cfg.run.name}-report", "report", files=files)
    finally:
        close_logger(logger)
