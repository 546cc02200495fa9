"""The ``napari-sam`` command line, run as a user would (in a subprocess) and in-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import napari_sam
from napari_sam import api
from napari_sam.cli import main


def run_cli(*args, env_extra=None):
    exe = shutil.which("napari-sam")
    cmd = [exe] if exe else [sys.executable, "-m", "napari_sam.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NAPARI_SAM_MODEL", None)  # the user's own choice must not leak in
    env.update(env_extra or {})
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def image_file(tmp_path, blob_image):
    path = tmp_path / "blobs.tif"
    tifffile.imwrite(path, blob_image.astype(np.uint16) * 50)
    return path


def test_console_script_segment_points(tiny_sam_dir, image_file, tmp_path, tiny_engine):
    out = tmp_path / "labels.tif"
    res = run_cli("segment", str(image_file), "--point", "60,70", "--point", "10,10,0",
                  "--model", str(tiny_sam_dir), "--device", "cpu", "-o", str(out))
    assert res.returncode == 0, res.stderr
    labels = tifffile.imread(out)
    image = tifffile.imread(image_file)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    # the file holds exactly what the Python API gives for these prompts
    expected = tiny_engine.predict(tiny_engine.embed(image), points=[[60, 70], [10, 10]], point_labels=[1, 0])
    np.testing.assert_array_equal(labels == 1, expected.masks[0])
    assert set(np.unique(labels)) <= {0, 1} and labels.any()
    assert "label 1:" in res.stdout and "predicted IoU" in res.stdout


def test_segment_boxes_make_one_label_each(tiny_sam_dir, image_file, tmp_path):
    out = tmp_path / "boxes.tif"
    code = main(["segment", str(image_file), "--box", "30,30,90,110", "--box", "100,140,145,200",
                 "--multimask", "--model", str(tiny_sam_dir), "--device", "cpu", "-o", str(out)])
    assert code == 0
    labels = tifffile.imread(out)
    assert labels.shape == (180, 240)
    assert set(np.unique(labels)) <= {0, 1, 2} and {1, 2} <= set(np.unique(labels))


def test_segment_refuses_to_overwrite(tiny_sam_dir, image_file, tmp_path, capsys):
    out = tmp_path / "exists.tif"
    out.write_bytes(b"precious")
    code = main(["segment", str(image_file), "--point", "60,70", "--model", str(tiny_sam_dir), "-o", str(out)])
    assert code == 2 and out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["segment", str(image_file), "--point", "60,70", "--model", str(tiny_sam_dir),
                 "-o", str(out), "--overwrite"]) == 0
    assert tifffile.imread(out).shape == (180, 240)


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "missing.tif", "--point", "1,2", "-o", "o.tif"], "image file not found"),
        (["segment", "{img}", "-o", "o.tif"], "at least one --point or --box"),
        (["segment", "{img}", "--point", "999,5", "--model", "{model}", "-o", "o.tif"], "outside the image"),
        (["segment", "{img}", "--box", "50,50,10,10", "--model", "{model}", "-o", "o.tif"], "min > max"),
        (["segment", "{img}", "--point", "5,5", "--preset", "liver", "--model", "{model}", "-o", "o.tif"], "preset"),
        (["segment", "{img}", "--point", "1,2", "--model", "/no/such/sam.pth", "-o", "o.tif"], "neither an existing"),
        (["segment", "{img}", "--point", "1,2", "--model", "no-org/no-model", "-o", "o.tif"], "no-org/no-model"),
        (["segment", "{stack}", "--point", "1,2", "--model", "{model}", "-o", "o.tif"], "stack of shape"),
        (["segment", "{img}", "--point", "1,2,7", "-o", "o.tif"], "LABEL must be 1"),
        (["segment", "{img}", "--box", "1,2,3", "-o", "o.tif"], "needs 4 numbers"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(args, message, image_file, tiny_sam_dir, tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((30, 40, 40), np.uint8))
    args = [a.format(img=image_file, model=tiny_sam_dir, stack=stack) for a in args]
    args = [str(tmp_path / a) if a == "o.tif" else a for a in args]
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    error_lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], res.stderr


def test_info_reports_versions_device_and_model(tiny_sam_dir):
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    assert f"napari-sam-labeler {napari_sam.__version__}" in res.stdout
    assert "torch " in res.stdout and "device: cpu, backend: " in res.stdout
    from napari_sam.api import resolve_runtime

    _, backend, precision = resolve_runtime()
    assert f"backend: {backend}, dtype: {precision} (from --device auto" in res.stdout
    assert "facebook/sam-vit-large (from default)" in res.stdout
    assert "NOT AVAILABLE" in res.stdout and "huggingface-cli download" in res.stdout
    triton = next(line for line in res.stdout.splitlines() if line.startswith("triton: "))
    assert "not needed" in triton  # installed or not, and the rule for napari when installed
    res = run_cli("info", env_extra={"NAPARI_SAM_MODEL": str(tiny_sam_dir)})
    assert f"{tiny_sam_dir} (from $NAPARI_SAM_MODEL)" in res.stdout
    assert "available: save_pretrained folder" in res.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "segment" in capsys.readouterr().out


def test_segment_2d_api_overlap_goes_to_higher_score(tiny_engine, blob_image):
    labels, objects = api.segment_2d(tiny_engine, blob_image, boxes=[[30, 30, 90, 110], [20, 20, 100, 120]])
    assert [o.label for o in objects] == [1, 2]
    winner, loser = sorted(objects, key=lambda o: o.score, reverse=True)
    np.testing.assert_array_equal(labels == winner.label, winner.mask)
    np.testing.assert_array_equal(labels == loser.label, loser.mask & ~winner.mask)


def test_points_join_the_box_that_contains_them(tiny_engine, blob_image):
    labels, objects = api.segment_2d(
        tiny_engine, blob_image, points=[[60, 70], [120, 170]], point_labels=[1, 0],
        boxes=[[30, 30, 90, 110], [100, 140, 145, 200]],
    )
    emb = tiny_engine.embed(blob_image)
    first = tiny_engine.predict(emb, points=[[60, 70]], point_labels=[1], box=(30, 30, 90, 110))
    second = tiny_engine.predict(emb, points=[[120, 170]], point_labels=[0], box=(100, 140, 145, 200))
    np.testing.assert_array_equal(objects[0].mask, first.masks[0])
    np.testing.assert_array_equal(objects[1].mask, second.masks[0])


@pytest.fixture
def volume_file(tmp_path, blob_image):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([blob_image] * 5).astype(np.uint16) * 40, photometric="minisblack")
    return path


def test_embed_fills_cache_and_resumes(tiny_sam_dir, volume_file, tmp_path):
    cache = tmp_path / "cache"
    res = run_cli("embed", str(volume_file), "--model", str(tiny_sam_dir), "--cache", str(cache), "--slices", "1:3")
    assert res.returncode == 0, res.stderr
    # the slices are identical, so they share one key: the second is a cache hit
    assert "2 slices" in res.stdout and "1 were already cached" in res.stdout
    assert "embedding" in res.stderr and "2/2" in res.stderr  # the progress bar
    res = run_cli("embed", str(volume_file), "--model", str(tiny_sam_dir), "--cache", str(cache), "--batch-size", "2")
    assert res.returncode == 0, res.stderr
    assert "5 slices" in res.stdout and "5 were already cached" in res.stdout
    info = run_cli("cache", "info", "--cache", str(cache))
    assert info.returncode == 0 and "entries: 1" in info.stdout
    clear = run_cli("cache", "clear", "--cache", str(cache))
    assert "removed 1" in clear.stdout
    assert "entries: 0" in run_cli("cache", "info", "--cache", str(cache)).stdout


def test_embed_distinct_slices_compressed_tiff(tiny_sam_dir, tmp_path, blob_image):
    path = tmp_path / "zstack.tif"
    vol = np.stack([np.roll(blob_image, 5 * z, axis=0) for z in range(4)])
    tifffile.imwrite(path, vol, compression="zlib", photometric="minisblack")  # not memory-mappable
    cache = tmp_path / "c"
    res = run_cli("embed", str(path), "--model", str(tiny_sam_dir), "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    assert "entries: 4" in run_cli("cache", "info", "--cache", str(cache)).stdout


def test_segment_volume_with_propagation(tiny_sam_dir, volume_file, tmp_path, tiny_engine):
    from napari_sam.volume import Stack

    out = tmp_path / "labels3d.tif"
    res = run_cli("segment", str(volume_file), "--slice", "2", "--box", "30,30,90,110", "--propagate",
                  "--min-iou", "-10", "--model", str(tiny_sam_dir), "--cache", str(tmp_path / "c"), "-o", str(out))
    assert res.returncode == 0, res.stderr
    labels = tifffile.imread(out)
    volume = tifffile.imread(volume_file)
    assert labels.shape == volume.shape
    stack = Stack(volume)
    expected = tiny_engine.predict(stack.embedding(2, tiny_engine), box=(30, 30, 90, 110))
    np.testing.assert_array_equal(labels[2] == 1, expected.masks[0])
    # identical slices: the object travels through the whole stack
    assert labels.any(axis=(1, 2)).all()
    assert "slices 0-4" in res.stdout
    # without --propagate only the chosen slice is labelled
    out2 = tmp_path / "one.tif"
    assert main(["segment", str(volume_file), "--slice", "2", "--box", "30,30,90,110",
                 "--model", str(tiny_sam_dir), "--no-cache", "-o", str(out2)]) == 0
    one = tifffile.imread(out2)
    assert one.shape == volume.shape and one[2].any() and not one[[0, 1, 3, 4]].any()


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "{vol}", "--point", "5,5", "-o", "o.tif"], "pass --slice Z"),
        (["segment", "{img}", "--point", "5,5", "--propagate", "-o", "o.tif"], "need a 3D stack"),
        (["embed", "{vol}", "--slices", "a:b"], "START:STOP"),
        (["embed", "{vol}", "--batch-size", "0"], "--batch-size"),
        (["embed", "{vol}", "--batch-size", "many"], "--batch-size"),
        (["embed", "{vol}", "--compile", "--backend", "onnxruntime"], "--compile compiles the torch encoder"),
        (["embed", "{vol}", "--no-cache"], "cannot run with --no-cache"),
        (["embed", "missing.tif"], "volume not found"),
    ],
)
def test_volume_user_errors(args, message, volume_file, image_file, tmp_path, tiny_sam_dir):
    args = [a.format(vol=volume_file, img=image_file) for a in args]
    args = [str(tmp_path / a) if a == "o.tif" else a for a in args]
    res = run_cli(*args, "--model", str(tiny_sam_dir)) if args[0] != "cache" else run_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "loading model" not in res.stderr  # refused before minutes of loading


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_port_out_of_range_is_a_usage_error(port):
    res = run_cli("serve", "--port", port)
    assert res.returncode == 2 and "1 to 65535" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "{vol}", "--slice", "{n}", "--point", "5,5", "-o", "o.tif"], "--slice {n} is outside the stack"),
        (["segment", "{vol}", "--slice", "-1", "--point", "5,5", "-o", "o.tif"], "--slice -1 is outside the stack"),
        (["segment", "{vol}", "--slice", "0", "--axis", "3", "--point", "5,5", "-o", "o.tif"], "axis=3 is out of range"),
        (["segment", "{rgb}", "--channel", "5", "--point", "5,5", "-o", "o.tif"], "channel=5 is out of range"),
        (["embed", "{vol}", "--slices", "100:120"], "selects no slice"),
    ],
)
def test_index_errors_exit_2_before_the_model_loads(args, message, volume_file, tmp_path):
    """Issue 20.6: a 5-slice stack with --slice 5 gave an IndexError traceback after loading the
    model. Checked first: the model named here does not even exist, and the index error wins."""
    n = tifffile.imread(volume_file).shape[0]
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((20, 30, 3), np.uint8))
    args = [a.format(vol=volume_file, rgb=rgb, n=n) for a in args]
    args = [str(tmp_path / a) if a == "o.tif" else a for a in args]
    res = run_cli(*args, "--model", str(tmp_path / "no-such-model"))
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message.format(n=n) in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_extreme_aspect_ratio_segments(tiny_sam_dir, tmp_path):
    """Issue 20.7: a 2 x 5000 strip failed with "height and width must be > 0"."""
    strip = np.zeros((2, 5000), np.uint8)
    strip[:, 2000:2600] = 200
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, strip)
    out = tmp_path / "strip_labels.tif"
    res = run_cli("segment", str(path), "--box", "0,1900,1,2700", "--model", str(tiny_sam_dir), "--device", "cpu",
                  "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert tifffile.imread(out).shape == (2, 5000)


def test_big_endian_stack_is_cached_once(tiny_sam_dir, tmp_path, blob_image):
    """Issue 20.3: `embed` read the big-endian stack memory-mapped (>u2), `segment` as <u2, and
    the cache stored the slices twice. Equal pixels, equal keys."""
    path = tmp_path / "big_endian.tif"
    stack = np.stack([np.roll(blob_image, 9 * z, axis=1) for z in range(4)]).astype(np.uint16) * 40
    tifffile.imwrite(path, stack.astype(">u2"), byteorder=">", photometric="minisblack")
    cache = tmp_path / "cache"
    common = ["--model", str(tiny_sam_dir), "--device", "cpu", "--cache", str(cache)]
    assert run_cli("embed", str(path), *common).returncode == 0

    def entries():
        return len([p for p in cache.glob("??/*.zarr")])

    assert entries() == 4
    res = run_cli("segment", str(path), "--slice", "1", "--point", "60,70", "--propagate",
                  "-o", str(tmp_path / "l.tif"), *common)
    assert res.returncode == 0, res.stderr
    assert entries() == 4  # was 5
    res = run_cli("embed", str(path), *common)
    assert "(4 were already cached)" in res.stdout, res.stdout


def test_planar_rgb_tiff_is_one_image_everywhere(tiny_sam_dir, tmp_path, blob_image, make_napari_viewer):
    """Issue 20.1: RGB stored as separate planes (axes SYX) was taken for a 3-slice stack."""
    rgb = np.stack([blob_image, blob_image // 2, 255 - blob_image], axis=-1)[:90, :120]
    planar, interleaved = tmp_path / "planar.tif", tmp_path / "interleaved.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(interleaved, rgb, photometric="rgb")
    with tifffile.TiffFile(planar) as tif:
        assert tif.series[0].axes == "SYX"
    outs = []
    for path in (planar, interleaved):
        out = tmp_path / f"{path.stem}_labels.tif"
        # fp32: bf16 rounding would amplify the last-bit differences noted below (reading is tested here)
        res = run_cli("segment", str(path), "--point", "60,70", "--model", str(tiny_sam_dir), "--device", "cpu",
                      "--dtype", "fp32", "-o", str(out))
        assert res.returncode == 0, res.stderr
        outs.append(tifffile.imread(out))
    assert outs[0].shape == (90, 120)
    # two processes: CPU float sums may differ in the last bit, flipping a boundary pixel
    assert (outs[0] != outs[1]).mean() < 1e-3 and outs[0].any()
    ome = tmp_path / "planar.ome.tif"
    tifffile.imwrite(ome, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate", ome=True)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(ome), plugin="napari-sam-labeler")
    assert layer.rgb and layer.data.shape == (90, 120, 3)


def test_pyramidal_ome_tiff_uses_level_0(tiny_sam_dir, tmp_path, blob_image, make_napari_viewer):
    """Issue 20.2: a tiled, zlib, 2-level OME-TIFF failed with ArrayNotFoundError."""
    data = np.stack([blob_image[:, :180], blob_image[:, 60:240]])
    data = np.pad(data, ((0, 0), (0, 76), (0, 76))).astype(np.uint16)  # 2 x 256 x 256
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(data, subifds=1, tile=(128, 128), compression="zlib",
                  metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0})
        tif.write(data[:, ::2, ::2], subfiletype=1, tile=(128, 128), compression="zlib")
    res = run_cli("embed", str(path), "--model", str(tiny_sam_dir), "--device", "cpu",
                  "--cache", str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "2 slices" in res.stdout
    np.testing.assert_array_equal(np.asarray(api.open_volume(path)), data)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-sam-labeler")
    assert layer.data.shape == (2, 256, 256)
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))


def test_segment_with_a_cache_that_cannot_be_written(tiny_sam_dir, image_file, tmp_path):
    """Issue 20.5 as a shell user meets it: the cache folder cannot be written (here a path
    under /proc, which even root cannot create); one warning line, the labels are written."""
    out = tmp_path / "labels.tif"
    res = run_cli("segment", str(image_file), "--point", "60,70", "--model", str(tiny_sam_dir), "--device", "cpu",
                  "--cache", "/proc/napari-sam-no-cache-here", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert tifffile.imread(out).shape == tifffile.imread(image_file).shape
    warnings_ = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings_) == 1 and "cannot be written" in warnings_[0] and "Traceback" not in res.stderr
