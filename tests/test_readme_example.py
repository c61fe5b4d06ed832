"""The README's first Python example, run verbatim: random weights instead of the download."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torchvision
from PIL import Image

from conftest import ROOT


def readme_example() -> str:
    """The first ```python block of the README's Python section."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_writes_an_overlay_png(tmp_path, monkeypatch):
    code = readme_example()
    assert "heatmaps(" in code and "overlay(" in code and "resnet50" in code
    assert (
        len(
            [line for line in code.splitlines() if line and not line.startswith(("import", "from"))]
        )
        == 5
    )
    real = torchvision.models.resnet50
    monkeypatch.setattr(torchvision.models, "resnet50", lambda weights=None: real(weights=None))
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    written = np.asarray(Image.open(tmp_path / "cat_cam.png"))
    assert written.shape == (224, 224, 3) and written.dtype == np.uint8
    maps = namespace["maps"]
    assert maps.shape == (1, 1, 224, 224)
    assert float(maps.min()) >= 0.0 and float(maps.max()) == pytest.approx(1.0)
    plain = np.asarray(namespace["overlay"](namespace["x"][0], np.zeros((224, 224), np.float32)))
    assert not np.array_equal(written, plain)  # the map shows in the picture
