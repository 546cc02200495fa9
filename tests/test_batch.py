"""`napari-sam batch`: a prompts CSV to labels TIFFs, locally and on a Dask cluster."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sam import api
from napari_sam.batch import parse_prompt_row, read_jobs, run_batch
from napari_sam.cluster import ModelSettings

from test_cli import run_cli

PROMPTS = """image,points,point_labels,boxes,slice,propagate
imgs/a.png,"[[35, 50]]",,,,
imgs/a.png,,,"[[0, 0, 15, 15]]",,
imgs/b.tif,"[[35, 50], [5, 5]]","[1, 0]","[[20, 30, 50, 70]]",,
imgs/vol.tif,,,"[[20, 20, 40, 44]]",2,true
imgs/missing.png,"[[1, 1]]",,,,
imgs/c.tif,"[[1, 2, 3]]",,,,
other/a.png,,,"[20, 30, 50, 70]",,
"""


@pytest.fixture
def prompts(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "other").mkdir()
    img = np.zeros((80, 100), np.uint8)
    img[20:50, 30:70] = 200
    Image.fromarray(img).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(img[::-1].copy()).save(tmp_path / "other" / "a.png")
    tifffile.imwrite(tmp_path / "imgs" / "b.tif", img)
    tifffile.imwrite(tmp_path / "imgs" / "c.tif", img)
    vol = np.zeros((6, 64, 64), np.uint16)
    for z in range(1, 5):
        vol[z, 20:40, 20 + z:40 + z] = 3000
    tifffile.imwrite(tmp_path / "imgs" / "vol.tif", vol)
    path = tmp_path / "prompts.csv"
    path.write_text(PROMPTS)
    return path


def summary(outdir):
    with open(outdir / "summary.csv", newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def test_parse_rows():
    row = parse_prompt_row({"points": "[[1, 2], [3, 4]]", "point_labels": "[1, 0]", "boxes": "[0, 0, 5, 5]",
                            "slice": "3", "propagate": "TRUE"}, 2)
    assert row.points == [[1, 2], [3, 4]] and row.point_labels == [1, 0] and row.boxes == [[0, 0, 5, 5]]
    assert row.slice == 3 and row.propagate is True
    for values, message in [({}, "give points or boxes"), ({"points": "[[1, 2]]", "point_labels": "[1, 1]"}, "one 1 or 0"),
                            ({"point_labels": "[1]", "boxes": "[[0, 0, 1, 1]]"}, "without points"),
                            ({"points": "[[1, 2]]", "slice": "-1"}, "slice must be"),
                            ({"points": "[[1, 2]]", "propagate": "maybe"}, "propagate must be"),
                            ({"points": "[[1, NaN]]"}, "points must be"), ({"boxes": "oops("}, "not a list")]:
        with pytest.raises(ValueError, match=f"line 9: .*{message}"):
            parse_prompt_row(values, 9)


def test_outputs_are_named_by_stem_and_told_apart(prompts, tmp_path):
    jobs = read_jobs(prompts, tmp_path / "out")
    names = {j.name: j.output.rsplit("/", 1)[-1] for j in jobs}
    assert names["imgs/b.tif"] == "b_labels.tif" and names["imgs/vol.tif"] == "vol_labels.tif"
    assert names["imgs/a.png"] == "imgs_a_labels.tif" and names["other/a.png"] == "other_a_labels.tif"
    assert len(jobs[0].rows) == 2  # both rows of imgs/a.png


def test_batch_local(prompts, tmp_path, tiny_engine, tiny_sam_dir):
    out = tmp_path / "out"
    results = run_batch(prompts, out, ModelSettings(model=str(tiny_sam_dir), cache=""), progress=False)
    assert [r.status for r in results] == ["ok", "ok", "ok", "failed", "failed", "ok"]
    rows = summary(out)
    assert set(rows) == {"imgs/a.png", "imgs/b.tif", "imgs/vol.tif", "imgs/missing.png", "imgs/c.tif", "other/a.png"}
    assert rows["imgs/missing.png"]["message"].startswith("image not found")
    assert "line 7: points" in rows["imgs/c.tif"]["message"]
    assert rows["imgs/a.png"]["objects"] == "2" and float(rows["imgs/a.png"]["seconds"]) >= 0

    # one row = the API's segment_2d on that image; a second row adds ids, never paints over the first
    img = api.read_image(tmp_path / "imgs" / "b.tif")
    expected, _ = api.segment_2d(tiny_engine, img, points=[[35, 50], [5, 5]], point_labels=[1, 0],
                                 boxes=[[20, 30, 50, 70]])
    assert np.array_equal(tifffile.imread(out / "b_labels.tif"), expected)
    a = tifffile.imread(out / "imgs_a_labels.tif")
    first, _ = api.segment_2d(tiny_engine, api.read_image(tmp_path / "imgs" / "a.png"), points=[[35, 50]])
    assert np.array_equal(a == 1, first == 1)
    assert set(np.unique(a)) <= {0, 1, 2}
    vol = tifffile.imread(out / "vol_labels.tif")
    assert vol.shape == (6, 64, 64) and vol[2].any()

    # a rerun skips finished outputs; --overwrite redoes them
    again = run_batch(prompts, out, ModelSettings(model=str(tiny_sam_dir), cache=""), progress=False)
    assert [r.status for r in again] == ["skipped", "skipped", "skipped", "failed", "failed", "skipped"]


def test_cli_batch_as_launched(prompts, tmp_path, tiny_sam_dir):
    res = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--model", str(tiny_sam_dir), "--no-cache")
    assert res.returncode == 1, res.stderr  # two images failed
    assert "4 images labelled, 2 failed, 0 skipped" in res.stdout
    assert "failed: imgs/missing.png: image not found" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,points\nx.png,[[1, 2]]\n")
    res = run_cli("batch", str(bad), "-o", str(tmp_path / "out2"))
    assert res.returncode == 2 and "expected 'image'" in res.stderr and "Traceback" not in res.stderr


def _engines_loaded() -> int:
    from napari_sam import cluster

    return len(cluster._ENGINES)


def test_a_folder_with_the_same_prompt_for_every_image(prompts, tmp_path, tiny_sam_dir, tiny_engine):
    folder = tmp_path / "imgs"
    res = run_cli("batch", str(folder), "-o", str(tmp_path / "out"), "--box", "20,30,50,70", "--point", "35,50",
                  "--model", str(tiny_sam_dir), "--no-cache")
    assert res.returncode == 1, res.stderr  # the stack has no --slice
    rows = summary(tmp_path / "out")
    assert {k: v["status"] for k, v in rows.items()} == {"a.png": "ok", "b.tif": "ok", "c.tif": "ok", "vol.tif": "failed"}
    assert "--slice" in rows["vol.tif"]["message"]
    expected, _ = api.segment_2d(tiny_engine, api.read_image(folder / "b.tif"), points=[[35, 50]], boxes=[[20, 30, 50, 70]])
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "b_labels.tif"), expected)
    stacks = run_cli("batch", str(folder), "-o", str(tmp_path / "out"), "--box", "20,20,40,44", "--slice", "2",
                     "--propagate", "--model", str(tiny_sam_dir), "--no-cache")
    assert stacks.returncode == 0 and "1 images labelled, 0 failed, 3 skipped" in stacks.stdout, stacks.stderr
    assert tifffile.imread(tmp_path / "out" / "vol_labels.tif").shape == (6, 64, 64)
    for wrong, message in ((["--box", "1,2,3,4"], "go with a FOLDER"),):
        res = run_cli("batch", str(prompts), "-o", str(tmp_path / "o3"), *wrong)
        assert res.returncode == 2 and message in res.stderr
    res = run_cli("batch", str(folder), "-o", str(tmp_path / "o4"))
    assert res.returncode == 2 and "give the prompts for every image" in res.stderr


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    environ = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        # LocalCluster sets OMP_NUM_THREADS=1 (and more) in *this* process's environment
        # for its workers; later subprocesses of the test run must not inherit it
        os.environ.clear()
        os.environ.update(environ)
        yield c


def test_batch_and_embed_on_a_cluster_equal_the_local_run(cluster, prompts, tmp_path, tiny_sam_dir):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_cli("batch", str(prompts), "-o", str(local), "--model", str(tiny_sam_dir), "--no-cache").returncode == 1
    res = run_cli("batch", str(prompts), "-o", str(remote), "--model", str(tiny_sam_dir), "--no-cache",
                  "--scheduler", cluster.scheduler_address)
    assert res.returncode == 1, res.stderr
    for name in ("imgs_a_labels.tif", "other_a_labels.tif", "b_labels.tif", "vol_labels.tif"):
        assert np.array_equal(tifffile.imread(local / name), tifffile.imread(remote / name)), name
    assert {k: v["status"] for k, v in summary(local).items()} == {k: v["status"] for k, v in summary(remote).items()}
    # each worker process loaded the model once and kept it for the images that followed
    from distributed import Client

    with Client(cluster.scheduler_address) as client:
        loaded = client.run(_engines_loaded)
    assert sum(loaded.values()) >= 1 and set(loaded.values()) <= {0, 1}, loaded

    # embed: the workers fill the shared cache with the entries a local run writes
    vol = tmp_path / "imgs" / "vol.tif"
    for where, extra in (("local-cache", []), ("cluster-cache", ["--scheduler", cluster.scheduler_address])):
        res = run_cli("embed", str(vol), "--model", str(tiny_sam_dir), "--cache", str(tmp_path / where), *extra)
        assert res.returncode == 0, res.stderr
    def entries(root):
        return sorted(p.name for p in (tmp_path / root).rglob("*.zarr"))
    assert entries("local-cache") == entries("cluster-cache") and len(entries("local-cache")) == 5  # 2 blank slices


def test_unreachable_scheduler_is_one_line(prompts, tmp_path, tiny_sam_dir):
    res = run_cli("batch", str(prompts), "-o", str(tmp_path / "o"), "--model", str(tiny_sam_dir), "--no-cache",
                  "--scheduler", "tcp://127.0.0.1:1")
    assert res.returncode == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_names_never_collide_and_one_file_is_one_job(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("a.tif", "a.png", "x/a.tif", "x_a.tif"):
        (tmp_path / name).write_bytes(b"")
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('image,boxes\na.tif,"[0,0,1,1]"\na.png,"[0,0,1,1]"\n./a.tif,"[0,0,2,2]"\n'
                        'x/a.tif,"[0,0,1,1]"\nx_a.tif,"[0,0,1,1]"\na.tif,[0,0,1,1]\n')
    jobs = read_jobs(csv_path, tmp_path / "out")
    assert [len(j.rows) for j in jobs] == [2, 1, 1, 1]  # a.tif and ./a.tif: one image
    assert "more values than the header" in jobs[0].problem  # the unquoted list on the last line
    outputs = [j.output for j in jobs]
    assert len(set(outputs)) == len(outputs), outputs


def test_hostile_csv_rows_fail_their_image_not_the_run(tmp_path, tiny_sam_dir):
    img = np.zeros((50, 40, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "g.tif", img[..., 0])
    (tmp_path / "p.csv").write_text(
        "image,points,boxes,slice\n"
        "rgb.png,,\"[[1, 1, 10, 10]]\",0\n"                      # a slice on a colour image
        f"g.tif,\"{'[' * 50_000}\",,\n"                          # nested past the recursion limit
        f"g.tif,\"{json.dumps([[1, 1]] * 40_000)}\",,\n"         # longer than csv's default field limit
        "g.tif,\"[[1, 1]]\",,,extra\n")
    res = run_cli("batch", str(tmp_path / "p.csv"), "-o", str(tmp_path / "out"), "--model", str(tiny_sam_dir),
                  "--no-cache")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    rows = summary(tmp_path / "out")
    assert "a slice is for stacks" in rows["rgb.png"]["message"]
    assert rows["g.tif"]["message"].startswith("line 3: points")


def test_unwritable_output_is_refused_before_the_model_loads(prompts, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = run_cli("batch", str(prompts), "-o", str(blocker / "sub"), "--model", str(tmp_path / "no-model"))
    assert res.returncode == 2 and "cannot write into the output folder" in res.stderr, res.stderr


def test_workers_get_the_model_this_machine_resolves(tmp_path, monkeypatch):
    import argparse

    from napari_sam._cli_batch import settings

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAPARI_SAM_MODEL", "m")
    args = argparse.Namespace(model=None, device="auto", dtype="auto", backend="auto", cache=None, no_cache=True,
                              scheduler=None)
    assert settings(args).model == str((tmp_path / "m").resolve())
