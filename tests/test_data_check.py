"""`wsss data-check` names every bad file and exits 1; a clean data set passes."""

import shutil

import numpy as np
from PIL import Image

from wsss.cli import main


def voc_args(root):
    return ["data-check", "configs/voc.yaml", f"data.root={root}", "data.train_split=train_aug",
            "data.val_split=val"]


def test_clean_voc_mini_passes_with_counts(voc_root, capsys):
    assert main(voc_args(voc_root)) == 0
    out = capsys.readouterr().out
    assert "split train_aug: 4 images" in out and "split val: 14 images" in out
    assert "person 3" in out and "513x513 to 513x513" in out and "no problems found" in out


def test_damaged_copy_names_every_bad_file(voc_root, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    jpeg = root / "JPEGImages" / "2007_000033.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # truncated
    (root / "SegmentationClass" / "2007_000332.png").unlink()  # missing mask
    wrong = root / "SegmentationClass" / "2007_000676.png"
    small = Image.open(wrong)
    small.resize((100, 100), Image.NEAREST).save(wrong)  # size differs from the image
    bad_value = root / "SegmentationClass" / "2010_001448.png"
    img = Image.open(bad_value)
    array = np.array(img)
    array[0, 0] = 50  # outside 0..20 and not 255
    out = Image.fromarray(array, mode="P")
    out.putpalette(img.getpalette())
    out.save(bad_value)
    assert main(voc_args(root)) == 1
    text = capsys.readouterr().out
    assert "4 problem(s)" in text
    assert "2007_000033.jpg: cannot read image" in text
    assert "2007_000332.png: mask file is missing" in text
    assert "2007_000676.png: mask size 100x100 differs from its image 513x513" in text
    assert "2010_001448.png: mask holds value(s) [50]" in text


def test_problem_list_is_capped_with_the_total(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    rows = ["image,labels"] + [f"missing_{i}.png,a" for i in range(25)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    shutil.copy(tmp_path / "train.csv", tmp_path / "val.csv")
    code = main(["data-check", "configs/medical.yaml", f"data.root={tmp_path}", "data.mean=[0.0]",
                 "data.std=[1.0]"])
    text = capsys.readouterr().out
    assert code == 1 and "25 problem(s)" in text and "... and 5 more" in text
    assert "missing_0.png: image file is missing" in text
