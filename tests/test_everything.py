"""Automatic segmentation: hand-computed geometry, a stand-in engine on known objects, the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_sam import api
from napari_sam import everything as ev
from napari_sam._types import ImageEmbedding, IntensityMapping, sam_input_spec


# --- hand-computed pieces --------------------------------------------------------------------

def test_point_grid_is_cell_centres():
    np.testing.assert_allclose(ev.point_grid(2), [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])
    assert ev.point_grid(32).shape == (1024, 2)


def test_crop_boxes_match_the_reference_layout():
    boxes, layers = ev.crop_boxes((100, 200), 1, 0.5)
    # overlap = int(0.5 * 100 * 2 / 2) = 50; crop = ceil((50 + 100) / 2) x ceil((50 + 200) / 2) = 75 x 125
    assert boxes == [(0, 0, 100, 200), (0, 0, 75, 125), (0, 75, 75, 200), (25, 0, 100, 125), (25, 75, 100, 200)]
    assert layers == [0, 1, 1, 1, 1]
    assert len(ev.crop_boxes((64, 64), 2, 0.3)[0]) == 1 + 4 + 16


def test_stability_score_by_hand_numpy_and_torch_agree():
    logits = np.array([[[3.0, 0.5], [-0.5, -2.0]], [[-3.0, -3.0], [-3.0, -3.0]]])
    # mask 0: > +1 is 1 pixel, > -1 is 3 pixels -> 1/3; mask 1: empty at both -> 1 (stable)
    np.testing.assert_allclose(ev.stability_score(logits, 0.0, 1.0), [1 / 3, 1.0])
    np.testing.assert_allclose(ev.stability_score(torch.tensor(logits), 0.0, 1.0).numpy(), [1 / 3, 1.0])
    # offset 0.4: > 0.4 is 2 pixels, > -0.4 is 2 pixels -> 1
    np.testing.assert_allclose(ev.stability_score(logits[:1], 0.0, 0.4), [1.0])


def test_box_iou_by_hand():
    iou = ev.box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    np.testing.assert_allclose(iou, [[1 / 7, 1.0, 0.0]])


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 9]])
    scores = np.array([0.9, 0.8, 0.95])
    # IoU(C, A) = 90/100 = 0.9; IoU(C, B) = 72/118 = 0.61; IoU(A, B) = 81/119 = 0.68
    assert ev.nms(boxes, scores, 0.7).tolist() == [2, 1]
    assert ev.nms(boxes, scores, 0.6).tolist() == [2]
    assert ev.nms(boxes, scores, 0.95).tolist() == [2, 0, 1]
    # equal scores: the earlier box wins, every time
    assert ev.nms(np.array([[0, 0, 4, 4], [0, 0, 4, 4]]), np.array([0.5, 0.5]), 0.5).tolist() == [0]
    assert ev.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        ev.nms(boxes[:2], scores[:1], 0.5)


def test_remove_small_regions_holes_and_islands():
    mask = np.zeros((12, 12), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a 1-pixel hole
    mask[9, 9] = True  # a 1-pixel island
    filled, changed = ev.remove_small_regions(mask, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == mask.sum() + 1
    cleaned, changed = ev.remove_small_regions(filled, 2, "islands")
    assert changed and not cleaned[9, 9] and cleaned.sum() == 25
    same, changed = ev.remove_small_regions(cleaned, 2, "islands")
    assert not changed and np.array_equal(same, cleaned)
    # every island small: the largest stays, the mask never vanishes
    tiny = np.zeros((6, 6), bool)
    tiny[0, 0] = tiny[4, 4] = tiny[4, 5] = True
    kept, _ = ev.remove_small_regions(tiny, 10, "islands")
    assert kept.sum() == 2 and kept[4, 4]


def test_paste_best_first_no_pixel_twice_and_duplicates_dropped():
    def cand(box, score, stab=0.99):
        r0, c0, r1, c1 = box
        return ev._Candidate(box=box, mask=np.ones((r1 - r0, c1 - c0), bool), predicted_iou=score,
                             stability=stab, point=(r0, c0), crop=(0, 0, 20, 20))

    a = cand((0, 0, 10, 10), 0.90)
    b = cand((5, 5, 15, 15), 0.95)  # better: pasted first, claims the overlap
    c = cand((6, 6, 14, 14), 0.93)  # entirely inside b: nothing left -> dropped
    d = cand((0, 8, 4, 20), 0.91)  # 48 px, 8 taken by a? no: a is worse; it loses only 0 to b
    labels, records = ev.paste((20, 20), [a, b, c, d])
    assert labels.dtype == np.uint32
    assert [r.predicted_iou for r in records] == [0.95, 0.91, 0.90]
    assert np.count_nonzero(labels == 1) == 100  # b whole
    assert records[1].area == 48 and np.count_nonzero(labels == 2) == 48  # d
    # a keeps what b and d left: 100 - 25 (b) - 8 (d) = 67 >= half of 100
    assert records[2].area == 67 and np.count_nonzero(labels == 3) == 67
    assert records[2].box == (0, 0, 10, 10)
    for r in records:
        assert np.count_nonzero(labels == r.id) == r.area


def test_link_slice_by_hand():
    prev = np.zeros((10, 10), np.uint32)
    prev[0:4, 0:4] = 7
    prev[6:10, 6:10] = 9
    cur = np.zeros((10, 10), np.uint32)
    cur[0:4, 1:5] = 1  # IoU with 7: 12/20 = 0.6
    cur[6:10, 0:3] = 2  # overlaps nothing
    cur[7:10, 7:10] = 3  # IoU with 9: 9/16
    linked, mapping, nxt = ev.link_slice(prev, cur, 0.3, 10)
    assert mapping == {1: 7, 2: 10, 3: 9} and nxt == 11
    assert set(np.unique(linked)) == {0, 7, 9, 10}
    # a stricter threshold: 0.6 links 1 -> 7, but 9/16 < 0.6 gives 3 a new id
    _, mapping, _ = ev.link_slice(prev, cur, 0.6, 10)
    assert mapping == {1: 7, 2: 10, 3: 11}
    # one to one: two pieces over one object, the better overlap keeps the id
    cur2 = np.zeros((10, 10), np.uint32)
    cur2[0:4, 0:3] = 1  # IoU 12/16
    cur2[0:4, 3:4] = 2  # IoU 4/16
    _, mapping, _ = ev.link_slice(prev, cur2, 0.2, 20)
    assert mapping == {1: 7, 2: 20}


@pytest.mark.parametrize("kwargs, message", [
    ({"points_per_side": 0}, "points_per_side must be an integer >= 1"),
    ({"points_per_side": 2.5}, "points_per_side must be an integer"),
    ({"pred_iou_thresh": 1.5}, "pred_iou_thresh must be a number between 0 and 1"),
    ({"stability_score_offset": 0}, "stability_score_offset must be a positive number"),
    ({"crop_n_layers": 9}, "crop_n_layers must be at most 4"),
    ({"link_iou": float("nan")}, "link_iou must be a number between 0 and 1"),
])
def test_params_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ev.EverythingParams(**kwargs)


# --- a stand-in engine on synthetic images with known objects -----------------------------------

class StandInEngine:
    """Decodes a point into the known object under it, as a good SAM would, plus decoys.

    Its "embedding" is the image itself; its "low-res logits" are full-size (upscaling is
    the identity). For a point on an object it offers the object (IoU 0.95, confident
    logits), the object grown by one pixel (0.90: a near-duplicate for NMS to remove) and
    the whole image with the best score but hesitant logits (0.99: only the stability
    filter stops it). On the background it offers masks scored 0.3 (the IoU filter).
    """

    model_id = "stand-in"
    dtype = torch.float32
    precision = "fp32"
    backend = "torch"

    def __init__(self):
        self.decoded_points = 0

    def embed_steps(self, image, *, mapping=None):
        yield 1, 1
        return ImageEmbedding(features=torch.from_numpy(np.asarray(image, np.float32))[None, None],
                              original_size=image.shape[:2], input_size=image.shape[:2],
                              spec=sam_input_spec(), mapping=mapping or IntensityMapping("minmax", 0, 1),
                              model_id=self.model_id)

    def point_candidates(self, embedding, points, *, multimask=True, min_score=None):
        image = embedding.features[0, 0].numpy()
        objects, _ = ndimage.label(image > 100)
        h, w = image.shape
        low, scores, which = [], [], []
        for i, (r, c) in enumerate(np.asarray(points)):
            self.decoded_points += 1
            obj = objects[min(int(r), h - 1), min(int(c), w - 1)]
            if obj:
                mask = objects == obj
                cands = [(mask, 0.95, 8.0), (ndimage.binary_dilation(mask), 0.90, 8.0),
                         (np.ones_like(mask), 0.99, 0.5)]
            else:
                cands = [(objects == 0, 0.3, 8.0)] * 3
            for m, score, strength in cands:
                if min_score is None or score > min_score:
                    low.append(np.where(m, strength, -strength).astype(np.float32))
                    scores.append(score)
                    which.append(i)
        if not low:
            return torch.zeros((0, h, w)), np.zeros(0, np.float32), np.zeros(0, np.int64)
        return torch.from_numpy(np.stack(low)), np.array(scores, np.float32), np.array(which)

    def upscale_logits(self, low, embedding):
        return low


def synthetic_objects(shape=(160, 200), seed=0):
    """Discs and rectangles at known places; returns (image, ground-truth instance labels)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    truth = np.zeros(shape, np.int32)
    truth[((rr - 40) ** 2 + (cc - 50) ** 2) < 22 ** 2] = 1
    truth[((rr - 110) ** 2 + (cc - 140) ** 2) < 30 ** 2] = 2
    truth[20:60, 120:185] = 3
    truth[115:150, 20:70] = 4
    truth[((rr - 80) ** 2 + (cc - 95) ** 2) < 12 ** 2] = 5
    image = rng.normal(30, 5, shape) + (truth > 0) * 170
    return np.clip(image, 0, 255).astype(np.uint8), truth


