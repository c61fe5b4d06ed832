"""Config keys reach the code that uses them: for each key, changing it changes what the stage
writes in the way the key says. A stage that ignored the key (kept a default, hard-wired a
method) fails here."""

import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from wsss import stages
from wsss.cam import aggregate_scales, build_cam, fuse_layers
from wsss.cam.libra import model_fingerprint
from wsss.cam.methods import METHODS
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import read_mask
from wsss.io import read_json
from wsss.models.pseudo_labeler import present_targets
from wsss.models.pseudo_writer import SEED_DIR
from wsss.pseudo.refine import distribution_labels, ignore_uncertain, slot_distribution
from wsss.stages import pseudo_masks as pseudo_stage
from wsss.stages.pseudo_masks import pseudo_module
from wsss.stages.records import StageError

from conftest import ROOT, reuse_stage, tiny_args, tiny_config

# eight calibration images and no panel grid: the pseudo-mask settings of these tests
PSEUDO = ("pseudo.calibration_images=8", "pseudo.num_panels=0")


def config(root, *extra):
    return tiny_config(root, *PSEUDO, *extra, size="stage")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_classifier):
    """A run root of this module's own, starting from the shared classifier."""
    root = tmp_path_factory.mktemp("wiring")
    reuse_stage(trained_classifier, root)
    return root


def batch_of(cfg, classifier, count=4):
    dataset = build_source(cfg, "train", mean=classifier.hparams.mean, std=classifier.hparams.std)
    return next(iter(make_loader(dataset, cfg, count)))


def expected_fused(
    model, images, labels, method, layers, options, normalize, scales, flip, weights
):
    """The fused maps computed by hand from the public CAM functions."""
    targets, valid = present_targets(labels)
    extra = {"present": labels > 0.5} if METHODS[method].takes_present else {}
    with build_cam(method, model, layers, **options) as cam:
        maps = aggregate_scales(
            cam, images, scales, flip, targets=targets, normalize=normalize, **extra
        )
    return fuse_layers(maps, images.shape[-2:], weights) * valid[:, :, None, None]


@pytest.mark.parametrize(
    "overrides, method, options, normalize, scales, flip, weights",
    [
        ([], "relevance", {"preset": "default"}, "centred", [1.0], False, None),
        (["cam.method=gradcam"], "gradcam", {}, "centred", [1.0], False, None),
        (["cam.preset=lrp"], "relevance", {"preset": "lrp"}, "centred", [1.0], False, None),
        (
            ["cam.normalize=relu_max"],
            "relevance",
            {"preset": "default"},
            "relu_max",
            [1.0],
            False,
            None,
        ),
        (
            ["cam.scales=[0.5, 1.0]", "cam.flip=true"],
            "relevance",
            {"preset": "default"},
            "centred",
            [0.5, 1.0],
            True,
            None,
        ),
        (
            ["cam.layer_weights=[0.0, 0.0, 1.0]"],
            "relevance",
            {"preset": "default"},
            "centred",
            [1.0],
            False,
            [0.0, 0.0, 1.0],
        ),
    ],
)
def test_cam_keys_reach_the_pseudo_module(
    trained, overrides, method, options, normalize, scales, flip, weights
):
    cfg = config(trained, *overrides)
    classifier = stages.load_classifier(cfg)
    module = pseudo_module(cfg, classifier)
    batch = batch_of(cfg, classifier)
    fused = module.fused_maps(batch["image"], batch["labels"])["fused"]
    expected = expected_fused(
        classifier.export(),
        batch["image"],
        batch["labels"],
        method,
        cfg.cam.layers,
        options,
        normalize,
        scales,
        flip,
        weights,
    )
    assert torch.allclose(fused, expected, atol=1e-5)
    default = pseudo_module(config(trained), classifier).fused_maps(
        batch["image"], batch["labels"]
    )["fused"]
    if overrides:  # and the key made a difference
        assert not torch.allclose(fused, default, atol=1e-3), overrides


def test_centred_maps_cover_less_than_relu_max_at_one_threshold(trained):
    """centred subtracts each map's mean before ReLU / max: the same threshold keeps less."""
    cfg = config(trained)
    classifier = stages.load_classifier(cfg)
    batch = batch_of(cfg, classifier)
    area = {}
    for mode in ("centred", "relu_max"):
        fused = pseudo_module(config(trained, f"cam.normalize={mode}"), classifier).fused_maps(
            batch["image"], batch["labels"]
        )["fused"]
        area[mode] = float((fused >= 0.25).float().mean())
    assert area["centred"] < area["relu_max"]


