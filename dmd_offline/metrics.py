"""Fall-class scores and deferral curves: the arithmetic the threshold and the evaluation share.

A *deferral order* ranks inputs by how much they should go to the large model,
first to defer first; deferring the first m inputs of it gives the combined
prediction: the large model's answer for those, the small model's for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmd_offline.dataset import UNKNOWN, DmdData


@dataclass(frozen=True)
class Scores:
    f1: float
    precision: float
    recall: float
    accuracy: float


def classification_scores(truth: np.ndarray, predicted: np.ndarray) -> Scores:
    """Fall-class (positive = 1) F1, precision, recall, and accuracy; 0 where a ratio is 0/0."""
    truth = np.asarray(truth).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    true_positives = int(np.sum(truth & predicted))
    false_positives = int(np.sum(~truth & predicted))
    false_negatives = int(np.sum(truth & ~predicted))
    precision = true_positives / (true_positives + false_positives) if true_positives + false_positives else 0.0
    recall = true_positives / (true_positives + false_negatives) if true_positives + false_negatives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float(np.mean(truth == predicted)) if len(truth) else 0.0
    return Scores(f1=f1, precision=precision, recall=recall, accuracy=accuracy)


@dataclass(frozen=True)
class Outcomes:
    """What the evaluation needs of a data set split, as arrays."""

    small: np.ndarray  # small model's fall predictions (0/1)
    large: np.ndarray  # large model's fall predictions (0/1)
    truth: np.ndarray  # the reference: ground truth, or the large model's answer where none is known
    reference: str  # "ground truth" or "large model"

    @classmethod
    def of(cls, data: DmdData) -> Outcomes:
        small = data.column("small_prediction").astype(int)
        large = data.column("large_prediction").astype(int)
        ground_truth = data.column("ground_truth").astype(int)
        if len(ground_truth) and np.all(ground_truth != UNKNOWN):
            return cls(small, large, ground_truth, "ground truth")
        # Without labels the large model is the best reference there is (the paper's teacher).
        return cls(small, large, large, "large model")

    def combined(self, deferred: np.ndarray) -> np.ndarray:
        """Predictions when the inputs in the boolean mask `deferred` go to the large model."""
        return np.where(deferred, self.large, self.small)

    def scores(self, deferred: np.ndarray) -> Scores:
        return classification_scores(self.truth, self.combined(deferred))


def first_m(order: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask of the first m inputs of a deferral order."""
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:m]] = True
    return mask


def bucket_counts(n: int, buckets: int) -> list[int]:
    """How many inputs are deferred at 0/buckets, 1/buckets, … buckets/buckets of n."""
    return [round(k * n / buckets) for k in range(buckets + 1)]


def deferral_curve(outcomes: Outcomes, order: np.ndarray, buckets: int) -> tuple[list[float], list[float]]:
    """(share deferred, combined F1) at each bucket boundary of the order."""
    n = len(order)
    shares, f1s = [], []
    for m in bucket_counts(n, buckets):
        shares.append(m / n if n else 0.0)
        f1s.append(outcomes.scores(first_m(order, m)).f1)
    return shares, f1s


def dmd_order(agreement_scores: np.ndarray) -> np.ndarray:
    """DMD: least predicted agreement first (the switcher expects the large model to disagree)."""
    return np.argsort(agreement_scores, kind="stable")


def uncertainty_order(small_fall_probability: np.ndarray) -> np.ndarray:
    """Narayan et al. 2022: the small model's least confident answers (|p − 0.5| smallest) first."""
    return np.argsort(np.abs(small_fall_probability - 0.5), kind="stable")


def oracle_order(agreement_labels: np.ndarray) -> np.ndarray:
    """The oracle switcher: knows which inputs the models disagree on and defers those first."""
    return np.argsort(agreement_labels, kind="stable")


def random_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)
