"""DMD arithmetic on constructed examples: scores, the bucket threshold, the budget threshold, the evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.settings import DmdSettings
from dmd_offline.dataset import (
    UNKNOWN,
    DatasetManifest,
    DmdData,
    DmdRow,
    assign_missing_splits,
    switcher_splits_from_val,
)
from dmd_offline.evaluate import Curve, evaluate, normalised_auc
from dmd_offline.metrics import Outcomes, classification_scores
from dmd_offline.threshold import bucket_threshold, budget_threshold
from edge_workers.switcher import Switcher

MANIFEST = DatasetManifest(source="constructed", edge_model="edge", cloud_model="cloud", hidden_size=1)


def brute_force_f1(truth: list[int], predicted: list[int]) -> float:
    """F1 of the fall class, counted one input at a time (independent of the library code)."""
    tp = fp = fn = 0
    for t, p in zip(truth, predicted, strict=True):
        if t == 1 and p == 1:
            tp += 1
        elif t == 0 and p == 1:
            fp += 1
        elif t == 1 and p == 0:
            fn += 1
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def combined_by_threshold(scores: list[float], threshold: float, small: list[int], large: list[int]) -> list[int]:
    """What the edge worker does: offload (take the large answer) when score < threshold."""
    return [big if score < threshold else little for score, little, big in zip(scores, small, large, strict=True)]


def test_known_confusion_gives_known_scores() -> None:
    # 3 true positives, 2 false negatives, 1 false positive, 4 true negatives
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    scores = classification_scores(truth, predicted)
    assert scores.precision == pytest.approx(3 / 4)
    assert scores.recall == pytest.approx(3 / 5)
    assert scores.f1 == pytest.approx(2 / 3)  # 2·0.75·0.6 / 1.35
    assert scores.accuracy == pytest.approx(0.7)


def test_no_positive_prediction_gives_zero_f1_not_an_error() -> None:
    scores = classification_scores(np.array([1, 0]), np.array([0, 0]))
    assert (scores.f1, scores.precision, scores.recall, scores.accuracy) == (0.0, 0.0, 0.0, 0.5)


def test_bucket_threshold_defers_exactly_the_disagreements_in_a_hand_made_case() -> None:
    # The small model misses the falls 0, 1, 2 and the large model gets them; the switcher scores
    # them lowest. The large model wrongly calls 7, 8, 9 falls. Deferring 30% is perfect.
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    small = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    large = [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    scores = [0.05, 0.1, 0.15, 0.9, 0.6, 0.7, 0.8, 0.3, 0.4, 0.5]
    outcomes = Outcomes(np.array(small), np.array(large), np.array(truth), "ground truth")
    choice = bucket_threshold(np.array(scores), outcomes, buckets=10)
    assert choice.deferred_share == pytest.approx(0.3)
    assert choice.f1 == pytest.approx(1.0)
    assert 0.15 < choice.threshold < 0.3
    assert combined_by_threshold(scores, choice.threshold, small, large) == truth


@pytest.mark.parametrize("seed", range(5))
def test_bucket_threshold_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, buckets = 40, 10
    truth = rng.integers(0, 2, n).tolist()
    small = [t if rng.random() < 0.6 else 1 - t for t in truth]
    large = [t if rng.random() < 0.85 else 1 - t for t in truth]
    scores = rng.random(n).tolist()
    outcomes = Outcomes(np.array(small), np.array(large), np.array(truth), "ground truth")
    choice = bucket_threshold(np.array(scores), outcomes, buckets)

    # brute force: every threshold that defers a whole number of buckets (n/buckets inputs each)
    ordered = sorted(scores)
    per_bucket = n // buckets
    brute = []
    for k in range(buckets + 1):
        deferred = k * per_bucket
        if deferred == 0:
            threshold = -1.0
        elif deferred == n:
            threshold = 2.0
        else:
            threshold = (ordered[deferred - 1] + ordered[deferred]) / 2
        brute.append(brute_force_f1(truth, combined_by_threshold(scores, threshold, small, large)))
    assert choice.curve_f1 == pytest.approx(brute)
    assert choice.curve_shares == pytest.approx([k / buckets for k in range(buckets + 1)])
    best = max(brute)
    assert choice.f1 == pytest.approx(best)
    assert choice.deferred_share == pytest.approx(brute.index(best) / buckets), "the first (cheapest) peak"
    # the published threshold reproduces the chosen point through the edge worker's rule
    combined = combined_by_threshold(scores, choice.threshold, small, large)
    assert brute_force_f1(truth, combined) == pytest.approx(best)
    assert sum(score < choice.threshold for score in scores) == round(choice.deferred_share * n)


def test_budget_threshold_defers_the_target_share() -> None:
    rng = np.random.default_rng(7)
    n = 50
    truth = rng.integers(0, 2, n)
    outcomes = Outcomes(1 - truth, truth, truth, "ground truth")  # small always wrong, large always right
    scores = rng.random(n)
    choice = budget_threshold(scores, outcomes, target_share=0.3)
    assert int(np.sum(scores < choice.threshold)) == 15
    assert choice.deferred_share == pytest.approx(0.3)
    expected = brute_force_f1(
        truth.tolist(), combined_by_threshold(scores.tolist(), choice.threshold, (1 - truth).tolist(), truth.tolist())
    )
    assert choice.f1 == pytest.approx(expected)
    assert choice.method == "budget" and choice.target_share == 0.3


def test_normalised_auc_is_zero_for_small_only_one_for_large_only_and_half_for_a_straight_line() -> None:
    shares = [0.0, 0.5, 1.0]
    assert normalised_auc(Curve(shares, [0.4, 0.4, 0.4]), 0.4, 0.8) == pytest.approx(0.0)
    assert normalised_auc(Curve(shares, [0.8, 0.8, 0.8]), 0.4, 0.8) == pytest.approx(1.0)
    assert normalised_auc(Curve(shares, [0.4, 0.6, 0.8]), 0.4, 0.8) == pytest.approx(0.5)
    assert normalised_auc(Curve(shares, [0.5, 0.5, 0.5]), 0.5, 0.5) is None


def identity_switcher() -> Switcher:
    """A real switcher whose agreement logit is its 1-d input (for inputs ≥ 0): scores are chosen by hand."""
    switcher = Switcher(input_dim=1)
    first, second, last = (switcher.layers[i] for i in (0, 3, 6))
    with torch.no_grad():
        for layer in (first, second, last):
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[0, 0] = 1.0
    return switcher


def constructed_rows(scores: list[float], truth: list[int], small: list[int], large: list[int], split: str) -> DmdData:
    rows = [
        DmdRow(
            input_id=f"{split}-{i}",
            image_path=f"img{i}.jpg",
            group="g",
            split=split,
            order_key=float(i),
            small_fall_probability=0.5 + 0.05 * (i % 9) * (1 if s else -1),
            large_fall_probability=float(b),
            small_prediction=s,
            large_prediction=b,
            label=int(s == b),
            ground_truth=t,
            large_source="computed",
            offload_reason="",
            small_time_ms=10.0,
            large_time_ms=100.0 + i,
            small_energy_j=float("nan"),
            large_energy_j=float("nan"),
        )
        for i, (t, s, b) in enumerate(zip(truth, small, large, strict=True))
    ]
    hidden = np.array([[math.log(p / (1 - p))] for p in scores], dtype=np.float32)
    return DmdData(MANIFEST, rows, hidden)


def test_evaluation_defers_the_same_share_for_every_baseline_and_costs_add_up() -> None:
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    small = [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    large = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]
    scores = [0.55, 0.6, 0.65, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.92]  # logits ≥ 0, as identity_switcher needs
    test = constructed_rows(scores, truth, small, large, "test")
    train = constructed_rows(scores, truth, small, large, "train")
    settings = DmdSettings(large_energy_j=50.0, small_energy_j=1.0)
    evaluation = evaluate(train, test, identity_switcher(), threshold=0.7, settings=settings)

    assert evaluation.reference == "ground truth"
    dmd = evaluation.result("DMD")
    assert dmd.share_large == pytest.approx(0.3)  # 0.55, 0.6, 0.65 are below 0.7
    assert dmd.f1 == pytest.approx(brute_force_f1(truth, combined_by_threshold(scores, 0.7, small, large)))
    for name in ("uncertainty", "random", "oracle"):
        assert evaluation.result(name).share_large == pytest.approx(0.3), name
    assert evaluation.result("small-only").share_large == 0.0
    assert evaluation.result("large-only").share_large == 1.0
    assert evaluation.result("small-only").f1 == pytest.approx(brute_force_f1(truth, small))
    assert evaluation.result("large-only").f1 == pytest.approx(brute_force_f1(truth, large))
    # the oracle defers the 3 disagreements first (0, 1, 2; 7 and 9 come next): combined = truth on 0–2
    oracle = evaluation.result("oracle")
    assert oracle.f1 >= dmd.f1

    large_time = [100.0 + i for i in range(10)]
    assert evaluation.result("large-only").time_s == pytest.approx(sum(large_time) / 1000)
    assert evaluation.result("small-only").time_s == pytest.approx(10 * 10.0 / 1000)
    assert dmd.time_s is not None and dmd.time_s > (100 + sum(large_time[:3])) / 1000  # + the switcher's time
    assert evaluation.result("large-only").energy_j == pytest.approx(500.0)
    assert dmd.energy_j == pytest.approx(10 * 1.0 + 3 * 50.0)
    assert set(evaluation.curves_test) == set(evaluation.curves_train) == {"DMD", "uncertainty", "random", "oracle"}
    assert evaluation.time_curve_s is not None and len(evaluation.time_curve_s.values) == 11


def test_energy_is_unknown_rather_than_guessed() -> None:
    data = constructed_rows([0.6, 0.9], [1, 0], [0, 0], [1, 0], "test")
    evaluation = evaluate(data, data, identity_switcher(), threshold=0.7, settings=DmdSettings())
    assert all(result.energy_j is None for result in evaluation.results)
    assert evaluation.energy_curve_j is None
    assert "large_energy_j is not set" in evaluation.cost_origins["cloud energy"]


def test_without_ground_truth_the_large_model_is_the_reference() -> None:
    data = constructed_rows([0.6, 0.9], [UNKNOWN, UNKNOWN], [0, 0], [1, 0], "test")
    assert Outcomes.of(data).reference == "large model"
    evaluation = evaluate(data, data, identity_switcher(), threshold=0.7, settings=DmdSettings())
    assert evaluation.result("large-only").f1 == 1.0


def test_inputs_without_a_split_are_split_by_time() -> None:
    data = constructed_rows([0.6] * 10, [0] * 10, [0] * 10, [0] * 10, "")
    shuffled = DmdData(MANIFEST, list(reversed(data.rows)), data.hidden[::-1])
    split = assign_missing_splits(shuffled, val_share=0.2, test_share=0.3)
    by_time = sorted(split.rows, key=lambda row: row.order_key)
    assert [row.split for row in by_time] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3


def test_switcher_learns_from_val_when_the_pair_learnt_from_train() -> None:
    parts = [
        constructed_rows([0.6] * n, [0] * n, [0] * n, [0] * n, split)
        for split, n in (("train", 50), ("val", 200), ("test", 30))
    ]
    data = DmdData(MANIFEST, [row for part in parts for row in part.rows], np.concatenate([p.hidden for p in parts]))
    remapped = switcher_splits_from_val(data, val_share=0.25, seed=3)
    origin = {row.input_id.split("-")[0] for row in remapped.rows}
    assert origin == {"val", "test"}  # the pair's own training rows are gone
    new_val = [row for row in remapped.rows if row.split == "val"]
    new_train = [row for row in remapped.rows if row.split == "train"]
    assert all(row.input_id.startswith("val-") for row in new_val + new_train)
    assert len(new_val) + len(new_train) == 200 and 30 <= len(new_val) <= 70  # about a quarter held out
    assert [row.input_id for row in remapped.split("test").rows] == [row.input_id for row in parts[2].rows]
    assert len(remapped.hidden) == len(remapped.rows) == 230
    again = switcher_splits_from_val(data, val_share=0.25, seed=3)
    assert [row.split for row in again.rows] == [row.split for row in remapped.rows]