def _recomputed(
    out_dir: Path, sample_id: str, thresholds: dict, names: list[str], band: float
) -> np.ndarray:
    saved = np.load(out_dir / "maps" / f"{sample_id}.npz")
    maps = torch.from_numpy(saved["maps"].astype(np.float32))[None]
    classes = torch.from_numpy(saved["classes"].astype(np.int64))[None]
    per_slot = torch.tensor([[thresholds["per_class"][names[c - 1]] for c in classes[0].tolist()]])
    valid = torch.ones_like(classes, dtype=torch.bool)
    probs = slot_distribution(maps, valid, per_slot)
    return ignore_uncertain(distribution_labels(probs, classes, valid), probs, margin=band)[
        0
    ].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["libra", "fixed"])
def test_written_masks_use_the_calibrated_thresholds_and_the_ignore_band(
    trained, tmp_path, calibration
):
    """Seed threshold 0.15 lies outside the calibration grid, so calibrated thresholds differ
    from it; every written mask must equal the labels recomputed from the saved maps with
    thresholds.json and the ignore band (float16 maps: a few boundary pixels may flip)."""
    reuse_stage(trained, tmp_path)
    band = 0.05
    cfg = config(
        tmp_path,
        f"pseudo.calibration={calibration}",
        "pseudo.threshold=0.15",
        "pseudo.grid=[0.3, 0.5, 0.7]",
        "pseudo.min_confidence=0.0",
        "pseudo.objective=keep_delete",
        "pseudo.fallback=global",
        f"pseudo.ignore_band={band}",
        "pseudo.save_maps=true",
    )
    record = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    thresholds = read_json(out / "thresholds.json")
    names = record["class_names"][1:]
    values = set(thresholds["per_class"].values())
    assert values <= {0.3, 0.5, 0.7} if calibration == "libra" else values == {0.15}
    agree = total = ignored = 0
    seeds_differ = False
    for sample_id in build_source(cfg, "train").ids:
        written = read_mask(out / f"{sample_id}.png")
        expected = _recomputed(out, sample_id, thresholds, names, band)
        agree += int((written == expected).sum())
        total += written.size
        ignored += int((written == 255).sum())
        seed = read_mask(out / SEED_DIR / f"{sample_id}.png")
        seeds_differ |= bool((seed != written).any())
        assert 255 not in seed  # seeds: fixed threshold, no ignore band
    assert agree / total > 0.995 and ignored > 0 and seeds_differ


# a segmenter trained on the ground truth long enough to predict shapes, for evaluation's keys
GT_SEGMENTER = (
    "segmenter.masks=ground_truth",
    "segmenter.max_epochs=10",
    "segmenter.optimizer=sgd",
    "segmenter.lr=0.1",
)


@pytest.fixture(scope="module")
def gt_segmenter(tmp_path_factory):
    """A run root holding that segmenter (read only: copy it with ``reuse_stage``)."""
    root = tmp_path_factory.mktemp("gt_segmenter")
    stages.train_segmenter(config(root, *GT_SEGMENTER))
    return root


@pytest.mark.slow
def test_evaluation_uses_the_configured_test_time_augmentation(gt_segmenter, tmp_path):
    """segmenter.eval_scales / eval_flip are evaluation's (they do not retrain the segmenter):
    predictions equal the trained segmenter's multi-scale + flip prediction."""
    reuse_stage(gt_segmenter, tmp_path, "segmenter")
    cfg = config(tmp_path, *GT_SEGMENTER)
    stages.evaluate(cfg)
    plain = {
        p.name: read_mask(p) for p in (tmp_path / "default" / "evaluation" / "val").glob("*.png")
    }
    augmented_cfg = config(
        tmp_path, *GT_SEGMENTER, "segmenter.eval_scales=[0.5, 1.5]", "segmenter.eval_flip=true"
    )
    skipped = stages.train_segmenter(augmented_cfg)
    assert skipped["skipped"]  # the trained segmenter stays valid
    shutil.rmtree(tmp_path / "default" / "evaluation")
    stages.evaluate(augmented_cfg)
    module = stages.load_segmenter(augmented_cfg).eval()
    module.hparams.eval_scales, module.hparams.eval_flip = [0.5, 1.5], True
    dataset = build_source(augmented_cfg, "val", mean=module.hparams.mean, std=module.hparams.std)
    changed = False
    for index in range(len(dataset)):
        item = dataset[index]
        expected = module.predict_probs(item["image"][None]).argmax(1)[0].numpy()
        written = read_mask(tmp_path / "default" / "evaluation" / "val" / f"{item['id']}.png")
        assert np.array_equal(written, expected)
        changed |= not np.array_equal(written, plain[f"{item['id']}.png"])
    assert changed


