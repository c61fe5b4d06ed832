"""Test environment: offline, CPU, small."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes each
# training step 5-20x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# folder data sets cache their statistics here, not in the user's ~/.cache/wsss
os.environ["WSSS_CACHE_DIR"] = tempfile.mkdtemp(prefix="wsss-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA_DIR = Path(__file__).parent / "data"
VOC_MINI = DATA_DIR / "voc_mini" / "VOCdevkit" / "VOC2012"


@pytest.fixture
def voc_root() -> Path:
    return VOC_MINI
