"""Fine-tuning the mask decoder: it learns, saves, reloads, resumes, and refuses bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_sam import _finetune_data as fd
from napari_sam import _finetune_train as ft
from napari_sam import preprocess as pp
from conftest import dataset, scene
from napari_sam.api import (CheckpointError, EmbeddingCache, FinetuneConfig, Prompt, finetune, finetune_steps,
                            load_model)

# From scratch on a random tiny model: a learning rate ten times the default for real weights.
FAST = dict(learning_rate=1e-3, train_prompt_encoder=True, patience=100)


# --- the trainable decoder is what predict runs ----------------------------------------


def test_targets_from_object_regions_match_whole_image_reduction():
    from napari_sam._types import medsam_input_spec, sam_input_spec

    rng = np.random.default_rng(3)
    for spec in (sam_input_spec(1024), sam_input_spec(256), medsam_input_spec(256)):
        for shape in [(96, 96), (130, 517), (700, 333), (37, 2000), (5, 7)]:
            lab = np.zeros(shape, np.int32)
            for k in range(1, 6):
                r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                lab[max(0, r - 30):r + 30, max(0, c - 20):c + 25] = k
            size = spec.target_length // 4
            h, w = fd.low_res_frame(shape, spec, size)
            cell = max(shape[0] / h, shape[1] / w)  # image pixels per cell
            for o in fd.find_objects(lab, 0, spec, size, 1)[0]:
                whole = fd.low_res_target(lab == o.label, spec, size)
                np.testing.assert_allclose(o.low_res(size), whole, atol=(1 / cell if cell > 1 else 0) + 2e-3)


def test_training_forward_is_the_decoder_predict_runs(ft_engine):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (96, 120)).astype(np.uint8)
    emb = ft_engine.embed(image)
    parts, view = ft.decoder_parts(ft_engine)
    assert view.model_id == ft_engine.model_id  # same encoder: same embeddings and cache keys
    box, pts, lab = np.array([10, 20, 60, 90.0]), np.array([[30, 40], [50, 70.0]]), np.array([1, 0])
    shape = image.shape

    def t(a):
        return torch.from_numpy(np.asarray(a, np.float32)[None, None])

    cases = [(Prompt(box=box), dict(boxes=t(pp.box_to_model(box, shape, ft_engine.spec)))),
             (Prompt(points=pts, point_labels=lab),
              dict(points=t(pp.points_to_model(pts, shape, ft_engine.spec)), labels=torch.tensor([[[1, 0]]]))),
             (Prompt(points=pts, point_labels=lab, box=box),
              dict(points=t(pp.points_to_model(pts, shape, ft_engine.spec)), labels=torch.tensor([[[1, 0]]]),
                   boxes=t(pp.box_to_model(box, shape, ft_engine.spec))))]
    for prompt, kwargs in cases:
        want = ft_engine.predict(emb, prompt.points, prompt.point_labels, prompt.box).logits
        with torch.no_grad():
            got, _ = parts(emb.features.float(), **kwargs)
        np.testing.assert_allclose(got.numpy()[0], want, atol=1e-5)


def test_prompts_sampled_on_the_object():
    rng = np.random.default_rng(0)
    _, lab = scene(rng)
    from napari_sam._types import sam_input_spec

    spec = sam_input_spec(256)
    objects, small = fd.find_objects(lab, 0, spec, 64, min_area=16)
    assert small == 0 and [o.label for o in objects] == [1, 2]
    for o in objects:
        truth = o.full_mask(lab.shape)
        np.testing.assert_array_equal(truth, lab == o.label)
        pts, labels = fd.sample_points(o, lab.shape, 6, rng)
        assert labels[0] == 1
        inside = truth[pts[:, 0].astype(int), pts[:, 1].astype(int)]
        np.testing.assert_array_equal(inside, labels == 1)  # positives in, negatives out
        box = fd.jittered_box(o, lab.shape, spec, rng, 0.1)
        assert np.all(np.abs(box - np.asarray(o.box)) <= 20 * 96 / 256 + 1e-9)  # at most 20 model pixels
        assert truth[tuple(fd.centre_point(o).astype(int))]
        target = o.low_res(64)
        assert abs(float(target.sum()) * (96 / 64) ** 2 - truth.sum()) < 0.05 * truth.sum()
        # computed on the object's region only, it is the whole image's box-filter reduction
        # (to a pixel row of a cell: PIL counts pixels by their centres)
        np.testing.assert_allclose(target, fd.low_res_target(truth, spec, 64), atol=1 / 1.5 + 1e-6)


# --- it learns ---------------------------------------------------------------------------


def test_finetune_raises_held_out_dice(ft_engine, tmp_path):
    """A real learning test: held-out images, fixed seeds; the random decoder's masks are
    nearly the whole image (Dice ~0.05) and training makes them the objects."""
    images, labels = dataset()
    result = finetune(ft_engine, images, labels, tmp_path / "model", config=FinetuneConfig(epochs=40, **FAST))
    assert result.val_objects == 4 and result.train_objects == 20  # 2 of 12 images held out
    assert result.dice_before < 0.1
    assert result.dice_after > 0.5 and result.dice_after > result.dice_before + 0.4
    assert result.dice_by_prompt["box"][1] > 0.5 and result.dice_by_prompt["point"][1] > 0.5
    assert result.stopped == "epochs" and result.steps == 40 * 3


@pytest.fixture(scope="module")
def trained(ft_engine, tmp_path_factory):
    """One short fine-tune whose folder several tests read (they do not change it)."""
    images, labels = dataset()
    out = tmp_path_factory.mktemp("trained") / "model"
    result = finetune(ft_engine, images, labels, out, config=FinetuneConfig(epochs=12, **FAST))
    return out, result, images, labels


def test_saved_model_reloads_and_reproduces_its_validation(trained, ft_engine):
    out, result, images, labels = trained
    engine = load_model(out, device="cpu", dtype="fp32", backend="torch")
    assert engine.fingerprint != ft_engine.fingerprint  # the decoder changed
    assert engine.model_id == ft_engine.model_id  # the encoder did not: embeddings are reused
    # the held-out objects, measured again through the reloaded model's own predict
    objects, items = [], []
    held_out = [int(name.split()[1]) for name in result.held_out]
    assert len(held_out) == 2
    for k in held_out:
        emb = engine.embed(images[k])
        found, _ = fd.find_objects(labels[k], len(items), engine.spec, engine.low_res_size, 16)
        objects += found
        items.append(ft._Item(emb, labels[k].shape, f"image {k}", k))
    again = ft.validation_dice(engine, items, objects)
    assert again["mean"] == pytest.approx(result.dice_after, abs=1e-6)
    assert again["box"] == pytest.approx(result.dice_by_prompt["box"][1], abs=1e-6)
    # and the base model still gives the "before" numbers
    base = ft.validation_dice(ft_engine, [ft._Item(ft_engine.embed(images[k]), labels[k].shape, "", k)
                                          for k in held_out], objects)
    assert base["mean"] == pytest.approx(result.dice_before, abs=1e-6)


def test_model_folder_has_card_record_and_processor(trained):
    out, result, _, _ = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "napari_sam.json", "README.md",
            ".finetune"} <= names
    assert not [n for n in names if ".tmp" in n or ".old" in n]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert f"{result.dice_before:.3f}" in card and f"{result.dice_after:.3f}" in card
    assert f"{result.steps} steps" in card
    record = json.loads((out / "napari_sam.json").read_text())
    assert record["input"]["kind"] == "sam" and record["input"]["target_length"] == 256
    assert record["finetune"]["dice_after"] == pytest.approx(result.dice_after)
    assert len(record["finetune"]["history"]) == result.epochs + 1
    from transformers import SamProcessor

    processor = SamProcessor.from_pretrained(out)  # transformers users open it too
    assert processor.image_processor.size["longest_edge"] == 256


def test_medsam_convention_survives_the_folder_name(ft_dir, tmp_path):
    """A fine-tune of a MedSAM model keeps MedSAM's input convention though its folder name
    no longer says 'medsam'."""
    engine = load_model(ft_dir, device="cpu", dtype="fp32", backend="torch", preprocessing="medsam")
    images, labels = dataset(4)
    finetune(engine, images, labels, tmp_path / "mine", config=FinetuneConfig(epochs=1, **FAST))
    again = load_model(tmp_path / "mine", device="cpu", dtype="fp32", backend="torch")
    assert again.spec == engine.spec and again.spec.kind == "medsam"
    assert again.model_id == engine.model_id


# --- checkpoints, cancel, resume ---------------------------------------------------------


def test_cancel_then_resume_ends_where_an_uninterrupted_run_does(ft_engine, tmp_path):
    images, labels = dataset(8)
    cfg = FinetuneConfig(epochs=4, checkpoint_every=1000, **FAST)
    whole = finetune(ft_engine, images, labels, tmp_path / "whole", config=cfg)
    steps = []

    part = finetune(ft_engine, images, labels, tmp_path / "part", config=cfg,
                    on_progress=lambda p: steps.append(p.done) if p.phase == "train" else None,
                    cancelled=lambda: len(steps) >= 5)
    assert part.stopped == "cancelled" and part.steps == 5
    assert not (tmp_path / "part" / "model.safetensors").exists()  # only the checkpoint
    resumed = finetune(ft_engine, images, labels, tmp_path / "part", config=cfg, resume=True)
    assert resumed.steps == whole.steps and resumed.history == whole.history
    a = load_model(tmp_path / "whole", device="cpu", dtype="fp32", backend="torch").model.state_dict()
    b = load_model(tmp_path / "part", device="cpu", dtype="fp32", backend="torch").model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    _same_last_state(tmp_path / "whole", tmp_path / "part")


def _same_last_state(one, other):
    """The runs' last weights and optimizer state, bit for bit (the saved model is the best
    epoch's, which may come before the point where two runs could part)."""
    a = torch.load(one / ".finetune" / "tensors.pt", weights_only=True)
    b = torch.load(other / ".finetune" / "tensors.pt", weights_only=True)
    for key in a["parts"]:
        torch.testing.assert_close(a["parts"][key], b["parts"][key], rtol=0, atol=0)
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, b["optimizer"]["state"][k][name], rtol=0, atol=0)


