"""scripts/make_synthetic_voc.py options (the scene drawn by wsss.data.synthetic_voc): the
default set is unchanged by them, negatives hold no class, the part class has a high-contrast
head over a plain body and a mask over both."""

import hashlib

import numpy as np
from PIL import Image

from wsss.data import synthetic_voc as scene

from conftest import load_script

make_voc = load_script("make_synthetic_voc")
PERSON = 15
# sha256 of the rendered arrays (train 0-5, val 0-1, seed 0, 64 px) and of the written files
# (6 train, 2 val, seed 0, 64 px), computed on the generator before these options existed
ARRAYS_BEFORE = "91264e53b156f2d6f0c8cdb8355f7a799eed95ea36ca336d7295f6b8fef9b514"
FILES_BEFORE = "6e00adca7cb070b329e8ef185077676d044d4e671b41f40805712b65e682a1b2"


def block_means(image, block=8):
    h, w, c = image.shape
    return image.astype(np.float32).reshape(h // block, block, w // block, block, c).mean((1, 3))


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_set_is_the_same_bytes_as_before():
    digest = hashlib.sha256()
    for split, count in (("train", 6), ("val", 2)):
        for index in range(count):
            image, mask = scene.labelled_sample(0, split, index, 64, 2)
            digest.update(image.tobytes())
            digest.update(mask.tobytes())
    assert digest.hexdigest() == ARRAYS_BEFORE


def test_negatives_leave_the_labelled_set_alone_and_hold_no_class(tmp_path):
    quiet = dict(num_train=6, num_val=2, seed=0, size=64, echo=lambda _: None)
    make_voc.make_synthetic_voc(tmp_path / "plain", **quiet)
    make_voc.make_synthetic_voc(tmp_path / "neg", negatives=5, **quiet)
    assert tree_digest(tmp_path / "plain") == FILES_BEFORE
    assert tree_digest(tmp_path / "neg" / "VOCdevkit") == tree_digest(
        tmp_path / "plain" / "VOCdevkit"
    )
    written = sorted((tmp_path / "neg" / "negatives").glob("*.jpg"))
    assert [p.name for p in written] == [f"neg_{i:05d}.jpg" for i in range(5)]
    assert not (tmp_path / "plain" / "negatives").exists()
    waters = 0
    for index, path in enumerate(written):
        image = np.asarray(Image.open(path))
        assert image.shape == (64, 64, 3)
        clean = scene.render_negative(0, index, 64)
        assert np.abs(block_means(image) - block_means(clean)).mean() < 3  # its JPEG
    for index in range(40):  # no object drawn: the head's hue family and class shapes are absent
        image = scene.render_negative(0, index, 96).astype(np.float32)
        waters += bool((image[-5:, :, 2] > image[-5:, :, 0] + 50).mean() > 0.8)
    assert 5 < waters < 35  # water (the boats' context) without boats in about half of them


def test_negatives_draw_no_object(monkeypatch):
    """Every way the generator draws a class (shapes, boat rig, person, class colours) is made to
    fail: rendering a negative still works, so no class pixel can be in it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a class was drawn into a negative")

    for name in ("shape_mask", "boat_rig", "paint_person", "tinted_colours", "person_parts"):
        monkeypatch.setattr(scene, name, forbidden)
    monkeypatch.setattr(scene, "SHAPES", {k: forbidden for k in scene.SHAPES})
    for index in range(10):
        assert scene.render_negative(0, index, 64).shape == (64, 64, 3)
    try:  # the same trap catches a labelled image, so it would catch a negative with an object
        scene.labelled_sample(0, "train", 0, 64, 2)
    except AssertionError as exc:
        assert "class was drawn" in str(exc)
    else:
        raise AssertionError("the trap did not fire on a labelled image")


def test_part_class_head_is_high_contrast_and_the_mask_covers_head_and_body():
    size = 160
    yy, xx = scene.pixel_grid(size, size)
    rng = np.random.default_rng(3)
    blank = np.full((size, size, 3), 128.0, np.float32)
    image, head, body = scene.paint_person(rng, blank, yy, xx, (80.0, 80.0), 50.0)
    assert head.sum() > 50 and body.sum() > 5 * head.sum()  # a small head, a large body
    assert not (head & body).any()
    head_spread = image[head].std(0).mean()
    body_spread = image[body].std(0).mean()
    assert head_spread > 40 and body_spread < 1  # checked head, flat body

    classes = tuple(scene.CLASSES) + (scene.PART_CLASS,)
    found = 0
    for index in range(30):
        image, mask = scene.labelled_sample(0, "train", index, 96, 2, classes)
        person = mask == PERSON
        if person.sum() < 200:
            continue
        found += 1
        rows = np.flatnonzero(person.any(1))
        top, bottom = rows[:3], rows[-3:]  # head rows and body rows of the person's mask
        img = image.astype(np.float32)
        head_rows = img[top][person[top]]
        body_rows = img[bottom][person[bottom]]
        assert len(rows) > 20  # the mask spans head and body, not the head alone
        assert head_rows.std(0).mean() > body_rows.std(0).mean()
    assert found >= 2
    assert make_voc.main(["--out", "/nonexistent/x", "--negatives", "-1"]) == 1


def test_command_line_writes_negatives_and_the_part_class(tmp_path):
    args = ["--out", str(tmp_path), "--num-train", "12", "--num-val", "1", "--size", "48"]
    assert make_voc.main([*args, "--negatives", "2", "--part-class"]) == 0
    assert len(list((tmp_path / "negatives").glob("neg_*.jpg"))) == 2
    root = tmp_path / "VOCdevkit" / "VOC2012"
    values = set()
    for path in (root / "SegmentationClass").glob("train_*.png"):
        values |= set(np.unique(np.asarray(Image.open(path))).tolist())
    assert PERSON in values  # the option reaches the drawn classes
    assert values <= {0, 255, PERSON} | {scene.voc_index(n) for n in scene.CLASSES}
