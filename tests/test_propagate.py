"""Propagation logic against phantoms with known truth, and the tiny model end to end."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import annotate
from napari_sam._types import Prediction
from napari_sam.propagate import StopRule, propagate, seed_ranges, seeds_from_labels


def phantom(n=21, shape=(64, 80)):
    """Two touching ellipsoids (ids 1 and 2) whose size changes smoothly along Z."""
    z, y, x = np.meshgrid(np.arange(n), np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    truth = np.zeros((n, *shape), np.uint8)
    a = ((z - 10) / 9.5) ** 2 + ((y - 32) / 20) ** 2 + ((x - 25) / 15) ** 2 < 1
    b = ((z - 12) / 7.5) ** 2 + ((y - 32) / 14) ** 2 + ((x - 52) / 12) ** 2 < 1
    truth[a] = 1
    truth[b & ~a] = 2
    return truth


class StandInEngine:
    """Deterministic decoder: returns the true object that the mask prompt overlaps most.

    Its "logits" are the full-size mask as float, which it reads back as the next prompt,
    so the propagation logic is tested without SAM's randomness.
    """

    def __init__(self, truth, score=0.95, low_scores=None):
        self.truth, self.score, self.low = truth, score, low_scores or {}
        self.calls = []

    def predict_batch(self, embedding, prompts, multimask=False):
        z = embedding
        self.calls.append((z, len(prompts)))
        out = []
        for p in prompts:
            prev = np.asarray(p.mask_input) > 0
            r0, c0, r1, c1 = p.box.astype(int)
            inbox = np.zeros_like(prev)
            inbox[r0:r1 + 1, c0:c1 + 1] = True
            ids, counts = np.unique(self.truth[z][prev & inbox], return_counts=True)
            keep = ids != 0
            if not keep.any():
                mask, score = np.zeros(prev.shape, bool), 0.1
            else:
                obj = int(ids[keep][np.argmax(counts[keep])])
                mask, score = self.truth[z] == obj, self.low.get((z, obj), self.score)
            out.append(Prediction(mask[None], np.array([score], np.float32), mask[None].astype(np.float32)))
        return out


def run(gen):
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            return steps, stop.value


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def written(steps, shape):
    out = np.zeros(shape, np.uint8)
    for step in steps:
        for obj, mask in step.masks.items():
            out[step.z][mask] = obj
    return out


def test_single_object_both_directions_until_it_vanishes():
    truth = phantom()
    engine = StandInEngine(truth)
    steps, summary = run(propagate(engine, lambda z: z, {10: {1: truth[10] == 1}}, len(truth)))
    result = written(steps, truth.shape)
    result[10][truth[10] == 1] = 1
    assert dice(result == 1, truth == 1) >= 0.95
    zs = [s.z for s in steps if 1 in s.masks]
    assert zs[:3] == [11, 12, 13] and min(zs) < 10  # up first, then down
    stops = summary.stops[1]
    assert len(stops) == 2 and stops[0][0] > 10 and stops[1][0] < 10  # one stop per direction
    assert all(r == "vanished" or r.startswith("area changed") for _, r in stops)
    assert not result[truth == 0].any()  # never wrote outside the object


def test_multi_object_batched_per_slice_touching_objects_stay_apart():
    truth = phantom()
    engine = StandInEngine(truth)
    seeds = {11: seeds_from_labels(truth[11])}
    assert set(seeds[11]) == {1, 2}
    steps, summary = run(propagate(engine, lambda z: z, seeds, len(truth)))
    result = written(steps, truth.shape)
    result[11] = truth[11]
    for obj in (1, 2):
        assert dice(result == obj, truth == obj) >= 0.95
    # both objects decoded in the same call while both travel
    assert (12, 2) in engine.calls and (10, 2) in engine.calls
    assert all(n <= 2 for _, n in engine.calls)


def test_low_predicted_iou_stops_the_object():
    truth = phantom()
    engine = StandInEngine(truth, low_scores={(14, 1): 0.3})
    steps, summary = run(propagate(engine, lambda z: z, {10: {1: truth[10] == 1}}, len(truth),
                                   rule=StopRule(min_iou=0.5)))
    ups = [s.z for s in steps if 1 in s.masks and s.z > 10]
    assert ups == [11, 12, 13]
    assert (14, "predicted IoU 0.30 < 0.5") in summary.stops[1]


def test_area_jump_stops_the_object():
    truth = phantom()
    jumpy = truth.copy()
    jumpy[15][jumpy[15] == 1] = 0
    jumpy[15, 20:60, 5:70][truth[15, 20:60, 5:70] != 2] = 1  # object 1 suddenly huge
    engine = StandInEngine(jumpy)
    steps, summary = run(propagate(engine, lambda z: z, {10: {1: truth[10] == 1}}, len(truth),
                                   direction="up"))
    assert max(s.z for s in steps if 1 in s.masks) == 14
    assert summary.stops[1][0][0] == 15 and "area changed" in summary.stops[1][0][1]


def test_direction_range_and_limit():
    truth = phantom()
    engine = StandInEngine(truth)
    seeds = {10: {1: truth[10] == 1}}
    steps, _ = run(propagate(engine, lambda z: z, seeds, len(truth), direction="down", z_range=(6, 15)))
    assert [s.z for s in steps] == [9, 8, 7, 6]
    steps, _ = run(propagate(engine, lambda z: z, seeds, len(truth), rule=StopRule(max_slices=2)))
    assert sorted(s.z for s in steps) == [8, 9, 11, 12]


def test_seed_ranges_split_between_annotated_slices():
    assert seed_ranges([5], 0, 20) == {5: (0, 20)}
    assert seed_ranges([4, 10, 15], 0, 20) == {4: (0, 7), 10: (8, 12), 15: (13, 20)}
    assert seed_ranges([4, 10], 6, 9) == {4: (6, 7), 10: (8, 9)}


def test_both_ends_respected_and_rerun_from_a_correction_changes_only_its_range():
    truth = phantom()
    engine = StandInEngine(truth)
    seeds = {4: {1: truth[4] == 1}, 16: {1: truth[16] == 1}}
    steps, summary = run(propagate(engine, lambda z: z, seeds, len(truth)))
    zs = sorted(s.z for s in steps)
    span = set(np.flatnonzero((truth == 1).any(axis=(1, 2))))  # slices where object 1 exists
    assert set(zs) <= span - {4, 16} and len(zs) == len(set(zs))  # each slice at most once
    assert set(range(5, 16)) <= set(zs)  # everything between the two annotated slices
    # the user corrects slice 10: only the slices nearest to it are redone
    seeds[10] = {1: truth[10] == 1}
    steps, _ = run(propagate(engine, lambda z: z, seeds, len(truth), start=10))
    assert sorted(s.z for s in steps) == [8, 9, 11, 12, 13]


def test_labels_outside_the_objects_are_never_touched():
    truth = phantom()
    engine = StandInEngine(truth)
    labels = np.zeros(truth.shape, np.uint16)
    labels[10][truth[10] == 1] = 1
    labels[:, 0:6, 0:6] = 7  # someone else's label, everywhere
    labels[12, 30:34, 20:24] = 7  # and one inside object 1's path
    before = labels.copy()
    steps, _ = run(propagate(engine, lambda z: z, {10: seeds_from_labels(labels[10], ids=[1])}, len(truth)))
    for step in steps:
        ids = sorted(step.masks)
        plan = annotate.plan_commit(labels[step.z], [step.masks[i] for i in ids], ids, replace=ids)
        labels[step.z][plan.indices] = plan.values
    np.testing.assert_array_equal(labels == 7, before == 7)
    assert (labels == 1).sum() > (before == 1).sum()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(direction="sideways"), "direction"),
        (dict(z_range=(5, 40)), "z_range"),
        (dict(start=3), "start=3 has no seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    truth = phantom()
    with pytest.raises(ValueError, match=match):
        run(propagate(StandInEngine(truth), lambda z: z, {10: {1: truth[10] == 1}}, len(truth), **kwargs))
    with pytest.raises(ValueError, match="no seed"):
        run(propagate(StandInEngine(truth), lambda z: z, {}, len(truth)))
    with pytest.raises(ValueError, match="differ in shape"):
        run(propagate(StandInEngine(truth), lambda z: z, {1: {1: truth[1] == 1}, 2: {2: np.ones((3, 3), bool)}}, 21))


def test_tiny_model_end_to_end(tiny_engine, tmp_path):
    from napari_sam.cache import EmbeddingCache
    from napari_sam.volume import Stack

    truth = phantom(shape=(96, 112))[8:15]  # both objects present on the seed slice
    volume = (truth * 80 + 20).astype(np.uint8)
    stack = Stack(volume)
    cache = EmbeddingCache(tmp_path)
    seeds = {3: seeds_from_labels(truth[3])}
    steps, summary = run(propagate(
        tiny_engine, lambda z: stack.embedding(z, tiny_engine, cache), seeds, len(stack),
        rule=StopRule(min_iou=-1.0, max_area_ratio=1e9, min_area=0), interior_point=True,
    ))
    # the first slice in each direction gets both objects in one batched decode
    assert {s.z for s in steps} >= {2, 4}
    first_up = next(s for s in steps if s.z == 4)
    assert set(first_up.masks) | set(first_up.stopped) == {1, 2}
    for s in steps:
        assert set(s.masks) <= {1, 2}
        for mask in s.masks.values():
            assert mask.shape == truth.shape[1:] and mask.dtype == bool and mask.any()
    visited = {s.z for s in steps}
    assert cache.stats().entries == len(visited)  # each visited slice embedded once, cached


@pytest.mark.parametrize("seed", [6, 18, 11])
def test_nothing_outside_the_range_is_written(seed):
    """Issue 20.8: z_range=(9, 14) with a seed on 6 wrote 7 and 8; a seed on 18 wrote 15-17."""
    truth = phantom()
    engine = StandInEngine(truth)
    labels = np.zeros(truth.shape, np.uint8)
    labels[seed][truth[seed] == 1] = 1
    labels[7, 0:3, 0:3] = 9  # the user's own labels outside the range
    labels[16, 0:3, 0:3] = 9
    before = labels.copy()
    steps, summary = run(propagate(engine, lambda z: z, {seed: seeds_from_labels(labels[seed], ids=[1])},
                                   len(truth), z_range=(9, 14)))
    assert steps and {step.z for step in steps} <= set(range(9, 15))
    assert set(summary.slices[1]) <= set(range(9, 15))
    for step in steps:
        labels[step.z][step.masks[1]] = 1
    outside = [z for z in range(len(truth)) if not 9 <= z <= 14 and z != seed]
    np.testing.assert_array_equal(labels[outside], before[outside])
    # the object is carried into the range from an outside seed: slices 9..14 all get it
    assert all((labels[z] == 1).any() for z in range(9, 15) if (truth[z] == 1).any())