def matched_ious(labels, truth):
    out = []
    for t in range(1, truth.max() + 1):
        gt = truth == t
        ids, counts = np.unique(labels[gt], return_counts=True)
        best = 0.0
        for i in ids[ids > 0]:
            m = labels == i
            best = max(best, (m & gt).sum() / (m | gt).sum())
        out.append(best)
    return out


def _run(engine, image, params=None, cancelled=lambda: False):
    def embed_steps(box):
        r0, c0, r1, c1 = box
        return engine.embed_steps(image[r0:r1, c0:c1])

    steps = ev.segment_steps(engine, image.shape, embed_steps, params or ev.EverythingParams(), cancelled=cancelled)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as stop:
            return stop.value, progress


def test_stand_in_recovers_known_objects():
    image, truth = synthetic_objects()
    engine = StandInEngine()
    result, progress = _run(engine, image, ev.EverythingParams(points_per_side=16))
    assert result.labels.dtype == np.uint32 and result.labels.shape == image.shape
    ious = matched_ious(result.labels, truth)
    assert min(ious) >= 0.9, ious
    assert len(result.records) == truth.max()  # decoys and duplicates are gone
    assert engine.decoded_points == 256
    decoding = [p for p in progress if p.stage == "decoding"]
    assert decoding[-1].done == decoding[-1].total == 4  # 256 points, 64 per batch
    for r in result.records:
        assert np.count_nonzero(result.labels == r.id) == r.area
        assert result.labels[int(r.point[0]), int(r.point[1])] == r.id


