"""Choosing the switcher threshold (paper A.4), or the one that meets an offload budget.

Bucket method: score the training split with the switcher, sort by predicted
agreement (least first), cut into `buckets` equal buckets, compute the combined F1
when the first k buckets are deferred for k = 0…buckets, and take the peak (the
smallest deferral among equal peaks: the cheapest). The threshold is the agreement
score between the last deferred and the first kept input, so the edge worker's rule
`score < threshold → offload` defers exactly those buckets.

Budget mode (RouteLLM's calibration): the score quantile at which the target share
of inputs is deferred, with the F1 to expect there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dmd_offline.metrics import Outcomes, bucket_counts, deferral_curve, dmd_order, first_m


@dataclass(frozen=True)
class ThresholdChoice:
    method: Literal["bucket", "budget"]
    threshold: float  # agreement score below which a frame is offloaded
    deferred_share: float  # share of the training split deferred at this threshold
    f1: float  # combined F1 on the training split there
    curve_shares: list[float] = field(default_factory=list)
    curve_f1: list[float] = field(default_factory=list)
    target_share: float | None = None


def threshold_deferring(sorted_scores: np.ndarray, m: int) -> float:
    """An agreement threshold with exactly the m lowest scores below it (up to ties)."""
    if m <= 0:
        return 0.0
    if m >= len(sorted_scores):
        return 1.0
    return float((sorted_scores[m - 1] + sorted_scores[m]) / 2)


def bucket_threshold(agreement_scores: np.ndarray, outcomes: Outcomes, buckets: int) -> ThresholdChoice:
    order = dmd_order(agreement_scores)
    shares, f1s = deferral_curve(outcomes, order, buckets)
    peak = int(np.argmax(f1s))  # argmax returns the first peak: the smallest deferral
    m = bucket_counts(len(order), buckets)[peak]
    return ThresholdChoice(
        method="bucket",
        threshold=threshold_deferring(agreement_scores[order], m),
        deferred_share=shares[peak],
        f1=f1s[peak],
        curve_shares=shares,
        curve_f1=f1s,
    )


def share_threshold(agreement_scores: np.ndarray, share: float) -> tuple[float, int]:
    """The agreement threshold deferring `share` of these scores (the lowest first), and how many it defers."""
    m = round(share * len(agreement_scores))
    return threshold_deferring(agreement_scores[dmd_order(agreement_scores)], m), m


def budget_threshold(agreement_scores: np.ndarray, outcomes: Outcomes, target_share: float) -> ThresholdChoice:
    order = dmd_order(agreement_scores)
    n = len(order)
    threshold, m = share_threshold(agreement_scores, target_share)
    return ThresholdChoice(
        method="budget",
        threshold=threshold,
        deferred_share=m / n if n else 0.0,
        f1=outcomes.scores(first_m(order, m)).f1,
        target_share=target_share,
    )
