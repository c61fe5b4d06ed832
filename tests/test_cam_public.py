"""wsss.cam's public face: short, and every name the docs document importable where they say."""

from __future__ import annotations

import importlib
import re

import pytest

import wsss.cam

from conftest import ROOT

DOCUMENTS = ("README.md", "docs/DESIGN.md", "docs/ALGORITHMS.md", "docs/benchmarks.md")
# what wsss.cam exported at one level before its face was trimmed: all of it stays importable
BEFORE = (
    "CAM CAM_METHODS DEFAULT_PRESET GradCAM GradCAMPlusPlus GradientCAM HookedCAM INPUT_LAYER "
    "LayerCAM METHODS LRPConfig LibraCAM LibrarySettings LiftCAM NORMALIZATIONS PRESETS "
    "ReferenceLibrary RelevanceCAM Rule aggregate_scales box_rule build_cam build_library "
    "centred_normalize fuse_layers library_for list_presets minmax_normalize normalize_maps "
    "preset_config register_handler register_rule relu_max_normalize start_relevance "
    "unregister_rule upsample"
).split()


def documented_imports() -> set[tuple[str, str]]:
    """(module, name) for every ``from wsss.x import a, b`` and ``wsss.x.Name`` in the docs."""
    found = set()
    for doc in DOCUMENTS:
        text = (ROOT / doc).read_text()
        for module, names in re.findall(r"from (wsss(?:\.\w+)*) import ([\w, ]+)", text):
            found |= {(module, n.strip()) for n in names.split(",") if n.strip()}
        for path in re.findall(r"`(wsss\.cam(?:\.\w+)+)", text):
            module, _, name = path.rpartition(".")
            found.add((module, name))
    return found


def test_public_face_is_short_and_complete():
    names = set(wsss.cam.__all__)
    assert len(names) <= 20
    assert {"heatmaps", "RelevanceCAM", "GradCAM", "LibraCAM", "PRESETS", "Rule"} <= names
    assert "aggregate_scales" not in names and "HookedCAM" not in names
    for name in names:
        assert getattr(wsss.cam, name) is not None


@pytest.mark.parametrize("name", BEFORE)
def test_every_name_exported_before_still_imports(name):
    namespace: dict = {}
    exec(f"from wsss.cam import {name}", namespace)
    assert namespace[name] is getattr(wsss.cam, name)


def test_every_documented_import_works():
    documented = documented_imports()
    assert ("wsss.cam", "RelevanceCAM") in documented and ("wsss.cam", "heatmaps") in documented
    for module, name in sorted(documented):
        target = importlib.import_module(module)
        if not hasattr(target, name):  # a documented submodule, e.g. wsss.cam.libra
            importlib.import_module(f"{module}.{name}")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        wsss.cam.no_such_thing  # noqa: B018