def test_stand_in_with_crops_and_small_region_cleanup():
    image, truth = synthetic_objects()
    image[5, 5] = 255  # a 1-pixel "object": removed by min_mask_region_area
    result, _ = _run(StandInEngine(), image,
                     ev.EverythingParams(points_per_side=16, crop_n_layers=1, min_mask_region_area=30))
    assert min(matched_ious(result.labels, truth)) >= 0.9
    assert len(result.records) == truth.max()
    assert result.labels[5, 5] == 0


def test_cancel_stops_between_batches():
    image, _ = synthetic_objects()
    engine = StandInEngine()
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return engine.decoded_points >= 64

    result, _ = _run(engine, image, ev.EverythingParams(points_per_side=16), cancelled)
    assert result is None and engine.decoded_points == 64


def moving_objects_volume(n=6):
    """A disc drifting a little per slice, a box on slices 0-2 and another box on slices 4-5
    at the same place (a gap: two objects, two ids)."""
    vol = np.zeros((n, 120, 140), np.uint8)
    truth = np.zeros(vol.shape, np.int32)
    rr, cc = np.mgrid[:120, :140]
    for z in range(n):
        disc = ((rr - 40) ** 2 + (cc - 40 - 3 * z) ** 2) < (20 - z) ** 2
        truth[z][disc] = 1
        if z <= 2:
            truth[z, 70:100, 80:120] = 2
        if z >= 4:
            truth[z, 72:100, 82:120] = 3
    vol[:] = 20 + (truth > 0) * 180
    return vol, truth


