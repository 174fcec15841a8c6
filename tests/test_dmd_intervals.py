"""DMD report intervals: the F1's bootstrap draws whole groups (clips, cameras), not rows."""

from __future__ import annotations

import numpy as np

from dmd_offline.evaluate import f1_interval
from dmd_offline.metrics import Outcomes


def two_cameras() -> tuple[Outcomes, np.ndarray]:
    """Falls everywhere; the edge is right on every row of cam-a and wrong on every row of cam-b."""
    truth = np.ones(100, dtype=int)
    small = np.array([1] * 50 + [0] * 50)
    return Outcomes(small, truth, truth, "ground truth"), np.array(["cam-a"] * 50 + ["cam-b"] * 50)


def test_the_interval_resamples_whole_groups() -> None:
    outcomes, groups = two_cameras()
    edge_only = np.zeros(100, dtype=bool)
    low, high = f1_interval(outcomes, edge_only, groups, 1000, seed=0)
    assert low == 0.0 and high == 1.0  # a draw of cam-b twice misses every fall, cam-a twice none
    row_low, row_high = f1_interval(outcomes, edge_only, np.full(100, ""), 1000, seed=0)  # rows as groups
    assert row_low is not None and row_high is not None and 0.5 < row_low < row_high < 0.8
    assert f1_interval(outcomes, np.ones(100, dtype=bool), groups, 1000, seed=0) == (1.0, 1.0)  # the cloud's
    assert f1_interval(outcomes, edge_only, groups, 0, seed=0) == (None, None)