def test_cancel_while_embedding_writes_nothing(ft_engine, tmp_path):
    images, labels = dataset(4)
    result = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1),
                      cancelled=lambda: True)
    assert result.stopped == "cancelled" and result.steps == 0
    assert not (tmp_path / "m").exists()


def test_closing_the_generator_keeps_a_checkpoint(ft_engine, tmp_path):
    images, labels = dataset(6)
    steps = finetune_steps(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=3, **FAST))
    for p in steps:
        if p.phase == "train" and p.done == 2:
            break
    steps.close()  # what a worker's Cancel does
    state = json.loads((tmp_path / "m" / ".finetune" / "state.json").read_text())
    assert state["loop"]["step"] == 2
    more = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=3, **FAST), resume=True)
    assert more.steps == 3 * 2 and more.stopped == "epochs"


def test_resume_refuses_other_data_settings_and_damage(ft_engine, tmp_path):
    images, labels = dataset(6)
    cfg = FinetuneConfig(epochs=1, **FAST)
    finetune(ft_engine, images, labels, tmp_path / "m", config=cfg)
    other = [lab.copy() for lab in labels]
    other[0][other[0] == 1] = 0
    with pytest.raises(CheckpointError, match="other images or labels"):
        finetune(ft_engine, images, other, tmp_path / "m", config=cfg, resume=True)
    with pytest.raises(CheckpointError, match="batch_size 8 -> 4"):
        finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, batch_size=4, **FAST),
                 resume=True)
    # more epochs is a change resume allows
    longer = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=2, **FAST),
                      resume=True)
    assert longer.epochs == 2
    tensors = tmp_path / "m" / ".finetune" / "tensors.pt"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=3, **FAST), resume=True)