def test_stand_in_volume_keeps_one_id_per_object():
    vol, truth = moving_objects_volume()
    engine = StandInEngine()
    stack = api.Stack(vol)
    result = api.segment_everything_volume(engine, stack, points_per_side=12)
    labels = result.labels
    assert labels.dtype == np.uint32 and labels.shape == vol.shape
    for t in (1, 2, 3):
        ids = np.unique(labels[truth == t])
        assert len(ids) == 1 and ids[0] > 0, (t, ids)
        m = labels == ids[0]
        assert (m & (truth == t)).sum() / (m | (truth == t)).sum() >= 0.9
    assert len({int(np.unique(labels[truth == t])[0]) for t in (1, 2, 3)}) == 3
    by_id = {r.id: r for r in result.records}
    assert by_id[int(np.unique(labels[truth == 1])[0])].slices == (0, 5)
    assert by_id[int(np.unique(labels[truth == 3])[0])].slices == (4, 5)
    for r in result.records:
        assert np.count_nonzero(labels == r.id) == r.area
    # a sub-range leaves other slices empty and starts ids from 1
    part = api.segment_everything_volume(engine, stack, z_range=(1, 3), points_per_side=12)
    assert not part.labels[0].any() and not part.labels[3:].any() and part.labels[1:3].any()
    with pytest.raises(ValueError, match="z_range"):
        api.segment_everything_volume(engine, stack, z_range=(3, 3))


# --- the tiny model, end to end --------------------------------------------------------------

# The tiny random model's logits are ~1e-3: a matching offset lets its candidates through.
TINY = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=1e-4)


def test_point_candidates_equal_single_prompt_decoding(tiny_engine, blob_image):
    emb = tiny_engine.embed(blob_image)
    points = np.array([[60.0, 70.0], [120.0, 170.0], [10.0, 10.0]])
    low, scores, which = tiny_engine.point_candidates(emb, points, multimask=True)
    assert low.shape == (9, tiny_engine.low_res_size, tiny_engine.low_res_size)
    assert which.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, p in enumerate(points):
        alone = tiny_engine.predict(emb, points=[p], multimask=True)
        np.testing.assert_allclose(low[3 * i:3 * i + 3].numpy(), alone.logits, atol=1e-6)
        np.testing.assert_allclose(scores[3 * i:3 * i + 3], alone.scores, atol=1e-6)
    kept_low, kept_scores, kept_which = tiny_engine.point_candidates(emb, points, min_score=float(np.median(scores)))
    assert (kept_scores > np.median(scores)).all() and len(kept_scores) == (scores > np.median(scores)).sum()


