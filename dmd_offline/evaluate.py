"""Evaluating DMD on a held-out split against the baselines (paper Section 3, Table 1, Figs. 2–5).

Strategies: small-only, large-only, DMD at its threshold, and at DMD's offload
share on that split: uncertainty-based deferral (Narayan et al. 2022), random
deferral and the oracle. Each gets fall-class F1 / precision / recall / accuracy,
the share sent to the large model, total time and energy, and for the deferral
strategies an area under the F1-vs-deferred curve normalised so that small-only
scores 0 and large-only 1 (RouteLLM's APGR).

Costs per frame are the measured ones in the data (edge and cloud model times, the
cloud energy logged by GPU workers); where one is missing the configured per-frame
cost (`dmd.*_time_ms`, `dmd.*_energy_j`) is used, and a cost that is neither
measured nor configured is reported as unknown rather than guessed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from core.settings import DmdSettings
from dmd_offline.dataset import DmdData, agreement_scores
from dmd_offline.metrics import (
    Outcomes,
    deferral_curve,
    dmd_order,
    first_m,
    oracle_order,
    random_order,
    uncertainty_order,
)
from dmd_offline.scoring import f1_of, interval
from edge_workers.switcher import Switcher

RANDOM_CURVE_SEEDS = 20  # the random baseline's curve is averaged over this many orders
CONFIDENCE = 0.95


@dataclass(frozen=True)
class CostColumn:
    """Per-frame costs of one kind for a split, and where they came from."""

    values: np.ndarray | None  # None: neither measured nor configured
    origin: str  # "measured", "configured", "measured + configured for N rows", "unknown"


def cost_column(measured: np.ndarray, configured: float | None, setting: str) -> CostColumn:
    missing = np.isnan(measured)
    if not missing.any():
        return CostColumn(measured, "measured")
    if configured is None:
        return CostColumn(
            None, f"unknown: not measured for {int(missing.sum())} of {len(measured)} rows and dmd.{setting} is not set"
        )
    if missing.all():
        return CostColumn(np.full(len(measured), configured), "configured")
    return CostColumn(np.where(missing, configured, measured), f"measured, configured for {int(missing.sum())} rows")


@dataclass(frozen=True)
class Costs:
    small_time_ms: CostColumn
    large_time_ms: CostColumn
    small_energy_j: CostColumn
    large_energy_j: CostColumn
    switcher_time_ms: float  # measured per frame on this split

    def origins(self) -> dict[str, str]:
        """Where each per-frame cost came from (measured, logged or configured)."""
        return {
            "edge time": self.small_time_ms.origin,
            "cloud time": self.large_time_ms.origin,
            "edge energy": self.small_energy_j.origin,
            "cloud energy": self.large_energy_j.origin,
        }

    @classmethod
    def of(cls, data: DmdData, settings: DmdSettings, switcher_time_ms: float) -> Costs:
        return cls(
            small_time_ms=cost_column(
                data.column("small_time_ms").astype(float), settings.small_time_ms, "small_time_ms"
            ),
            large_time_ms=cost_column(
                data.column("large_time_ms").astype(float), settings.large_time_ms, "large_time_ms"
            ),
            small_energy_j=cost_column(
                data.column("small_energy_j").astype(float), settings.small_energy_j, "small_energy_j"
            ),
            large_energy_j=cost_column(
                data.column("large_energy_j").astype(float), settings.large_energy_j, "large_energy_j"
            ),
            switcher_time_ms=switcher_time_ms,
        )

    def total(
        self, small: CostColumn, large: CostColumn, deferred: np.ndarray, uses_small: bool, switcher_ms: float = 0.0
    ) -> float | None:
        """Total over the split: the small model on every frame (unless large-only), the large one on deferred."""
        if large.values is None or (uses_small and small.values is None):
            return None
        total = float(large.values[deferred].sum())
        if uses_small:
            assert small.values is not None
            total += float(small.values.sum()) + switcher_ms * len(deferred)
        return total

    def time_s(self, deferred: np.ndarray, uses_small: bool, uses_switcher: bool) -> float | None:
        switcher_ms = self.switcher_time_ms if uses_switcher else 0.0
        total = self.total(self.small_time_ms, self.large_time_ms, deferred, uses_small, switcher_ms)
        return None if total is None else total / 1000

    def energy_j(self, deferred: np.ndarray, uses_small: bool) -> float | None:
        return self.total(self.small_energy_j, self.large_energy_j, deferred, uses_small)


@dataclass(frozen=True)
class StrategyResult:
    name: str
    f1: float
    precision: float
    recall: float
    accuracy: float
    share_large: float
    time_s: float | None
    energy_j: float | None
    apgr: float | None = None  # normalised area under its F1-vs-deferred curve (deferral strategies)
    f1_low: float | None = None  # bootstrap interval of the F1, resampling whole groups (clips, cameras)
    f1_high: float | None = None


@dataclass(frozen=True)
class Curve:
    shares: list[float]  # % deferred to the large model, as a fraction
    values: list[float]  # F1 at each share, or the total time / energy for a cost curve


@dataclass(frozen=True)
class GroupResult:
    """The strategies' F1 on the test rows of one group (source group of an image, or camera)."""

    group: str
    rows: int
    falls: int
    f1: dict[str, float]  # strategy → F1 on these rows, each deferring what it defers on the whole split
    share_large_dmd: float