def test_output_folders_are_never_clobbered(ft_engine, tmp_path):
    images, labels = dataset(4)
    cfg = FinetuneConfig(epochs=1, **FAST)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not a napari-sam fine-tune folder"):
        finetune(ft_engine, images, labels, mine, config=cfg)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    finetune(ft_engine, images, labels, tmp_path / "m", config=cfg)
    with pytest.raises(ValueError, match="already holds a fine-tune"):
        finetune(ft_engine, images, labels, tmp_path / "m", config=cfg)
    with pytest.raises(CheckpointError, match="no fine-tune checkpoint"):
        finetune(ft_engine, images, labels, tmp_path / "new", config=cfg, resume=True)
    again = finetune(ft_engine, images, labels, tmp_path / "m", config=cfg, overwrite=True)
    assert again.steps == 1 and len(again.history) == 2  # started again: before + one epoch


# --- data ----------------------------------------------------------------------------------


def test_volume_uses_labelled_slices_through_the_cache(ft_engine, tmp_path):
    images, labels = dataset(6)
    volume, vlabels = np.stack(images), np.stack(labels)
    vlabels[1] = 0  # an unlabelled slice is not embedded
    cache = EmbeddingCache(tmp_path / "cache")
    calls = {"n": 0}
    original = ft_engine.encoder.encode_steps

    def counting(pixels):
        calls["n"] += len(pixels)
        return (yield from original(pixels))

    ft_engine.encoder.encode_steps = counting
    try:
        result = finetune(ft_engine, volume, vlabels, tmp_path / "m", cache=cache,
                          config=FinetuneConfig(epochs=1, **FAST))
        assert calls["n"] == 5 and result.train_objects + result.val_objects == 10
        shutil.rmtree(tmp_path / "m")
        finetune(ft_engine, volume, vlabels, tmp_path / "m", cache=cache, config=FinetuneConfig(epochs=1, **FAST))
        assert calls["n"] == 5  # second run: every embedding from the cache
    finally:
        del ft_engine.encoder.encode_steps
    record = json.loads((tmp_path / "m" / "napari_sam.json").read_text())["finetune"]
    assert record["images"] == 1 and record["slices"] == 5


