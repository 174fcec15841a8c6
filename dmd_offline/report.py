"""The evaluation as a Markdown report (the paper's Table 1 layout) and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dmd_offline.dataset import DmdData
from dmd_offline.evaluate import Evaluation
from dmd_offline.replay import ReplaySummary
from dmd_offline.threshold import ThresholdChoice
from dmd_offline.train import TrainingReport

TABLE_ORDER = ["small-only", "large-only", "uncertainty", "random", "DMD", "oracle"]


def number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def change(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or baseline == 0:
        return ""
    return f" ({100 * (value - baseline) / baseline:+.1f} %)"


def markdown_report(
    data: DmdData,
    training: TrainingReport,
    choice: ThresholdChoice,
    evaluation: Evaluation,
    plots: list[Path],
    replay: ReplaySummary | None = None,
    switcher_split: str = "train",
) -> str:
    lines = [
        *summary_lines(data, training, choice, evaluation, switcher_split),
        *score_tables(evaluation),
        *curve_table(evaluation),
        *group_table(evaluation),
        "## Bucket curve on the train split (threshold choice)",
        "",
        "| % deferred | " + " | ".join(f"{100 * s:.0f}" for s in choice.curve_shares) + " |",
        "|---|" + "---:|" * len(choice.curve_shares),
        "| F1 | " + " | ".join(f"{f:.3f}" for f in choice.curve_f1) + " |",
        "",
        "## Costs",
        "",
        *[f"- {what}: {origin}" for what, origin in evaluation.cost_origins.items()],
        "",
    ]
    if replay is not None:
        lines += ["## Replay", "", *[f"- {line}" for line in replay.describe().splitlines()], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{path.stem}]({path.name})" for path in plots], ""]
    return "\n".join(lines)


def summary_lines(
    data: DmdData, training: TrainingReport, choice: ThresholdChoice, evaluation: Evaluation, switcher_split: str
) -> list[str]:
    splits = {name: sum(row.split == name for row in data.rows) for name in ("train", "val", "test")}
    share = evaluation.result("DMD").share_large
    return [
        "# DMD evaluation",
        "",
        f"- Data: {len(data.rows)} rows from {data.manifest.source} "
        f"(train {splits['train']}, val {splits['val']}, test {splits['test']}); "
        f"edge model `{data.manifest.edge_model}` (hidden {data.manifest.hidden_size}), "
        f"large model `{data.manifest.cloud_model}`.",
        *(
            [
                "- The switcher learnt from the data set's validation split (`dmd.switcher_split: val`): the model "
                "pair learnt from its train split, which is left out here; train and val below are the switcher's."
            ]
            if switcher_split == "val"
            else []
        ),
        f"- F1 is the fall class's, measured against the **{evaluation.reference}**.",
        f"- Switcher: {training.epochs_run} epochs, best at epoch {training.best_epoch} "
        f"(validation loss {training.best_val_loss:.4f}, accuracy {training.val_accuracy:.3f}); "
        f"agreement share in train {training.agreement_share_train:.1%}, "
        f"positive-class weight {training.positive_class_weight:.3f}; seed {training.seed}.",
        f"- Threshold ({choice.method} method): {choice.threshold:.4f}, deferring {choice.deferred_share:.0%} of the "
        f"train split (train F1 {choice.f1:.3f})"
        + (f", target offload share {choice.target_share:.0%}" if choice.target_share is not None else "")
        + f"; on the test split it defers {share:.1%}, and the baselines defer the same share.",
        "",
    ]


def score_tables(evaluation: Evaluation) -> list[str]:
    """Table 1 (F1 with its interval, share, time and energy) and every score, on the test split."""
    large = evaluation.result("large-only")
    lines = [
        "## Table 1 (test split)",
        "",
        "| Model | F1 Score [95 % CI] | % Large Model | Time (s) | Energy (J) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in TABLE_ORDER:
        result = evaluation.result(name)
        low, high = result.f1_low, result.f1_high
        bounds = "" if low is None or high is None else f" [{100 * low:.1f}–{100 * high:.1f}]"
        lines.append(
            f"| {name} | {100 * result.f1:.1f}{bounds} | {100 * result.share_large:.1f} | "
            f"{number(result.time_s, 3)}{change(result.time_s, large.time_s)} | "
            f"{number(result.energy_j, 2)}{change(result.energy_j, large.energy_j)} |"
        )
    lines += [
        "",
        "Time and energy are totals over the test split; the change is against large-only. F1 intervals: "
        "bootstrap draws of whole groups (source groups, clips or cameras), whose rows are not independent.",
        "",
        "## All scores (test split)",
        "",
        "| Strategy | F1 | Precision | Recall | Accuracy | % large | normalised AUC (APGR) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TABLE_ORDER:
        result = evaluation.result(name)
        lines.append(
            f"| {name} | {result.f1:.3f} | {result.precision:.3f} | {result.recall:.3f} | {result.accuracy:.3f} | "
            f"{100 * result.share_large:.1f} | {number(result.apgr, 3)} |"
        )
    lines += [
        "",
        "Normalised AUC: area under the F1-vs-%-deferred curve, 0 = small-only, 1 = large-only.",
        "",
    ]
    return lines


def curve_table(evaluation: Evaluation) -> list[str]:
    """F1 of each deferral strategy at every bucket of the test split: the whole curve, not one point."""
    curves = evaluation.curves_test
    if not curves:
        return []
    shares = curves["DMD"].shares
    lines = [
        "## F1 vs % deferred (test split)",
        "",
        "| strategy | " + " | ".join(f"{100 * share:.0f} %" for share in shares) + " |",
        "|---|" + "---:|" * len(shares),
    ]
    for name in ("DMD", "uncertainty", "random", "oracle"):
        lines.append(f"| {name} | " + " | ".join(f"{100 * value:.1f}" for value in curves[name].values) + " |")
    return [*lines, ""]


def group_table(evaluation: Evaluation) -> list[str]:
    if not evaluation.groups:
        return []
    lines = [
        "## F1 by group (test split)",
        "",
        "Each strategy defers what it defers on the whole split; % large is DMD's share within the group.",
        "",
        "| group | rows | falls | " + " | ".join(TABLE_ORDER) + " | % large (DMD) |",
        "|---|---:|---:|" + "---:|" * len(TABLE_ORDER) + "---:|",
    ]
    for group in evaluation.groups:
        lines.append(
            f"| {group.group} | {group.rows} | {group.falls} | "
            + " | ".join(f"{100 * group.f1[name]:.1f}" for name in TABLE_ORDER)
            + f" | {100 * group.share_large_dmd:.1f} |"
        )
    return [*lines, ""]


def json_report(
    data: DmdData,
    training: TrainingReport,
    choice: ThresholdChoice,
    evaluation: Evaluation,
    replay: ReplaySummary | None = None,
) -> dict[str, Any]:
    return {
        "data": {"rows": len(data.rows), **data.manifest.model_dump()},
        "training": asdict(training),
        "threshold": asdict(choice),
        "evaluation": asdict(evaluation),
        "replay": None if replay is None else {**asdict(replay), "exploration_share": replay.exploration_share},
    }


def write_report(directory: Path, markdown: str, payload: dict[str, Any]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / "report.md"
    json_path = directory / "report.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(payload, indent=2))
    return md_path, json_path