def test_segmenter_recipe_keys_reach_the_trained_segmenter(tmp_path):
    """segmenter.optimizer / schedule / loss / lr / momentum / weight_decay: the stage's checkpoint
    holds the optimizer they name (AdamW moments, the constant learning rate) and the loss."""
    cfg = config(
        tmp_path,
        "segmenter.masks=ground_truth",
        "segmenter.optimizer=adamw",
        "segmenter.lr=0.002",
        "segmenter.schedule=constant",
        "segmenter.loss=ce_dice",
        "segmenter.weight_decay=0.03",
    )
    stages.train_segmenter(cfg)
    checkpoint = torch.load(
        tmp_path / "default" / "segmenter" / "last.ckpt", map_location="cpu", weights_only=False
    )
    state = checkpoint["optimizer_states"][0]
    assert "exp_avg_sq" in next(iter(state["state"].values()))  # AdamW, not SGD
    assert (state["param_groups"][0]["lr"], state["param_groups"][0]["weight_decay"]) == (
        0.002,
        0.03,
    )
    assert stages.load_segmenter(cfg).loss_fn.dice is not None

    sgd = config(
        tmp_path / "sgd",
        "segmenter.masks=ground_truth",
        "segmenter.optimizer=sgd",
        "segmenter.momentum=0.7",
        "segmenter.lr=0.02",
        "segmenter.schedule=poly",
        "segmenter.loss=ce",
    )
    stages.train_segmenter(sgd)
    checkpoint = torch.load(
        tmp_path / "sgd" / "default" / "segmenter" / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.7 and group["lr"] < 0.02  # poly: decayed by the end of the fit
    assert stages.load_segmenter(sgd).loss_fn.dice is None


@pytest.mark.slow
def test_segmenter_trains_on_a_mask_directory_and_standalone_evaluate_runs(trained, tmp_path):
    """segmenter.masks=DIR: a directory of palette PNGs (here: the ground truth, written out)."""
    reuse_stage(trained, tmp_path)
    masks = tmp_path / "my_masks"
    cfg = config(tmp_path, f"segmenter.masks={masks}")
    from wsss.data.masks import write_label_png

    source = build_source(cfg, "train")
    for index in range(len(source)):
        raw = source.load_raw(index)
        write_label_png(masks / f"{raw.id}.png", raw.mask)
    record = stages.train_segmenter(cfg)
    assert record["masks"] == str(masks) and record["epochs"] == 1
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsss.cli",
            "evaluate",
            *tiny_args(tmp_path, *PSEUDO, f"segmenter.masks={masks}", size="stage"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = read_json(tmp_path / "default" / "evaluation" / "stage.json")
    assert evaluation["status"] == "done" and 0 <= evaluation["miou"] <= 1
    assert len(list((tmp_path / "default" / "evaluation" / "val").glob("*.png"))) == 4
    assert read_json(tmp_path / "default" / "report.json")["seg_miou"] == evaluation["miou"]


def test_installed_console_script_runs():
    script = Path(sys.executable).parent / "wsss"
    if not script.is_file():
        pytest.skip("the wsss console script is installed by pip install -e '.[dev]'")
    done = subprocess.run(
        [str(script), "show-config", "configs/default.yaml", "run.name=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "name: x" in done.stdout
    bad = subprocess.run(
        [str(script), "run", "configs/default.yaml", "cam.normalize=nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "cam.normalize" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_class_the_classifier_does_not_recognise_is_no_worse_than_with_the_fixed_threshold(
    trained, tmp_path
):
    """The head's bias for 'square' is pushed to -30: no image passes the confidence gate for it,
    so calibration knows nothing about it. With the shrink fallback it keeps the fixed threshold:
    its pseudo-mask IoU equals its seed IoU (no ignore band), and the report says so."""
    reuse_stage(trained, tmp_path)
    checkpoint = tmp_path / "default" / "classifier" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    names = state["hyper_parameters"]["class_names"]
    square = names.index("square")
    state["state_dict"]["model.fc.bias"][square] = -30.0
    torch.save(state, checkpoint)
    cfg = config(
        tmp_path,
        "pseudo.min_confidence=0.0001",
        "pseudo.ignore_band=0.0",
        "pseudo.objective=keep_delete",
        "pseudo.grid=[0.3, 0.5, 0.7]",
        "pseudo.threshold=0.15",
    )
    record = stages.make_pseudo_masks(cfg)
    thresholds = record["thresholds"]
    assert thresholds["pairs"]["square"] == 0 and thresholds["sources"]["square"] == "fixed"
    assert thresholds["per_class"]["square"] == 0.15
    assert any(thresholds["pairs"][n] > 0 for n in names if n != "square")
    seed_iou, pseudo_iou = (
        record["seed_per_class_iou"][square + 1],
        record["pseudo_per_class_iou"][square + 1],
    )
    assert pseudo_iou >= seed_iou - 1e-9


def _labels_from_saved(out_dir: Path, sample_id: str, thresholds: dict, names: list[str]):
    """The calibrated distribution of one image, rebuilt from its saved maps."""
    saved = np.load(out_dir / "maps" / f"{sample_id}.npz")
    maps = torch.from_numpy(saved["maps"].astype(np.float32))[None]
    classes = torch.from_numpy(saved["classes"].astype(np.int64))[None]
    per_slot = torch.tensor([[thresholds["per_class"][names[c - 1]] for c in classes[0].tolist()]])
    valid = torch.ones_like(classes, dtype=torch.bool)
    return slot_distribution(maps, valid, per_slot), classes, valid


@pytest.mark.slow
@pytest.mark.parametrize("method", ["par", "crf"])
def test_in_image_refinement_is_what_the_written_masks_went_through(trained, tmp_path, method):
    """pseudo.refine=par / crf: the calibrated masks land in calibrated/, the refined ones are
    the masks the segmenter trains on: PAR (or the CRF) of the calibrated distribution, labelled
    and banded. A stage that skipped refinement would write the calibrated masks twice."""
    if method == "crf":
        pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2)")
    from wsss.pseudo.refine import par, pixel_mask, refine_scores

    reuse_stage(trained, tmp_path)
    band = 0.05
    cfg = config(
        tmp_path,
        f"pseudo.refine={method}",
        "pseudo.save_maps=true",
        f"pseudo.ignore_band={band}",
        "pseudo.par_iterations=6",
    )
    classifier = stages.load_classifier(cfg)
    record = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    assert record["refined_miou"] is not None and record["pseudo_miou"] is not None
    names, thresholds = record["class_names"][1:], read_json(out / "thresholds.json")
    dataset = build_source(cfg, "train", mean=classifier.hparams.mean, std=classifier.hparams.std)
    agree = total = changed = 0
    for index in range(len(dataset)):
        item = dataset[index]
        probs, classes, valid = _labels_from_saved(out, item["id"], thresholds, names)
        image = item["image"][None]
        if method == "par":
            refined = par(probs, image, iterations=6)
        else:
            inside = pixel_mask(None, *probs.shape[-2:])
            refined = refine_scores(
                "crf",
                probs,
                image,
                valid=inside,
                mean=classifier.hparams.mean,
                std=classifier.hparams.std,
            )
        expected = ignore_uncertain(
            distribution_labels(refined, classes, valid), refined, margin=band
        )[0].numpy()
        written = read_mask(out / f"{item['id']}.png")
        calibrated = read_mask(out / "calibrated" / f"{item['id']}.png")
        agree += int((written == expected).sum())
        total += written.size
        changed += int((written != calibrated).sum())
    assert agree / total > 0.99 and changed > 0.01 * total


@pytest.mark.slow
def test_affinity_stage_refines_resumes_and_feeds_the_segmenter(
    trained, tmp_path, training_callbacks
):
    """pseudo.refine=affinity: the affinity stage trains on the calibrated masks, writes refined
    masks for every image, resumes from last.ckpt after a kill mid-training and does not redo
    masks already written; the segmenter trains on the refined masks."""

    class KillInEpoch(L.Callback):
        def __init__(self):
            self.armed = True

        def on_train_epoch_start(self, trainer, module):
            if (
                self.armed
                and trainer.current_epoch == 1
                and type(module).__name__ == "AffinityModule"
            ):
                raise RuntimeError("killed")

    reuse_stage(trained, tmp_path)
    kill = KillInEpoch()
    training_callbacks.append(kill)
    cfg = config(tmp_path, "pseudo.refine=affinity", "affinity.max_epochs=2", "affinity.steps=4")
    stages.make_pseudo_masks(cfg)
    with pytest.raises(RuntimeError, match="killed"):
        stages.train_affinity(cfg)
    directory = tmp_path / "default" / "affinity"
    assert torch.load(directory / "last.ckpt", weights_only=False)["epoch"] == 0
    kill.armed = False
    record = stages.train_affinity(cfg)
    assert record["epochs"] == 2 and record["refined_written_now"] == 12
    ids = build_source(cfg, "train").ids
    assert sorted(p.stem for p in (directory / "masks").glob("*.png")) == sorted(ids)
    # each refined mask has its confidence beside it, at the mask's size
    for i in ids:
        levels = read_mask(directory / "masks" / "confidence" / f"{i}.png")
        assert levels.shape == read_mask(directory / "masks" / f"{i}.png").shape
    pseudo_dir = tmp_path / "default" / "pseudo_masks"
    differs = sum(
        int(
            (
                read_mask(directory / "masks" / f"{i}.png") != read_mask(pseudo_dir / f"{i}.png")
            ).sum()
        )
        for i in ids
    )
    assert differs > 0 and record["refined_miou"] is not None
    (directory / "masks" / f"{ids[0]}.png").unlink()  # as if killed while writing masks
    state = read_json(directory / "stage.json")
    state["status"] = "running"
    (directory / "stage.json").write_text(__import__("json").dumps(state))
    again = stages.train_affinity(cfg)
    assert again["refined_written_now"] == 1
    segmenter = stages.train_segmenter(cfg)
    assert segmenter["masks"] == str(directory / "masks")


LIBRA = [
    "cam.method=libra",
    "cam.libra_references=3",
    "cam.libra_bound=1.0",
    "pseudo.calibration=fixed",
]


def test_libra_method_builds_its_library_once_per_classifier_and_uses_it(
    trained, tmp_path, monkeypatch
):
    """cam.method=libra: the stage stores a library built from the training split with the
    cam.libra_* settings and the classifier's fingerprint; the written masks come from maps made
    with it; a second call reuses it; a changed classifier or setting rebuilds it."""
    from wsss.cam import LibrarySettings, ReferenceLibrary, build_library
    from wsss.cam.libra import library as libra_module  # where library_for finds build_library

    reuse_stage(trained, tmp_path)
    cfg = config(tmp_path, *LIBRA)
    record = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    path = out / pseudo_stage.LIBRARY_FILE
    state = torch.load(path, weights_only=True)
    classifier = stages.load_classifier(cfg)
    assert state["classifier_hash"] == model_fingerprint(classifier.export())
    assert state["settings"]["references"] == 3 and state["settings"]["bound"] == 1.0
    assert state["settings"]["bound_mode"] == "relative"
    assert list(state["settings"]["layers"]) == list(cfg.cam.layers)
    dataset = build_source(cfg, "train", mean=classifier.hparams.mean, std=classifier.hparams.std)
    by_hand = build_library(
        classifier.export().eval(),
        make_loader(dataset, cfg, 4),
        LibrarySettings(tuple(cfg.cam.layers), references=3, bound=1.0),
    )
    stored = ReferenceLibrary.from_state_dict(state)
    for layer in cfg.cam.layers:
        assert torch.allclose(stored.activations[layer], by_hand.activations[layer])
    assert record["count"] == len(dataset)

    batch = batch_of(cfg, classifier)
    fused = pseudo_module(cfg, classifier, library=stored).fused_maps(
        batch["image"], batch["labels"]
    )["fused"]
    expected = expected_fused(
        classifier.export(),
        batch["image"],
        batch["labels"],
        "libra",
        cfg.cam.layers,
        {"library": by_hand},
        "centred",
        [1.0],
        False,
        None,
    )
    assert torch.allclose(fused, expected, atol=1e-5)
    relevance = pseudo_module(config(tmp_path), classifier).fused_maps(
        batch["image"], batch["labels"]
    )["fused"]
    assert not torch.allclose(fused, relevance, atol=1e-3)

    def no_build(*args, **kwargs):
        raise AssertionError("the library was rebuilt although settings and classifier match")

    monkeypatch.setattr(libra_module, "build_library", no_build)
    pseudo_stage.reference_library(cfg, classifier, out)  # reused
    monkeypatch.undo()
    state["classifier_hash"] = "another-classifier"
    torch.save(state, path)
    pseudo_stage.reference_library(cfg, classifier, out)
    assert torch.load(path, weights_only=True)["classifier_hash"] == model_fingerprint(
        classifier.export()
    )
    pseudo_stage.reference_library(
        config(tmp_path, *LIBRA, "cam.libra_references=2"), classifier, out
    )
    assert torch.load(path, weights_only=True)["scores"].shape[1] == 2


def test_libra_absolute_bound_without_references_names_the_classes_and_the_key(trained, tmp_path):
    """cam.libra_bound_mode=absolute: a bound no score passes stops the stage, as it always did;
    the relative bound (the default) gets references from the same classifier."""
    reuse_stage(trained, tmp_path)
    cfg = config(tmp_path, *LIBRA, "cam.libra_bound=1e-9", "cam.libra_bound_mode=absolute")
    classifier = stages.load_classifier(cfg)
    with pytest.raises(StageError, match=r"cam.libra_bound=1e-09 for \['disc'"):
        pseudo_stage.reference_library(cfg, classifier, tmp_path)
    relative = config(tmp_path, *LIBRA, "cam.libra_bound=1e-9")
    assert bool((pseudo_stage.reference_library(relative, classifier, tmp_path).counts > 0).all())


def test_libra_negative_quantile_sets_how_many_negatives_each_class_draws_from(trained, tmp_path):
    """cam.libra_negative_quantile=q: class c keeps min(R, ceil(q * N_c)) references, N_c its
    negative training images, the lowest-scoring first."""
    reuse_stage(trained, tmp_path)
    classifier = stages.load_classifier(config(tmp_path))
    for q in (0.1, 1.0):
        cfg = config(
            tmp_path, *LIBRA, "cam.libra_references=30", f"cam.libra_negative_quantile={q}"
        )
        library = pseudo_stage.reference_library(cfg, classifier, tmp_path)
        dataset = build_source(cfg, "train")
        labels = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(len(dataset))])
        negatives = (labels < 0.5).sum(0)
        want = torch.clamp(torch.ceil(q * negatives.double()).long(), min=1, max=30)
        assert library.counts.tolist() == want.tolist()


def test_libra_relative_bound_stops_only_for_a_class_without_negatives(
    trained, tmp_path, monkeypatch
):
    """Under the relative bound a class is empty only when every training image holds it; the
    stage says so, naming the class."""
    reuse_stage(trained, tmp_path)
    cfg = config(tmp_path, *LIBRA)
    classifier = stages.load_classifier(cfg)
    from wsss.stages import calibration

    real = calibration.library_for

    def every_image_has_square(model, batches, settings, *args, **kwargs):
        def labelled():
            for batch in batches():
                batch["labels"][:, 1] = 1.0
                yield batch

        return real(model, labelled, settings, *args, **kwargs)

    monkeypatch.setattr(calibration, "library_for", every_image_has_square)
    with pytest.raises(StageError, match=r"no training image is labelled without \['square'\]"):
        pseudo_stage.reference_library(cfg, classifier, tmp_path)


@pytest.mark.slow
def test_eval_crf_also_scores_the_predictions_after_a_dense_crf(gt_segmenter, tmp_path):
    """segmenter.eval_crf=true: evaluation writes the CRF-refined predictions beside the plain ones
    and reports their scores (crf_miou; seg_miou_crf in the report)."""
    pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2)")
    reuse_stage(gt_segmenter, tmp_path, "segmenter")
    cfg = config(tmp_path, *GT_SEGMENTER, "segmenter.eval_crf=true")
    record = stages.evaluate(cfg)
    directory = tmp_path / "default" / "evaluation"
    ids = build_source(cfg, "val").ids
    plain, refined = directory / "val", directory / "val_crf"
    assert sorted(p.stem for p in refined.glob("*.png")) == sorted(ids)
    changed = sum(
        int((read_mask(refined / f"{i}.png") != read_mask(plain / f"{i}.png")).sum()) for i in ids
    )
    assert changed > 0  # the CRF really ran on the predictions
    assert 0.0 <= record["crf_miou"] <= 1.0
    assert stages.build_report(cfg)["seg_miou_crf"] == record["crf_miou"]
