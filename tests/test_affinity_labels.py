"""pseudo.affinity_labels: the affinity stage learns from the masks refined in the image (par or
crf) instead of the calibrated ones, while its walk still starts from the calibrated maps."""

import pytest

from wsss import stages
from wsss.data.imageio import DataError
from wsss.stages.report import write_report

from conftest import digest, reuse_stage, tiny_config

PSEUDO = ("pseudo.calibration_images=4", "pseudo.num_panels=0")


def test_affinity_learns_from_the_par_refined_masks(tmp_path, trained_classifier):
    par_root, affinity_root = tmp_path / "par", tmp_path / "affinity"
    for root in (par_root, affinity_root):
        reuse_stage(trained_classifier, root)
    stages.make_pseudo_masks(tiny_config(par_root, *PSEUDO, "pseudo.refine=par", size="stage"))
    cfg = tiny_config(
        affinity_root,
        *PSEUDO,
        "pseudo.refine=affinity",
        "pseudo.affinity_labels=par",
        "affinity.max_epochs=1",
        "affinity.steps=2",
        size="stage",
    )
    record = stages.make_pseudo_masks(cfg)
    out = affinity_root / "default" / "pseudo_masks"
    # the labels it learns from are exactly what refine=par writes as its pseudo-masks
    refined = digest(par_root / "default" / "pseudo_masks", "syn_*.png")
    top_level = {k: v for k, v in refined.items() if "/" not in k}
    assert digest(out / "affinity_labels") == top_level and len(top_level) == 12
    # ... while the stage's own masks stay the calibrated ones, and both are scored
    assert digest(out, "syn_*.png") != digest(out / "affinity_labels")
    assert record["affinity_labels_miou"] is not None and record["pseudo_miou"] is not None
    # the report shows them as a step of their own
    report = write_report(cfg)
    assert report["affinity_labels_miou"] == record["affinity_labels_miou"]
    markdown = (affinity_root / "default" / "report.md").read_text()
    assert "masks the affinities learn from" in markdown
    # the affinity stage reads them: without them it stops, naming the missing file
    missing = out / "affinity_labels" / "syn_train_00000.png"
    missing.unlink()
    with pytest.raises(DataError, match="affinity_labels/syn_train_00000.png"):
        stages.train_affinity(cfg)


def test_calibrated_is_the_default_and_writes_no_extra_folder(tmp_path, trained_classifier):
    reuse_stage(trained_classifier, tmp_path)
    cfg = tiny_config(tmp_path, *PSEUDO, "pseudo.refine=affinity", size="stage")
    assert cfg.pseudo.affinity_labels == "calibrated"
    record = stages.make_pseudo_masks(cfg)
    assert not (tmp_path / "default" / "pseudo_masks" / "affinity_labels").exists()
    assert "affinity_labels_miou" not in record
    assert write_report(cfg)["affinity_labels_miou"] is None