def test_tiny_model_end_to_end_from_the_cache(tiny_engine, blob_image, tmp_path):
    cache = api.EmbeddingCache(tmp_path / "cache")
    result = api.segment_everything(tiny_engine, blob_image, cache=cache, **TINY)
    labels = result.labels
    assert labels.dtype == np.uint32 and labels.shape == blob_image.shape
    assert len(result.records) >= 1
    assert sorted(r.id for r in result.records) == sorted(int(i) for i in np.unique(labels) if i)
    emb = tiny_engine.embed(blob_image)
    for r in result.records:
        assert np.count_nonzero(labels == r.id) == r.area
        # every instance is (part of) a candidate the decoder gives for its grid point
        pred = tiny_engine.predict(emb, points=[r.point], multimask=True)
        mine = labels == r.id
        assert any((mine & ~m).sum() <= 0.01 * mine.sum() for m in pred.masks)
    assert [r.predicted_iou for r in result.records] == sorted((r.predicted_iou for r in result.records), reverse=True)
    # later runs take the embedding from the cache: no encoder call; from memory the labels
    # are identical (the disk copy is float16, so a fresh cache may differ at the margins)
    calls = []
    original = tiny_engine.encode_steps
    tiny_engine.encode_steps = lambda images: (calls.append(1), (yield from original(images)))[1]
    try:
        again = api.segment_everything(tiny_engine, blob_image, cache=cache, **TINY)
        from_disk = api.segment_everything(tiny_engine, blob_image, cache=api.EmbeddingCache(tmp_path / "cache"), **TINY)
    finally:
        del tiny_engine.encode_steps
    assert calls == [] and np.array_equal(again.labels, labels)
    assert from_disk.labels.shape == labels.shape and len(from_disk.records) >= 1


def test_tiny_model_volume_and_api_errors(tiny_engine, blob_volume):
    stack = api.Stack(blob_volume)
    result = api.segment_everything_volume(tiny_engine, stack, z_range=(0, 2), **TINY)
    assert result.labels.shape == blob_volume.shape and result.labels.dtype == np.uint32
    assert not result.labels[2:].any()
    with pytest.raises(TypeError, match="unexpected option"):
        api.segment_everything(tiny_engine, blob_volume[0], points_per_sid=4)
    with pytest.raises(TypeError, match="not both"):
        api.segment_everything(tiny_engine, blob_volume[0], params=ev.EverythingParams(), points_per_side=4)
    with pytest.raises(ValueError, match="points_per_side"):
        api.segment_everything(tiny_engine, blob_volume[0], points_per_side=-1)


# --- the command line ------------------------------------------------------------------------

TINY_FLAGS = ["--points-per-side", "8", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
              "--stability-score-offset", "0.0001"]


def test_cli_everything_2d_writes_labels_and_table(tiny_sam_dir, blob_image, tmp_path, tiny_engine):
    import csv

    import tifffile

    from napari_sam.cli import main

    image = tmp_path / "blobs.tif"
    tifffile.imwrite(image, blob_image)
    out, table = tmp_path / "labels.tif", tmp_path / "objects.csv"
    code = main(["everything", str(image), *TINY_FLAGS, "--model", str(tiny_sam_dir), "--device", "cpu",
                 "--cache", str(tmp_path / "cache"), "-o", str(out), "--table", str(table)])
    assert code == 0
    labels = tifffile.imread(out)
    expected = api.segment_everything(tiny_engine, blob_image, **TINY)
    np.testing.assert_array_equal(labels, expected.labels)
    rows = list(csv.DictReader(open(table)))
    assert [int(r["id"]) for r in rows] == [r.id for r in expected.records]
    assert [int(r["area"]) for r in rows] == [int((labels == r.id).sum()) for r in expected.records]
    # an existing output is never replaced silently
    assert main(["everything", str(image), *TINY_FLAGS, "--model", str(tiny_sam_dir), "-o", str(out)]) == 2