@pytest.mark.parametrize("bad, error, match", [
    (lambda im, lab: (im, lab[:2]), ValueError, "2 labels"),
    (lambda im, lab: (im, [lab[0][:50]] + lab[1:]), ValueError, "pixel for pixel"),
    (lambda im, lab: (im, [lab[0].astype(float)] + lab[1:]), TypeError, "integer or bool"),
    (lambda im, lab: (im, [np.zeros_like(x) for x in lab]), ValueError, "no objects"),
    (lambda im, lab: ([im[0]], [(lab[0] == 1).astype(np.uint8)]), ValueError, "second labelled object"),
    (lambda im, lab: (im, [np.pad(np.eye(3, dtype=np.uint8), ((10, 83), (10, 83))) for _ in lab]),
     ValueError, "min_area"),
])
def test_bad_input_is_named(ft_engine, tmp_path, bad, error, match):
    images, labels = bad(*dataset(4))
    with pytest.raises(error, match=match):
        finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1))
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", -1), ("learning_rate", 0.0),
                                          ("val_fraction", 1.0), ("loss", "mse"), ("max_steps", 0),
                                          ("box_jitter", 2.0)])
def test_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**{field: value}).checked()


def test_exported_encoder_engine_fine_tunes_and_saves_the_original_encoder(ft_dir, ft_engine, tmp_path):
    """With OpenVINO the engine's torch encoder is freed (auto on CPU): the saved model takes
    the float32 encoder from the checkpoint it came from, checked by fingerprint."""
    pytest.importorskip("openvino")
    engine = load_model(ft_dir, device="cpu", dtype="fp32", backend="openvino")
    assert engine.model_id == ft_engine.model_id
    images, labels = dataset(4)
    finetune(engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, **FAST))
    saved = load_model(tmp_path / "m", device="cpu", dtype="fp32", backend="torch")
    base = ft_engine.model.state_dict()
    for key, value in saved.model.state_dict().items():
        if key.startswith("vision_encoder."):
            torch.testing.assert_close(value, base[key], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dice+bce", "dice+focal"])
def test_loss_rewards_the_object_and_ignores_the_padding(kind):
    target = torch.zeros(1, 8, 8)
    target[0, 2:5, 2:5] = 1.0
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[0, :, :6] = True  # columns 6-7 are the model frame's padding
    right = (target * 40 - 20)[:, None]  # confident and correct
    wrong = -right
    padded = right.clone()
    padded[..., 6:] = 20.0  # wrong only in the padding
    iou = torch.ones(1, 1)
    seg_right, err_right = ft._losses(right, iou, target, valid, kind)
    seg_wrong, _ = ft._losses(wrong, iou, target, valid, kind)
    seg_pad, _ = ft._losses(padded, iou, target, valid, kind)
    assert float(seg_right) < 1e-3 < 0.5 < float(seg_wrong)
    assert float(seg_pad) == pytest.approx(float(seg_right), abs=1e-6)
    assert float(err_right) == pytest.approx(0.0)  # the IoU head predicted the true IoU (1)
    _, err = ft._losses(right, torch.zeros(1, 1), target, valid, kind)
    assert float(err) == pytest.approx(1.0)


def test_a_bf16_engine_trains_from_the_float32_decoder(ft_dir, ft_engine, tmp_path):
    """A bf16 engine's decoder weights are rounded: training starts from the float32 ones on
    disk, so a run begun in bf16 resumes in fp32 (the same starting decoder)."""
    engine = load_model(ft_dir, device="cpu", dtype="bf16", backend="torch")
    parts, _ = ft.decoder_parts(engine)
    base = ft_engine.model.state_dict()
    for key, value in parts.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    images, labels = dataset(4)
    finetune(engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, **FAST))
    more = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=2, **FAST), resume=True)
    assert more.epochs == 2


