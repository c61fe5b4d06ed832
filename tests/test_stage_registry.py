"""The stage registry: stage hashes stay what existing runs recorded, and the CLI and `wsss run` take
their stages from the registry."""

import pytest

from wsss.config import load_config
from wsss.stages.records import stage_hashes

# stage.json `config_hash` values of runs made before the registry existed: a change here would make
# every existing run directory refuse its own config
PINNED = {
    (): {"classifier": "4553f0232b387836", "pseudo_masks": "da6f02de78cb2c20", "affinity": "2338441c0f2929e0",
         "segmenter": "f22fcecbab8b8d03", "evaluation": "fa3e7f976d163b82"},
    ("pseudo.refine=affinity",): {
        "classifier": "4553f0232b387836", "pseudo_masks": "7b3c29c21a14ff91", "affinity": "2700dd546d288ef7",
        "segmenter": "4f89af08ee57542d", "evaluation": "63e9987cf339537e"},
    ("pseudo.refine=affinity", "segmenter.masks=ground_truth"): {
        "classifier": "4553f0232b387836", "pseudo_masks": "7b3c29c21a14ff91", "affinity": "2700dd546d288ef7",
        "segmenter": "c03cba3907215978", "evaluation": "016388f9473656f0"},
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_stage_hashes_match_the_ones_existing_runs_recorded(overrides):
    assert stage_hashes(load_config("configs/default.yaml", list(overrides))) == PINNED[overrides]