def test_cli_everything_stack_slice_range(tiny_sam_dir, blob_volume, tmp_path, capsys):
    import tifffile

    from napari_sam.cli import main

    vol = tmp_path / "stack.npy"
    np.save(vol, blob_volume)
    out = tmp_path / "stack_labels.tif"
    code = main(["everything", str(vol), *TINY_FLAGS, "--slice-range", "1:3", "--model", str(tiny_sam_dir),
                 "--device", "cpu", "--no-cache", "-o", str(out)])
    assert code == 0
    labels = tifffile.imread(out)
    assert labels.shape == blob_volume.shape
    assert labels[1:3].any() and not labels[0].any() and not labels[3:].any()
    assert "objects; wrote" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--points-per-side", "0"], "points_per_side must be an integer >= 1"),
    (["--slice-range", "1:3"], "--slice-range needs a 3D stack"),
    (["--link-iou", "2"], "link_iou must be a number between 0 and 1"),
])
def test_cli_everything_errors_are_one_line(extra, message, blob_image, tmp_path, capsys):
    import tifffile

    from napari_sam.cli import main

    image = tmp_path / "blobs.tif"
    tifffile.imwrite(image, blob_image)
    # no model is loaded (the option is checked first): a missing model would say so instead
    code = main(["everything", str(image), *extra, "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_point_candidates_with_no_points_and_bad_points(tiny_engine, blob_image):
    emb = tiny_engine.embed(blob_image)
    low, scores, which = tiny_engine.point_candidates(emb, np.zeros((0, 2)))
    assert low.shape == (0, tiny_engine.low_res_size, tiny_engine.low_res_size) and len(scores) == len(which) == 0
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny_engine.point_candidates(emb, [[np.nan, 3.0]])
    with pytest.raises(ValueError, match="different model"):
        other = ImageEmbedding(emb.features, emb.original_size, emb.input_size, emb.spec, emb.mapping, "other")
        tiny_engine.point_candidates(other, [[3.0, 3.0]])


# --- found by a fresh tester ----------------------------------------------------------------

def test_nms_equals_the_all_pairs_reference_and_stays_linear_in_memory():
    import tracemalloc

    rng = np.random.default_rng(1)
    r0, c0 = rng.integers(0, 80, 300), rng.integers(0, 80, 300)
    boxes = np.stack([r0, c0, r0 + rng.integers(1, 30, 300), c0 + rng.integers(1, 30, 300)], axis=1)
    scores = rng.random(300).round(2)  # ties too
    order = np.argsort(-scores, kind="stable")
    ious = ev.box_iou(boxes[order], boxes[order])
    dead, reference = np.zeros(300, bool), []
    for i in range(300):
        if not dead[i]:
            reference.append(order[i])
            dead |= ious[i] > 0.5
    assert ev.nms(boxes, scores, 0.5).tolist() == reference
    # 40 000 candidates (a dense grid): an all-pairs matrix would be 12.8 GB
    many = np.concatenate([np.tile([[0, 0, 10, 10]], (20000, 1)), np.arange(20000)[:, None] * 20 + [[0, 0, 5, 5]]])
    tracemalloc.start()
    keep = ev.nms(many, np.linspace(1, 0, len(many)), 0.7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keep[0] == 0 and len(keep) == 1 + 20000  # the first stacked copy, every spaced box
    assert peak < 64 * 2**20, peak


def test_params_reject_bools_and_accept_numpy_numbers():
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        ev.EverythingParams(pred_iou_thresh=True)
    with pytest.raises(ValueError, match="points_per_side"):
        ev.EverythingParams(points_per_side=True)
    with pytest.raises(ValueError, match="at most 1024"):
        ev.EverythingParams(points_per_side=5000)
    assert ev.EverythingParams(pred_iou_thresh=np.int64(1), stability_score_thresh=np.float16(0.5),
                               points_per_side=np.int32(8)).points_per_side == 8


def test_images_too_small_for_the_crops_are_refused_up_front():
    params = ev.EverythingParams(crop_n_layers=2)
    with pytest.raises(ValueError, match=r"crop_n_layers=2 cuts this 10x2000 image into crops under 2 pixels"):
        params.check_image((10, 2000))
    with pytest.raises(ValueError, match="at least 2x2"):
        ev.EverythingParams().check_image((1, 1))
    engine = StandInEngine()
    with pytest.raises(ValueError, match="crop_n_layers=2"):
        _run(engine, np.zeros((10, 2000), np.uint8), params)
    assert engine.decoded_points == 0


def test_volume_arguments_are_checked(blob_volume):
    engine = StandInEngine()
    stack = api.Stack(blob_volume)
    for bad in [(0.5, 2.7), ("1", "3"), (True, 3), (1, 2, 3), (1,), "13", {1: 0, 3: 0}]:
        with pytest.raises(TypeError, match="z_range must be two integers"):
            api.segment_everything_volume(engine, stack, z_range=bad)
    with pytest.raises(TypeError, match="must be a napari_sam.Stack"):
        api.segment_everything_volume(engine, blob_volume)
    result = api.segment_everything_volume(engine, stack, z_range=(np.int64(1), 2), points_per_side=4)
    assert not result.labels[0].any()


def test_cli_everything_refuses_bad_outputs_before_loading_the_model(blob_image, tmp_path, capsys):
    import tifffile

    from napari_sam.cli import main

    image = tmp_path / "blobs.tif"
    tifffile.imwrite(image, blob_image)
    no_model = ["--model", str(tmp_path / "no-model")]  # loading it would fail with another message
    (tmp_path / "adir.tif").mkdir()
    cases = [
        (["-o", str(tmp_path / "same.tif"), "--table", str(tmp_path / "same.tif")], "give the table its own name"),
        (["-o", str(tmp_path / "nodir" / "x.tif")], "does not exist"),
        (["-o", str(tmp_path / "x.png")], "name it *.tif"),
        (["-o", str(tmp_path / "adir.tif")], "is a folder"),
        (["-o", str(image), "--overwrite"], "is the input image"),
        (["-o", str(tmp_path / "ok.tif"), "--table", str(tmp_path / "t.tif")], "name it *.csv"),
        (["-o", str(image / "x.tif")], "is not a folder"),
        (["-o", str(tmp_path / "ok.tif"), "--axis", "1"], "is 2D"),
        (["-o", str(tmp_path / "ok.tif"), "--axis", "0", "--2d"], "give one of them"),
        (["-o", str(tmp_path / "ok.tif"), "--table", str(tmp_path / "nodir" / "t.csv")], "does not exist"),
    ]
    for extra, message in cases:
        code = main(["everything", str(image), *no_model, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "ok.tif").exists()
    thin = tmp_path / "thin.tif"
    tifffile.imwrite(thin, np.zeros((10, 2000), np.uint8))
    assert main(["everything", str(thin), *no_model, "--crop-n-layers", "2", "-o", str(tmp_path / "t.tif")]) == 2
    assert "use fewer crop layers" in capsys.readouterr().err
    tiny = tmp_path / "tiny.tif"
    tifffile.imwrite(tiny, np.zeros((1, 1), np.uint8))
    assert main(["everything", str(tiny), *no_model, "-o", str(tmp_path / "t.tif")]) == 2
    assert "at least 2x2" in capsys.readouterr().err


def test_cli_everything_few_channels_are_one_image(tiny_sam_dir, tmp_path, capsys):
    import tifffile

    from napari_sam.cli import main

    rng = np.random.default_rng(0)
    image = tmp_path / "c5.tif"
    tifffile.imwrite(image, rng.integers(0, 255, (64, 80, 5), dtype=np.uint8), photometric="minisblack",
                     planarconfig="contig")
    out = tmp_path / "c5_labels.tif"
    code = main(["everything", str(image), *TINY_FLAGS, "--channel", "2", "--model", str(tiny_sam_dir),
                 "--device", "cpu", "--no-cache", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert tifffile.imread(out).shape == (64, 80)


def test_cli_everything_axis_reads_a_stack(tiny_sam_dir, tmp_path):
    import tifffile

    from napari_sam.cli import main

    rng = np.random.default_rng(0)
    image = tmp_path / "c5.tif"
    tifffile.imwrite(image, rng.integers(0, 255, (64, 80, 5), dtype=np.uint8), photometric="minisblack")
    out = tmp_path / "c5_stack.tif"
    code = main(["everything", str(image), *TINY_FLAGS, "--axis", "2", "--slice-range", "0:2",
                 "--model", str(tiny_sam_dir), "--device", "cpu", "--no-cache", "-o", str(out)])
    assert code == 0
    labels = tifffile.imread(out)
    assert labels.shape == (64, 80, 5) and labels[..., :2].any() and not labels[..., 2:].any()
