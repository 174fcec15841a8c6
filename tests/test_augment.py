"""`dmd.augment`: augmented copies of each train / val image as extra switcher rows; test rows untouched."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dmd_offline.sources import image_folder_items, with_augmented_copies
from tests.test_dmd_pipeline import PER_SPLIT_AND_CLASS, write_synthetic_folder


def test_copies_of_learning_rows_only_seeded_and_keeping_labels_and_groups(tmp_path: Path) -> None:
    write_synthetic_folder(tmp_path)
    originals = {item.input_id: item for item in image_folder_items(tmp_path)}
    items = list(with_augmented_copies(image_folder_items(tmp_path), 2, seed=0))
    per_split = Counter(item.split for item in items)
    rows = 2 * PER_SPLIT_AND_CLASS
    assert per_split == {"train": 3 * rows, "val": 3 * rows, "test": rows}
    assert len({item.input_id for item in items}) == len(items)
    for item in items:
        source = originals[item.input_id.split("#aug")[0]]
        assert (item.ground_truth, item.group, item.split) == (source.ground_truth, source.group, source.split)
        assert item.image_rgb.shape == source.image_rgb.shape
        if "#aug" in item.input_id:
            assert not np.array_equal(item.image_rgb, source.image_rgb)
            assert np.array_equal(item.clip()[0], item.image_rgb)  # the cloud model answers the copy
    again = list(with_augmented_copies(image_folder_items(tmp_path), 2, seed=0))
    assert all(np.array_equal(a.image_rgb, b.image_rgb) for a, b in zip(items, again, strict=True))
    unchanged = [item.input_id for item in with_augmented_copies(image_folder_items(tmp_path), 0, seed=0)]
    assert unchanged == list(originals)
