"""The event evaluation as a console table, Markdown, JSON and PNG curves (like `fallwatch dmd evaluate`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers

import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from core.settings import Settings
from dmd_offline.event_eval import EventEvaluation, PolicyResult
from dmd_offline.event_replay import CLOUD_ONLY, DEFERRAL_FAMILIES, EDGE_ONLY
from dmd_offline.scoring import Interval

COLUMNS = [
    "policy",
    "cloud share",
    "falls alerted after onset",
    "false alarms",
    "false alarms per clip",
    "per hour",
    "time to alert median / max",
    "frame F1",
    "edge s",
    "cloud s",
]
STYLES = {"DMD": "o-", "uncertainty": "s--", "random": "^:"}
MARKERS = {EDGE_ONLY: "kx", CLOUD_ONLY: "k*"}


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def with_interval(result: Interval, scale: float = 100.0, digits: int = 0, unit: str = " %") -> str:
    if result.value is None:
        return "n/a"
    text = f"{scale * result.value:.{digits}f}{unit}"
    if result.low is None or result.high is None:
        return text
    return f"{text} [{scale * result.low:.{digits}f}–{scale * result.high:.{digits}f}]"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def row(result: PolicyResult) -> list[str]:
    s = result.scores
    false_alarms = f"{s.false_alarms - s.early_alarms}/{s.no_fall_clips} + {s.early_alarms} early"
    return [
        result.policy.name,
        percent(s.cloud_share),
        f"{s.detected}/{s.fall_clips} = " + with_interval(s.detection) + f" ({s.detected_on_earlier_evidence})",
        false_alarms,
        with_interval(s.false_alarms_per_clip),
        with_interval(s.false_alarms_per_hour, scale=1.0, unit=""),
        f"{seconds(s.time_to_alert_median_s)} / {seconds(s.time_to_alert_max_s)}",
        with_interval(s.frame_f1, digits=1, unit=""),
        f"{s.edge_s:.1f}",
        f"{s.cloud_s:.1f}",
    ]


def print_table(evaluation: EventEvaluation, console: Console) -> None:
    table = Table(title=f"fallwatch eval: {evaluation.folder}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "policy" else "right")
    for result in evaluation.results:
        table.add_row(*row(result))
    console.print(table)


def setup_lines(evaluation: EventEvaluation, settings: Settings) -> list[str]:
    ev, edge, rule = settings.eval, settings.edge, evaluation.rule
    falls = sum(clip.is_fall for clip in evaluation.clips)
    frames = sum(outputs.frames for outputs in evaluation.outputs)
    heartbeats = sum(int(outputs.heartbeat.sum()) for outputs in evaluation.outputs)
    hours = evaluation.results[0].scores.no_fall_hours if evaluation.results else 0.0
    budget = (
        "none"
        if edge.max_offload_ratio is None and edge.max_offload_fps is None
        else f"ratio {edge.max_offload_ratio}, fps {edge.max_offload_fps} per {edge.offload_window_s:g} s"
    )
    return [
        f"- Clips: {len(evaluation.clips)} in `{evaluation.folder}` ({falls} falls, {len(evaluation.clips) - falls} "
        f"without); {frames} frames published at {ev.fps:g} fps with the motion gate "
        f"({'on' if ev.motion.enabled else 'off'}, heartbeat {ev.motion.heartbeat_s:g} s; {heartbeats} heartbeats); "
        f"{hours * 60:.1f} min of video without a fall (no-fall clips and the time before each fall).",
        f"- Models: edge `{edge.model}`, cloud `{settings.cloud.model}` (clip of {edge.clip_frames} frames within "
        f"{edge.clip_seconds:g} s); switcher {evaluation.switcher.version}, threshold "
        f"{evaluation.switcher_threshold:.4f}.",
        f"- Routing: edge verdicts reach alerting {ev.edge_latency_s:g} s after capture, cloud verdicts "
        f"{ev.cloud_latency_s:g} s after the edge's (cloud deadline {edge.cloud_deadline_s:g} s); offload budget "
        f"{budget} (not applied to edge-only and cloud-only).",
        "- Alert rule (alerting's own code, defaults; `alerting.rooms` overrides per room): "
        + ", ".join(f"{name} {value}" for name, value in rule.model_dump().items())
        + ".",
        f"- Intervals: {ev.confidence:.0%} bootstrap over clips ({ev.bootstrap} resamples, seed {ev.seed}).",
        f"- Models: {evaluation.cache.edge_computed} frames (edge) and {evaluation.cache.cloud_computed} clips "
        f"(cloud) computed, {evaluation.cache.edge_cached} and {evaluation.cache.cloud_cached} from the cache in "
        f"`{ev.cache_dir}`; {evaluation.cache.seconds:.1f} s; policies and scores {evaluation.scoring_s:.1f} s.",
    ]


def markdown_report(evaluation: EventEvaluation, settings: Settings, plots: list[Path]) -> str:
    lines = [
        "# Event evaluation",
        "",
        *setup_lines(evaluation, settings),
        "",
        "## Events per policy",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
        *("| " + " | ".join(row(result)) + " |" for result in evaluation.results),
        "",
        "A fall is alerted after onset when the clip's first alert opened after the annotated fall start; an alert "
        "that opened before it (or at that very instant) is a false alarm (*early*), and the fall counts as missed; "
        "in brackets after the interval, the detected falls whose alert's first evidence frame came before the fall "
        "(a model that saw a fall in what came before it). False alarms "
        "are clips: no-fall clips with an alert, plus early ones; per hour of video without a fall. Time to alert: "
        "fall start → alerting sends the alert (s). Frame F1: the final verdicts against the annotation (a frame at "
        "or after the fall start is a fall), as the DMD report scores frames. Edge and cloud s: model time.",
        "",
        "## Per clip",
        "",
        *clip_table(evaluation),
    ]
    if plots:
        lines += ["## Curves", "", *[f"![{path.stem}]({path.name})" for path in plots], ""]
    return "\n".join(lines)


def clip_table(evaluation: EventEvaluation) -> list[str]:
    shown = [result for result in evaluation.results if result.policy.target_share is None]
    lines = [
        "| clip | truth | " + " | ".join(result.policy.name for result in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for index, clip in enumerate(evaluation.clips):
        truth = f"fall at {clip.fall_start_s:g} s" if clip.is_fall else "no fall"
        cells = [result.clips[index].describe() for result in shown]
        lines.append(f"| {clip.file} | {truth} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def curves_plot(evaluation: EventEvaluation, path: Path) -> Path:
    figure, (falls_axes, alarms_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for family in DEFERRAL_FAMILIES:
        points = sorted(
            (r.scores.cloud_share, r.scores.detection.value or 0.0, r.scores.false_alarms_per_clip.value or 0.0)
            for r in evaluation.results
            if r.policy.family == family
        )
        shares = [100 * share for share, _, _ in points]
        falls_axes.plot(shares, [100 * p[1] for p in points], STYLES[family], label=family)
        alarms_axes.plot(shares, [100 * p[2] for p in points], STYLES[family], label=family)
    for name, marker in MARKERS.items():
        result = evaluation.result(name)
        share = 100 * result.scores.cloud_share
        falls_axes.plot(share, 100 * (result.scores.detection.value or 0.0), marker, markersize=10, label=name)
        alarms_axes.plot(share, 100 * (result.scores.false_alarms_per_clip.value or 0.0), marker, markersize=10)
    falls_axes.set(xlabel="% of frames to the cloud", ylabel="% of falls alerted after onset", ylim=(-2, 102))
    alarms_axes.set(xlabel="% of frames to the cloud", ylabel="false alarms per clip (%)", ylim=(-2, 102))
    falls_axes.set_title("Falls alerted after onset")
    alarms_axes.set_title("False alarms")
    for axes in (falls_axes, alarms_axes):
        axes.grid(alpha=0.3)
    falls_axes.legend()
    figure.suptitle(str(evaluation.folder))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def json_report(evaluation: EventEvaluation, settings: Settings) -> dict[str, Any]:
    return {
        "folder": str(evaluation.folder),
        "settings": {
            "eval": settings.eval.model_dump(mode="json"),
            "edge": {name: getattr(settings.edge, name) for name in ("model", "clip_frames", "clip_seconds")},
            "cloud": {"model": settings.cloud.model},
            "rule": evaluation.rule.model_dump(),
            "rooms": settings.alerting.rooms,
        },
        "switcher": {"version": evaluation.switcher.version, "threshold": evaluation.switcher_threshold},
        "cache": asdict(evaluation.cache),
        "scoring_s": evaluation.scoring_s,
        "policies": [
            {
                "policy": asdict(result.policy),
                "scores": asdict(result.scores),
                "fallbacks": result.fallbacks,
                "clips": [
                    {"file": clip.file, **asdict(score), "description": score.describe()}
                    for clip, score in zip(evaluation.clips, result.clips, strict=True)
                ],
            }
            for result in evaluation.results
        ],
    }


def write_event_report(evaluation: EventEvaluation, settings: Settings) -> tuple[Path, Path, list[Path]]:
    directory = settings.eval.report_dir
    directory.mkdir(parents=True, exist_ok=True)
    plots = [curves_plot(evaluation, directory / "events_vs_cloud_share.png")]
    md_path, json_path = directory / "report.md", directory / "report.json"
    md_path.write_text(markdown_report(evaluation, settings, plots))
    json_path.write_text(json.dumps(json_report(evaluation, settings), indent=2))
    return md_path, json_path, plots
