"""PNG curves of an evaluation: F1 vs % deferred on train and test (paper Figs. 2–3),
time and energy vs % deferred (Figs. 4–5)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dmd_offline.evaluate import Curve, Evaluation

STYLES = {"DMD": "o-", "uncertainty": "s--", "random": "^:", "oracle": "d-."}


def f1_plot(curves: dict[str, Curve], title: str, path: Path, reference: str) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axes.plot([100 * s for s in curve.shares], curve.values, STYLES.get(name, "-"), label=name)
    axes.set(
        xlabel="% deferred to the large model", ylabel=f"combined F1 (vs {reference})", title=title, ylim=(0, 1.02)
    )
    return save(figure, axes, path)


def cost_plot(curve: Curve, large_only: float | None, ylabel: str, title: str, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([100 * s for s in curve.shares], curve.values, "o-", label="DMD (small + switcher + large on deferred)")
    if large_only is not None:
        axes.axhline(large_only, color="grey", linestyle="--", label="large-only")
    axes.set(xlabel="% deferred to the large model", ylabel=ylabel, title=title)
    return save(figure, axes, path)


def save(figure: Figure, axes: Axes, path: Path) -> Path:
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plots(evaluation: Evaluation, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        f1_plot(
            evaluation.curves_train,
            "F1 vs % deferred (train split)",
            directory / "f1_vs_deferred_train.png",
            evaluation.reference,
        ),
        f1_plot(
            evaluation.curves_test,
            "F1 vs % deferred (test split)",
            directory / "f1_vs_deferred_test.png",
            evaluation.reference,
        ),
    ]
    large_only = evaluation.result("large-only")
    if evaluation.time_curve_s is not None:
        paths.append(
            cost_plot(
                evaluation.time_curve_s,
                large_only.time_s,
                "total time (s)",
                "Time vs % deferred (test split)",
                directory / "time_vs_deferred.png",
            )
        )
    if evaluation.energy_curve_j is not None:
        paths.append(
            cost_plot(
                evaluation.energy_curve_j,
                large_only.energy_j,
                "total energy (J)",
                "Energy vs % deferred (test split)",
                directory / "energy_vs_deferred.png",
            )
        )
    return paths
