"""The autosave store on its own: keys by content, slices in place, damage skipped."""

from __future__ import annotations

import numpy as np

from napari_sam.api import Autosave, image_key


def test_keys_follow_content_not_layout():
    image = np.arange(60, dtype=np.uint16).reshape(6, 10)
    assert image_key(image) == image_key(image.astype(">u2"))  # byte order
    assert image_key(image) == image_key(np.asfortranarray(image))  # memory layout
    changed = image.copy()
    changed[3, 3] += 1
    assert image_key(image) != image_key(changed)
    volume = np.zeros((20, 4, 4), np.int16)
    other = volume.copy()
    other[10] = 1  # a sampled slice differs
    assert image_key(volume) != image_key(other)


def test_slices_round_trip_and_damage_is_skipped(tmp_path):
    store = Autosave(tmp_path)
    labels = np.zeros((5, 6, 7), np.uint32)
    labels[1, 2:4, 2:5] = 3
    labels[3, 0, 0] = 70000
    store.record("k", "s1", labels, [1, 3], image_name="img", labels_name="lab")
    info = store.available("k")
    assert info["slices"] == 2 and info["labels"] == "lab" and store.saved_slices("k", "s1") == [1, 3]
    np.testing.assert_array_equal(store.restore("k", "s1"), labels)
    (tmp_path / "k" / "s1" / "z000003.npz").write_bytes(b"not a zip")  # damaged: skipped, not trusted
    restored = store.restore("k", "s1")
    np.testing.assert_array_equal(restored[1], labels[1])
    assert not restored[3].any()
    assert not list(tmp_path.glob("k/s1/*.tmp*"))  # nothing half-written left behind
    store.discard("k", "s1")
    assert store.available("k") is None and store.restore("k", "s1") is None


def test_sessions_never_overwrite_each_other(tmp_path):
    store = Autosave(tmp_path)
    first = np.zeros((6, 6), np.uint8)
    first[1, 1] = 2
    second = np.zeros((6, 6), np.uint8)
    second[4, 4] = 1
    store.record("img", "a", first, None)
    store.record("img", "b", second, None)
    assert [m["session"] for m in store.sessions("img")] == ["b", "a"]
    assert store.available("img", exclude={"b"})["session"] == "a"
    np.testing.assert_array_equal(store.restore("img", "a"), first)


def test_2d(tmp_path):
    store = Autosave(tmp_path)
    labels = np.zeros((8, 9), np.uint8)
    labels[2:5, 3:6] = 1
    store.record("two", "s", labels, None)
    np.testing.assert_array_equal(store.restore("two", "s"), labels)