# --- what a tester found: nothing lost, errors early and named ------------------------------


def test_overwrite_keeps_the_old_run_when_the_new_data_is_refused(ft_engine, tmp_path):
    images, labels = dataset(4)
    finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, **FAST))
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    for bad in ([np.zeros_like(x) for x in labels], [x.astype(float) for x in labels]):
        with pytest.raises((ValueError, TypeError)):
            finetune(ft_engine, images, bad, tmp_path / "m", config=FinetuneConfig(epochs=1), overwrite=True)
    with pytest.raises(TypeError, match="windw"):
        finetune(ft_engine, images, labels, tmp_path / "m", overwrite=True, windw=(1, 2))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    stopped = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, seed=3, **FAST),
                       overwrite=True, cancelled=lambda: True)  # a cancel while embedding
    assert stopped.stopped == "cancelled" and sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    from napari_sam._finetune_train import TrainingDiverged

    with pytest.raises(TrainingDiverged):  # diverges at once: the earlier run is kept whole
        finetune(ft_engine, images, labels, tmp_path / "m", overwrite=True,
                 config=FinetuneConfig(epochs=3, learning_rate=1e30, val_fraction=0, batch_size=1))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    (tmp_path / "m" / "my_notes.txt").write_text("mine")
    again = finetune(ft_engine, images, labels, tmp_path / "m", config=FinetuneConfig(epochs=1, seed=3, **FAST),
                     overwrite=True)
    assert again.steps == 1 and (tmp_path / "m" / "my_notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "m" / "napari_sam.json").read_text())["finetune"]["settings"]["seed"] == 3


def test_divergence_is_an_error_and_keeps_nothing_of_a_fresh_run(ft_engine, tmp_path):
    from napari_sam._finetune_train import TrainingDiverged

    images, labels = dataset(4)
    with pytest.raises(TrainingDiverged, match="lower the learning rate.*Nothing was kept"):
        finetune(ft_engine, images, labels, tmp_path / "m",
                 config=FinetuneConfig(epochs=50, learning_rate=1e30, val_fraction=0, checkpoint_every=1))
    assert not (tmp_path / "m").exists()  # its checkpoints held runaway weights
    # a resumed run that diverges keeps its checkpoint (finite: never written after a NaN)
    cfg = dict(epochs=50, learning_rate=1e30, val_fraction=0, checkpoint_every=1)
    first = finetune(ft_engine, images, labels, tmp_path / "r", config=FinetuneConfig(max_steps=1, **cfg))
    assert first.steps == 1
    with pytest.raises(TrainingDiverged, match="--overwrite"):
        finetune(ft_engine, images, labels, tmp_path / "r", resume=True, config=FinetuneConfig(max_steps=10, **cfg))
    state = torch.load(tmp_path / "r" / ".finetune" / "tensors.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["parts"].values())


def test_resume_and_overwrite_exclude_each_other(ft_engine, tmp_path):
    images, labels = dataset(2)
    with pytest.raises(ValueError, match="exclude each other"):
        finetune(ft_engine, images, labels, tmp_path / "m", resume=True, overwrite=True)


def test_resume_names_a_changed_contrast_and_checks_before_embedding(ft_engine, tmp_path):
    from napari_sam.api import check_finetune

    images, labels = dataset(4)
    cfg = FinetuneConfig(epochs=1, **FAST)
    finetune(ft_engine, images, labels, tmp_path / "m", config=cfg, window=(100, 200))
    with pytest.raises(CheckpointError, match="SAM contrast"):
        check_finetune(images, labels, tmp_path / "m", config=cfg, resume=True, window=(50, 100))
    calls = {"n": 0}
    original = ft_engine.encoder.encode_steps

    def counting(pixels):
        calls["n"] += 1
        return (yield from original(pixels))

    ft_engine.encoder.encode_steps = counting
    try:
        with pytest.raises(CheckpointError, match="SAM contrast"):
            finetune(ft_engine, images, labels, tmp_path / "m", config=cfg, resume=True, window=(50, 100))
    finally:
        del ft_engine.encoder.encode_steps
    assert calls["n"] == 0  # refused before anything was embedded
    assert check_finetune(images, labels, tmp_path / "m", config=cfg, resume=True, window=(100, 200)) == {
        "slices": 4, "objects": 8, "small": 0, "unlabelled": [], "resume_step": 1, "resume_epoch": 1}


def test_notes_names_and_card(ft_engine, tmp_path):
    images, labels = dataset(5)
    labels[2] = np.zeros_like(labels[2])
    names = [f"cell_{k}.tif" for k in range(5)]
    # a learning rate too small to change anything: the base decoder is kept, and said so
    result = finetune(ft_engine, images, labels, tmp_path / "m", names=names,
                      config=FinetuneConfig(epochs=2, learning_rate=1e-12))
    assert result.best_epoch == 0
    assert any("cell_2.tif" in n and "without labels" in n for n in result.notes)
    assert any("base model's, unchanged" in n for n in result.notes)
    assert result.held_out and all(h.startswith("cell_") for h in result.held_out)
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"Held out: {', '.join(result.held_out)}." in card and "unchanged" in card


def test_config_type_and_seed_are_checked(ft_engine, tmp_path):
    images, labels = dataset(2)
    with pytest.raises(TypeError, match="FinetuneConfig"):
        finetune(ft_engine, images, labels, tmp_path / "m", config={"epochs": 1})
    with pytest.raises(ValueError, match="seed"):
        FinetuneConfig(seed=-5).checked()


def test_resume_is_exact_with_the_persistent_cache(ft_engine, tmp_path):
    """The default (CLI, widget): the first run embeds afresh, the resumed one reads the
    cache's float16 entries; training sees the same values either way."""
    images, labels = dataset(8)
    cfg = FinetuneConfig(epochs=3, checkpoint_every=1000, **FAST)
    whole = finetune(ft_engine, images, labels, tmp_path / "whole", config=cfg,
                     cache=EmbeddingCache(tmp_path / "cache_a"))
    steps = []
    finetune(ft_engine, images, labels, tmp_path / "part", config=cfg, cache=EmbeddingCache(tmp_path / "cache_b"),
             on_progress=lambda p: steps.append(p.done) if p.phase == "train" else None,
             cancelled=lambda: len(steps) >= 4)
    resumed = finetune(ft_engine, images, labels, tmp_path / "part", config=cfg, resume=True,
                       cache=EmbeddingCache(tmp_path / "cache_b"))
    assert resumed.history == whole.history
    a = load_model(tmp_path / "whole", device="cpu", dtype="fp32", backend="torch").model.state_dict()
    b = load_model(tmp_path / "part", device="cpu", dtype="fp32", backend="torch").model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # bit for bit
    _same_last_state(tmp_path / "whole", tmp_path / "part")