@dataclass
class Evaluation:
    reference: str  # what F1 is measured against: "ground truth" or "large model"
    threshold: float
    rows: int
    results: list[StrategyResult]
    curves_train: dict[str, Curve] = field(default_factory=dict)
    curves_test: dict[str, Curve] = field(default_factory=dict)
    time_curve_s: Curve | None = None  # DMD: total time vs share deferred (f1 holds the time)
    energy_curve_j: Curve | None = None
    cost_origins: dict[str, str] = field(default_factory=dict)
    groups: list[GroupResult] = field(default_factory=list)

    def result(self, name: str) -> StrategyResult:
        return next(result for result in self.results if result.name == name)


def strategy_orders(data: DmdData, agreement_scores: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    return {
        "DMD": dmd_order(agreement_scores),
        "uncertainty": uncertainty_order(data.column("small_fall_probability").astype(float)),
        "random": random_order(len(data.rows), seed),
        "oracle": oracle_order(data.column("label").astype(int)),
    }


def curves(data: DmdData, agreement_scores: np.ndarray, buckets: int, seed: int) -> dict[str, Curve]:
    """F1 vs share deferred for every deferral strategy (paper Figs. 2–3)."""
    outcomes = Outcomes.of(data)
    result = {}
    for name, order in strategy_orders(data, agreement_scores, seed).items():
        if name == "random":
            runs = [
                deferral_curve(outcomes, random_order(len(order), seed + i), buckets) for i in range(RANDOM_CURVE_SEEDS)
            ]
            result[name] = Curve(
                runs[0][0], [float(np.mean(column)) for column in zip(*(r[1] for r in runs), strict=True)]
            )
        else:
            result[name] = Curve(*deferral_curve(outcomes, order, buckets))
    return result


def normalised_auc(curve: Curve, small_f1: float, large_f1: float) -> float | None:
    """(area under F1 vs share deferred − small-only F1) / (large-only F1 − small-only F1), APGR-style."""
    if large_f1 == small_f1:
        return None
    area = float(np.trapezoid(curve.values, curve.shares))
    return (area - small_f1) / (large_f1 - small_f1)


def measure_switcher_ms(switcher: Switcher, data: DmdData) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    scores = agreement_scores(switcher, data)
    return scores, (time.perf_counter() - started) * 1000 / max(1, len(data.rows))


def f1_interval(
    outcomes: Outcomes, deferred: np.ndarray, groups: np.ndarray, resamples: int, seed: int
) -> tuple[float | None, float | None]:
    """The F1's 95 % bootstrap interval drawing whole groups: rows of one clip or camera are not independent
    (a row without a group is a group of its own)."""
    if resamples == 0 or not len(groups):
        return None, None
    keys = np.array([group or f"#row{i}" for i, group in enumerate(groups)])
    _, index = np.unique(keys, return_inverse=True)
    truth, predicted = outcomes.truth.astype(bool), outcomes.combined(deferred).astype(bool)
    counts = [
        np.bincount(index, weights=mask.astype(float))
        for mask in (truth & predicted, ~truth & predicted, truth & ~predicted)
    ]
    draws = np.random.default_rng(seed).integers(0, len(counts[0]), size=(resamples, len(counts[0])))
    result = interval(0.0, f1_of(*(count[draws].sum(axis=1) for count in counts)), CONFIDENCE)
    return result.low, result.high


def evaluate(train: DmdData, test: DmdData, switcher: Switcher, threshold: float, settings: DmdSettings) -> Evaluation:
    """Every strategy on `test`; the deferral curves on `train` and `test`."""
    train_scores = agreement_scores(switcher, train)
    test_scores, switcher_ms = measure_switcher_ms(switcher, test)
    outcomes = Outcomes.of(test)
    costs = Costs.of(test, settings, switcher_ms)
    n = len(test.rows)
    dmd_deferred = test_scores < threshold
    m = int(dmd_deferred.sum())
    orders = strategy_orders(test, test_scores, settings.seed)
    deferred = {
        "small-only": np.zeros(n, dtype=bool),
        "large-only": np.ones(n, dtype=bool),
        "uncertainty": first_m(orders["uncertainty"], m),
        "random": first_m(orders["random"], m),
        "DMD": dmd_deferred,
        "oracle": first_m(orders["oracle"], m),
    }
    test_curves = curves(test, test_scores, settings.buckets, settings.seed)
    small_f1 = outcomes.scores(deferred["small-only"]).f1
    large_f1 = outcomes.scores(deferred["large-only"]).f1
    results = []
    groups = test.column("group")
    for name, mask in deferred.items():
        scores = outcomes.scores(mask)
        uses_small = name != "large-only"
        f1_low, f1_high = f1_interval(outcomes, mask, groups, settings.bootstrap, settings.seed)
        results.append(
            StrategyResult(
                name=name,
                f1=scores.f1,
                precision=scores.precision,
                recall=scores.recall,
                accuracy=scores.accuracy,
                share_large=float(mask.mean()) if n else 0.0,
                time_s=costs.time_s(mask, uses_small, uses_switcher=name == "DMD"),
                energy_j=costs.energy_j(mask, uses_small),
                apgr=normalised_auc(test_curves[name], small_f1, large_f1) if name in test_curves else None,
                f1_low=f1_low,
                f1_high=f1_high,
            )
        )
    shares = test_curves["DMD"].shares
    masks = [first_m(orders["DMD"], round(share * n)) for share in shares]
    times = [costs.time_s(mask, uses_small=True, uses_switcher=True) for mask in masks]
    energies = [costs.energy_j(mask, uses_small=True) for mask in masks]
    return Evaluation(
        reference=outcomes.reference,
        threshold=threshold,
        rows=n,
        results=results,
        curves_train=curves(train, train_scores, settings.buckets, settings.seed),
        curves_test=test_curves,
        time_curve_s=None if None in times else Curve(shares, [t for t in times if t is not None]),
        energy_curve_j=None if None in energies else Curve(shares, [e for e in energies if e is not None]),
        cost_origins=costs.origins(),
        groups=group_results(test, groups, deferred),
    )


def group_results(test: DmdData, groups: np.ndarray, deferred: dict[str, np.ndarray]) -> list[GroupResult]:
    """Each source group's (clip's, camera's) F1 per strategy and DMD's cloud share there."""
    by_group = []
    for group in sorted(set(groups) - {""}):
        rows = groups == group
        group_outcomes = Outcomes.of(test.select(rows))
        by_group.append(
            GroupResult(
                group=group,
                rows=int(rows.sum()),
                falls=int(
                    sum(row.ground_truth == 1 for row, selected in zip(test.rows, rows, strict=True) if selected)
                ),
                f1={name: group_outcomes.scores(mask[rows]).f1 for name, mask in deferred.items()},
                share_large_dmd=float(deferred["DMD"][rows].mean()),
            )
        )
    return by_group
