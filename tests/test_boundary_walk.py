"""The boundary-aware random walk: a boundary between two regions stops the scores crossing, no
boundary leaves today's walk, scores stay distributions, and the key reaches the walk."""

import torch

from wsss import stages
from wsss.pseudo.affinity_pairs import Affinities, neighbour_offsets
from wsss.pseudo.boundary import boundary_map, cut_by_boundaries, path_cells
from wsss.pseudo.walk import random_walk, random_walk_refine
from wsss.stages import affinity as affinity_stage

from conftest import reuse_stage, tiny_config

RADIUS = 4


def two_regions(h: int = 10, w: int = 12, edge: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities that are wrong at long range (every pair 1, also across the edge) but right
    between adjacent cells (0 across the vertical edge before column ``edge``), and scores
    [1, 0] left of the edge, [0, 1] right of it."""
    offsets = neighbour_offsets(RADIUS)
    affinity = torch.ones(1, len(offsets), h, w)
    for k, (dy, dx) in enumerate(offsets):
        if max(abs(dy), abs(dx)) == 1:  # adjacent: cut where the pair straddles the edge
            for x in range(w):
                if (x < edge) != (x + dx < edge):
                    affinity[0, k, :, x] = 0.0
    scores = torch.zeros(1, 2, h, w)
    scores[0, 0, :, :edge] = 1.0
    scores[0, 1, :, edge:] = 1.0
    return affinity, scores


def test_path_cells_are_the_cells_strictly_between():
    assert path_cells(0, 4) == ((0, 1), (0, 2), (0, 3))
    assert path_cells(1, 1) == () and path_cells(0, 1) == ()
    assert path_cells(2, -2) == ((1, -1),)
    assert path_cells(3, 1) == ((1, 0), (2, 1))


def test_boundary_map_marks_the_cells_beside_the_edge():
    affinity, _ = two_regions()
    boundary = boundary_map(affinity, RADIUS)[0, 0]
    assert torch.equal(boundary[:, 5:7], torch.ones(10, 2))
    assert float(boundary[:, :5].abs().max()) == 0.0 and float(boundary[:, 7:].abs().max()) == 0.0


def test_a_boundary_stops_the_scores_from_crossing_it():
    affinity, scores = two_regions()
    plain = random_walk(scores, affinity, RADIUS, beta=1.0, steps=30)
    cut = random_walk(scores, cut_by_boundaries(affinity, RADIUS, 2.0), RADIUS, 1.0, 30)
    # the plain walk jumps the edge along the wrong long-range affinities ...
    assert float(plain[0, 1, :, :6].max()) > 0.2 and float(plain[0, 0, :, 6:].max()) > 0.2
    # ... the boundary-aware walk does not move a single bit of score across it
    assert float(cut[0, 1, :, :6].max()) == 0.0 and float(cut[0, 0, :, 6:].max()) == 0.0
    assert torch.allclose(cut.sum(1), torch.ones(1, 10, 12))


def test_without_a_boundary_the_walk_is_todays_walk():
    gen = torch.Generator().manual_seed(0)
    offsets = neighbour_offsets(RADIUS)
    affinity = torch.rand(2, len(offsets), 6, 7, generator=gen)
    for k, (dy, dx) in enumerate(offsets):
        if max(abs(dy), abs(dx)) == 1:
            affinity[:, k] = 1.0  # every adjacent pair certain: no boundary anywhere
    scores = torch.rand(2, 3, 24, 28, generator=gen).softmax(1)
    affinities = Affinities(affinity, RADIUS, 4)
    today = random_walk_refine(scores, affinities, beta=4.0, steps=6)
    assert torch.equal(
        random_walk_refine(scores, affinities, beta=4.0, steps=6, boundary_power=3), today
    )
    assert cut_by_boundaries(affinity, RADIUS, 0.0) is affinity


def test_scores_stay_distributions_under_the_boundary_walk():
    gen = torch.Generator().manual_seed(1)
    affinity = torch.rand(2, len(neighbour_offsets(RADIUS)), 6, 7, generator=gen)
    scores = torch.rand(2, 3, 24, 28, generator=gen).softmax(1)
    walked = random_walk_refine(
        scores, Affinities(affinity, RADIUS, 4), beta=8.0, steps=10, boundary_power=2
    )
    assert bool((walked >= 0).all())
    assert torch.allclose(walked.sum(1), torch.ones(2, 24, 28), atol=1e-5)
    assert not torch.allclose(
        walked, random_walk_refine(scores, Affinities(affinity, RADIUS, 4), beta=8.0, steps=10)
    )


def test_boundary_power_reaches_the_affinity_stages_walk(tmp_path, trained_classifier, monkeypatch):
    seen = []
    original = affinity_stage.propagate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("boundary_power"))
        return original(*args, **kwargs)

    monkeypatch.setattr(affinity_stage, "propagate", spy)
    reuse_stage(trained_classifier, tmp_path)
    cfg = tiny_config(
        tmp_path,
        "pseudo.calibration_images=4",
        "pseudo.num_panels=0",
        "pseudo.refine=affinity",
        "affinity.max_epochs=1",
        "affinity.steps=2",
        "affinity.boundary_power=3",
        size="stage",
    )
    stages.make_pseudo_masks(cfg)
    record = stages.train_affinity(cfg)
    assert record["refined_written_now"] == 12 and seen and set(seen) == {3.0}
