"""Prompt grouping and commit planning (no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import annotate


def test_points_only_form_one_object():
    prompts = annotate.group_prompts(np.array([[1, 2], [3, 4]]), np.array([1, 0]))
    assert len(prompts) == 1 and prompts[0].box is None
    np.testing.assert_array_equal(prompts[0].point_labels, [1, 0])
    assert annotate.group_prompts(None, None, None) == []


def test_points_join_containing_or_nearest_box():
    boxes = [[0, 0, 10, 10], [20, 20, 40, 40], [22, 22, 30, 30]]
    pts = np.array([[5, 5], [25, 25], [35, 35], [15, 45]])
    prompts = annotate.group_prompts(pts, np.array([1, 1, 0, 1]), boxes)
    assert len(prompts) == 3
    np.testing.assert_array_equal(prompts[0].points, [[5, 5]])
    np.testing.assert_array_equal(prompts[1].points, [[35, 35], [15, 45]])  # nearest: box 1
    np.testing.assert_array_equal(prompts[2].points, [[25, 25]])  # smallest containing box
    np.testing.assert_array_equal(prompts[1].point_labels, [0, 1])


def test_plan_commit_keeps_other_labels_unless_overwrite():
    current = np.zeros((4, 4), np.uint16)
    current[0, :] = 7
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    plan = annotate.plan_commit(current, [mask], [3])
    assert plan.kept == 2 and plan.ids == [3]
    result = current.copy()
    result[plan.indices] = plan.values
    assert (result[0, :] == 7).all() and (result[1, :2] == 3).all()
    plan = annotate.plan_commit(current, [mask], [3], overwrite=True)
    result = current.copy()
    result[plan.indices] = plan.values
    assert (result[:2, :2] == 3).all() and plan.kept == 0
    assert (current[0] == 7).all()  # the input is never modified


def test_plan_commit_replace_refines_one_label():
    current = np.zeros((5, 5), np.uint8)
    current[:3, :3] = 2
    current[4, 4] = 9
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    mask[4, 4] = True
    plan = annotate.plan_commit(current, [mask], [2], replace=2)
    result = current.copy()
    result[plan.indices] = plan.values
    assert result[0, 0] == 0 and result[3, 3] == 2 and result[4, 4] == 9


def test_plan_commit_first_object_keeps_shared_pixels_and_validates():
    current = np.zeros((3, 3), np.uint8)
    a = np.ones((3, 3), bool)
    b = np.zeros((3, 3), bool)
    b[1, 1] = True
    plan = annotate.plan_commit(current, [a, b], [1, 2])
    assert set(plan.values.tolist()) == {1}
    with pytest.raises(ValueError, match="label id"):
        annotate.plan_commit(current, [a], [0])
    with pytest.raises(ValueError, match="masks but"):
        annotate.plan_commit(current, [a], [1, 2])
    with pytest.raises(ValueError, match="does not match"):
        annotate.plan_commit(current, [np.ones((2, 2), bool)], [1])


def test_next_label_id_and_box_of_mask():
    assert annotate.next_label_id(np.zeros((2, 2), int)) == 1
    assert annotate.next_label_id(np.array([[0, 4], [2, 0]])) == 5
    m = np.zeros((6, 6), bool)
    m[2:4, 1:5] = True
    np.testing.assert_array_equal(annotate.box_of_mask(m), [2, 1, 3, 4])
    assert annotate.box_of_mask(np.zeros((3, 3), bool)) is None
