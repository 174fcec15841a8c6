"""`fallwatch bench adaptation`: event tables before and after facility adaptation, on labelled clips.

Each clip is a camera (`fallwatch eval`'s sampling, models and alert rule). Folds: leave one clip
out, or two halves (every other clip of each label, by file name) each adapted on and evaluated on
the other. Per fold, the adaptation clips are the facility's logged traffic: every published frame
with the running cloud model's answer (a camera's learning period with every frame explored), and
with `--caregiver` a simulated caregiver answering every alert the running pair raised on them
from the clip's annotation (`alerting.answers.label_for`, the dashboard's own label, on the
alert's evidence frames). `dmd_offline.adapt.Adaptation` makes the candidate; the held-out clips
are then replayed through every policy of the running pair and of the candidate, with every kind
of switcher (`SWITCHER_KINDS`) trained on the candidate's out-of-fold rows beside its own router.
Facts of all folds' held-out clips are pooled into one table per policy, with bootstrap intervals
by clip: before adaptation, after it (every candidate, whatever its gate said), and after the gate
(the candidate pair where its fold's gate passed it, the running pair elsewhere). No label of the
held-out clips chooses anything: the adaptation settings are `dmd.adapt`'s; a router "at its
threshold" defers `dmd.adapt.target_offload_share` of its scores on the gate's slice of the
adaptation clips (`routed_gate`); a row at a fixed share defers that share of the fold's held-out
frames by their scores alone, as a budget does live.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from alerting.answers import label_for
from cloud_workers.loading import load_cloud_model
from core.images import decode_jpeg_rgb
from core.settings import ConfigError, DmdSettings, Settings
from dmd_offline.adapt import Adaptation, AdaptFrame, Candidate, original_images, shrunk, switcher_on
from dmd_offline.clip_outputs import CLIP_START, ClipOutputs, LazyModels, clip_outputs, publish_as_camera
from dmd_offline.clips import LabelledClip, read_labelled_clips
from dmd_offline.dataset import UNKNOWN, DmdData
from dmd_offline.event_eval import clip_facts, published_switcher, served_settings
from dmd_offline.event_replay import CLOUD_ONLY, EDGE_ONLY, Policy, Scores, clip_scores, replay
from dmd_offline.finetune import save_edge
from dmd_offline.scoring import ClipFacts, aggregate
from edge_workers.model import load_edge_model
from edge_workers.routing import served_threshold
from edge_workers.switcher import Switcher, SwitcherInputs

log = logging.getLogger(__name__)

SHARES = (0.1, 0.2, 0.3, 0.5)
SERVED = "DMD at its threshold"  # the pair as it is served: its router at its own threshold
ROW_SHARES = (0.25, 0.5, 1.0)
PAPER_FAMILY = "DMD (paper: hidden only)"


@dataclass(frozen=True)
class SwitcherKind:
    """A switcher trained beside the candidate's own, on the same out-of-fold rows."""

    name: str  # in the AUROC table
    family: str  # in the event tables
    inputs: SwitcherInputs
    target: Literal["agreement", "deferral_helps"] = "agreement"


SWITCHER_KINDS = (
    SwitcherKind("paper", PAPER_FAMILY, "hidden"),
    SwitcherKind("confidence", "DMD (hidden+confidence)", "hidden+confidence"),
    SwitcherKind("history", "DMD (hidden+confidence+history)", "hidden+confidence+history"),
    # only where caregivers answered: without ground truth its rows keep the agreement target
    SwitcherKind("deferral helps", "DMD (hidden+confidence, deferral helps)", "hidden+confidence", "deferral_helps"),
)


def kinds_for(rows: DmdData) -> list[SwitcherKind]:
    labelled = bool((rows.column("ground_truth").astype(int) != UNKNOWN).any())
    return [kind for kind in SWITCHER_KINDS if labelled or kind.target == "agreement"]


def kind_switcher(rows: DmdData, dmd: DmdSettings, kind: SwitcherKind) -> Switcher:
    return switcher_on(rows, dmd.model_copy(update={"switcher_inputs": kind.inputs, "switcher_target": kind.target}))[0]


@dataclass(frozen=True)
class Fold:
    adapt_on: list[LabelledClip]
    held_out: list[LabelledClip]


def folds_for(clips: list[LabelledClip], protocol: str) -> list[Fold]:
    if protocol == "leave-one-out":
        return [Fold([c for c in clips if c is not held], [held]) for held in clips]
    halves: tuple[list[LabelledClip], list[LabelledClip]] = ([], [])
    for label in (True, False):
        for index, clip in enumerate(sorted((c for c in clips if c.is_fall == label), key=lambda c: c.file)):
            halves[index % 2].append(clip)
    return [Fold(halves[0], halves[1]), Fold(halves[1], halves[0])]


def caregiver_labels(outputs: list[ClipOutputs], switcher: Switcher, threshold: float, settings: Settings) -> dict:
    """Frame id → 1 / 0: every alert the running pair raised at its threshold, answered from the annotation."""
    scores = Scores.of(outputs, switcher, settings.eval.seed)
    labels: dict[str, int] = {}
    for run in replay(outputs, scores, Policy("running", "DMD", threshold, None, budget=True), settings):
        clip = run.outputs.clip
        for alert in (a for a in run.alerts if a.state == "open"):
            after_onset = clip.is_fall and (alert.opened_at - CLIP_START).total_seconds() > (clip.fall_start_s or 0)
            label = label_for(alert, "true_fall" if after_onset else "false_alarm", "simulated caregiver")
            labels.update({frame_id: int(label.verdict == "true_fall") for frame_id in label.frame_ids})
    return labels


def adaptation_frames(
    folder: Path, outputs: list[ClipOutputs], labels: dict[str, int], settings: Settings, shortest_edge: int
) -> list[AdaptFrame]:
    frames = []
    for clip in outputs:
        published = publish_as_camera(folder / clip.clip.file, clip.camera_id, clip.room, settings)
        assert len(published.frames) == clip.frames  # the same sampling as the cached outputs
        for index, frame in enumerate(published.frames):
            image = decode_jpeg_rgb(frame.jpeg)
            assert image is not None
            frames.append(
                AdaptFrame(
                    frame.frame_id,
                    clip.camera_id,
                    float(clip.position_s[index] * 1000),
                    shrunk(image, shortest_edge),
                    float(clip.cloud_p[index]),
                    labels.get(frame.frame_id),
                )
            )
    return frames


def policies_of(scores: Scores, own_threshold: float, families: list[str]) -> list[Policy]:
    """Names without fold-specific numbers, so the folds' clips pool into one row each."""
    result = [
        Policy(EDGE_ONLY, EDGE_ONLY, 0.0, None, budget=False),
        Policy(CLOUD_ONLY, CLOUD_ONLY, 1.0, None, budget=False),
        Policy(SERVED, "DMD", own_threshold, None, budget=True),
    ]
    for share in SHARES:
        for family in families:
            result.append(
                Policy(f"{family} {share:.0%}", family, scores.threshold_for_share(family, share), share, True)
            )
    return result


def agreement_auroc(scores: np.ndarray, agree: np.ndarray) -> float | None:
    """P(an agreeing frame scores above a disagreeing one), ties half (Mann–Whitney)."""
    positives, negatives = scores[agree], scores[~agree]
    if not len(positives) or not len(negatives):
        return None
    greater = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(greater / (len(positives) * len(negatives)))


def agreement_of(clip: ClipOutputs, settings: Settings) -> np.ndarray:
    """The DMD label of each frame: the two models' decisions, each at its own threshold, agree."""
    return (clip.edge_p >= settings.edge.decision_threshold) == (clip.cloud_p >= settings.cloud.decision_threshold)


def auroc_interval(
    clips: list[tuple[np.ndarray, np.ndarray]], resamples: int, confidence: float, seed: int
) -> tuple[float | None, float | None, float | None]:
    """AUROC over all clips' frames, and its bootstrap interval resampling whole clips."""

    def of(indices: np.ndarray) -> float | None:
        return agreement_auroc(
            np.concatenate([clips[i][0] for i in indices]), np.concatenate([clips[i][1] for i in indices])
        )

    value = of(np.arange(len(clips)))
    draws = np.random.default_rng(seed).integers(0, len(clips), size=(resamples, len(clips)))
    samples = np.array([a for a in (of(row) for row in draws) if a is not None])
    if value is None or not len(samples):
        return value, None, None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return value, float(low), float(high)


@dataclass
class StudyResult:
    folder: str
    protocol: str
    caregiver: bool
    folds: int
    # before / after → policy → scores; published → the pair each fold's gate leaves serving
    tables: dict[str, dict[str, dict]] = field(default_factory=dict)
    gates: list[dict] = field(default_factory=list)
    auroc: dict[str, list] = field(default_factory=dict)  # switcher → [(rows, auroc on held-out frames)]
    seconds: list[dict[str, float]] = field(default_factory=list)


class Study:
    def __init__(self, settings: Settings, folder: Path, workdir: Path) -> None:
        self.settings = settings = served_settings(settings)  # the running pair is the one the workers serve
        self.folder = folder
        self.workdir = workdir
        self.cloud = LazyModels(lambda: load_edge_model(settings), lambda: load_cloud_model(settings))
        self.facts: dict[str, dict[str, list[ClipFacts]]] = {
            table: defaultdict(list) for table in ("before", "after", "published")
        }
        # (switcher, share of the out-of-fold rows it learnt from) → per held-out clip: scores, agreement
        self.auroc_inputs: dict[tuple[str, float], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)

    def outputs(self, settings: Settings, clips: list[LabelledClip]) -> list[ClipOutputs]:
        """Both models on the clips (cached); the cloud model is loaded once for the whole study."""
        models = LazyModels(lambda: load_edge_model(settings), lambda: self.cloud.cloud[0])
        return clip_outputs(settings, self.folder, clips, models)[0]

    def switcher_curve(self, rows: DmdData, after: list[ClipOutputs], whole: dict[SwitcherKind, Switcher]) -> None:
        """Each kind of switcher trained on a growing share of the out-of-fold rows, scored on the held-out clips
        (`whole`: those already trained on all of them)."""
        dmd = self.settings.dmd
        order = np.random.default_rng(dmd.seed).permutation(len(rows.rows))
        for share in ROW_SHARES:
            subset = rows.select(np.isin(np.arange(len(rows.rows)), order[: round(share * len(order))]))
            for kind in whole:
                try:
                    switcher = whole[kind] if share == 1.0 else kind_switcher(subset, dmd, kind)
                except ConfigError as exc:  # too few rows of one kind in a small share: no point on the curve
                    log.warning("no %s switcher on %.0f%% of fold rows: %s", kind.name, share * 100, exc)
                    continue
                for clip in after:
                    self.auroc_inputs[(kind.name, share)].append(
                        (clip_scores(switcher, clip), agreement_of(clip, self.settings))
                    )
        for clip in after:
            self.auroc_inputs[("uncertainty", 1.0)].append(
                (np.abs(clip.edge_p - 0.5), agreement_of(clip, self.settings))
            )

    def evaluate(
        self, table: str, outputs: list[ClipOutputs], scores: Scores, threshold: float, families
    ) -> dict[str, list[ClipFacts]]:
        """Every policy on the clips, added to `table`; returns this fold's facts by policy."""
        fold: dict[str, list[ClipFacts]] = {}
        for policy in policies_of(scores, threshold, families):
            fold[policy.name] = [clip_facts(run) for run in replay(outputs, scores, policy, self.settings)]
            self.facts[table][policy.name].extend(fold[policy.name])
        return fold

    def run_fold(self, fold: Fold, index: int, caregiver: bool, gate_only: bool) -> tuple[dict, dict[str, float]]:
        settings = self.settings
        adapt_outputs = self.outputs(settings, fold.adapt_on)
        running, running_meta = published_switcher(settings, adapt_outputs[0].hidden.shape[1])
        threshold = served_threshold(settings.edge, running_meta.threshold)
        labels = caregiver_labels(adapt_outputs, running, threshold, settings) if caregiver else {}
        shortest = int(load_edge_model(settings).processor.image_processor.size["shortest_edge"])
        frames = adaptation_frames(self.folder, adapt_outputs, labels, settings, shortest)
        original = original_images(settings.dmd.adapt.original_data, shortest)
        started = time.perf_counter()
        candidate = Adaptation(settings, original, f"fold {index}").run(frames)
        seconds = {**candidate.seconds, "total": time.perf_counter() - started}
        gate = {c.name: [c.candidate, c.running, c.passed] for c in candidate.gate.reported_checks()}
        fold_facts = {
            "fold": index,
            "passed": candidate.gate.passed,
            **gate,
            "caregiver_labelled_frames": len(labels),
            "gate_labelled_frames": candidate.gate.labelled,
            "switcher_rows": len(candidate.rows.rows),
            "router": candidate.switcher.inputs,  # confidence: the learned switcher lost its gate check
            "threshold": candidate.choice.threshold,
        }
        if not gate_only:
            self.evaluate_fold(fold, index, candidate, running, threshold)
        return fold_facts, seconds

    def evaluate_fold(self, fold: Fold, index: int, candidate: Candidate, running: Switcher, threshold: float) -> None:
        """The held-out clips through every policy of the running pair and of the candidate."""
        settings = self.settings
        held_outputs = self.outputs(settings, fold.held_out)
        trained = {kind: kind_switcher(candidate.rows, settings.dmd, kind) for kind in kinds_for(candidate.rows)}
        adapted = settings.model_copy(deep=True)
        adapted.edge.model = str(save_edge(candidate.edge, self.workdir / f"fold-{index}" / "edge"))
        after = self.outputs(adapted, fold.held_out)
        before = self.evaluate("before", held_outputs, Scores.of(held_outputs, running, settings.eval.seed),
                               threshold, ["DMD", "uncertainty"])  # fmt: skip
        scores = Scores.of(after, candidate.switcher, settings.eval.seed)
        # "DMD" is the candidate's own router (dmd.switcher_inputs, or the gate's confidence router); every
        # kind beside it, on the same rows
        for kind, switcher in trained.items():
            scores.by_family[kind.family] = [clip_scores(switcher, clip) for clip in after]
        families = ["DMD", *(kind.family for kind in trained), "uncertainty"]
        adapted_facts = self.evaluate(
            "after", after, scores, served_threshold(settings.edge, candidate.choice.threshold), families
        )
        # what the facility runs after the gate: the candidate pair where it passed, the running pair elsewhere
        served = adapted_facts if candidate.gate.passed else before
        self.facts["published"][SERVED].extend(served[SERVED])
        self.switcher_curve(candidate.rows, after, trained)

    def run(self, protocol: str, caregiver: bool, gate_only: bool = False) -> StudyResult:
        clips = read_labelled_clips(self.folder)
        result = StudyResult(str(self.folder), protocol, caregiver, 0)
        for index, fold in enumerate(folds_for(clips, protocol)):
            gate, seconds = self.run_fold(fold, index, caregiver, gate_only)
            result.gates.append(gate)
            result.seconds.append(seconds)
            result.folds += 1
        ev = self.settings.eval
        for table, by_policy in self.facts.items():
            result.tables[table] = {
                name: asdict(aggregate(facts, ev.bootstrap, ev.confidence, ev.seed))
                for name, facts in by_policy.items()
            }
        for (name, share), per_clip in sorted(self.auroc_inputs.items()):
            interval = auroc_interval(per_clip, ev.bootstrap, ev.confidence, ev.seed)
            result.auroc.setdefault(name, []).append([share, *interval])
        return result


def write_study(result: StudyResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2, default=str))
    return path


def interval_text(interval: dict, percent: bool = True) -> str:
    value, low, high = interval["value"], interval["low"], interval["high"]
    if value is None:
        return "–"
    scale, unit = (100, "%") if percent else (1, "")
    bounds = "" if low is None else f" [{low * scale:.0f}–{high * scale:.0f}]"
    return f"{value * scale:.0f}{unit}{bounds}"


TABLE_TITLES = {
    "before": "before adaptation",
    "after": "after adaptation (every candidate, whatever its gate said)",
    "published": "after the gate (the candidate where it passed, the running pair elsewhere)",
}


def markdown_tables(result: StudyResult) -> str:
    """One table per before / after / after the gate: events with their intervals by clip, cloud share, frame
    F1; then the switchers' AUROC curve."""
    lines = []
    for table, by_policy in result.tables.items():
        lines += [
            f"**{TABLE_TITLES[table]}** "
            f"({result.protocol}, {result.folds} folds, caregiver labels: {result.caregiver})",
            "",
            "| policy | falls alerted after onset | false alarms (clips) | median time to alert | cloud | frame F1 |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in by_policy.items():
            median = s["time_to_alert_median_s"]
            lines.append(
                f"| {name} | {s['detected']}/{s['fall_clips']} ({interval_text(s['detection'])}) | "
                f"{s['false_alarms']}/{s['fall_clips'] + s['no_fall_clips']} "
                f"({interval_text(s['false_alarms_per_clip'])}) | "
                f"{'–' if median is None else f'{median:.1f} s'} | {s['cloud_share']:.0%} | "
                f"{interval_text(s['frame_f1'])} |"
            )
        lines.append("")
    lines += ["| switcher | rows learnt from | AUROC of agreement on held-out frames [CI by clip] |", "|---|---|---|"]
    for name, points in result.auroc.items():
        for share, value, low, high in points:
            bounds = "" if low is None else f" [{low:.2f}–{high:.2f}]"
            lines.append(f"| {name} | {share:.0%} | {'–' if value is None else f'{value:.2f}'}{bounds} |")
    return "\n".join(lines) + "\n"


def with_seed(settings: Settings, offset: int) -> Settings:
    """The settings with the adaptation's and the switchers' seeds moved by `offset`: another draw of the
    training's randomness (initialisation, shuffling, folds' order), nothing else."""
    dmd = settings.dmd
    adapt = dmd.adapt.model_copy(update={"seed": dmd.adapt.seed + offset})
    return settings.model_copy(update={"dmd": dmd.model_copy(update={"seed": dmd.seed + offset, "adapt": adapt})})


def spread_cell(scores: dict | None) -> str:
    if scores is None:
        return "–"
    return f"{scores['detected']}/{scores['fall_clips']}, {scores['false_alarms']} FA, {scores['cloud_share']:.0%}"


def seed_spread(results: dict[int, StudyResult]) -> str:
    """Per policy after adaptation, each seed's falls alerted after onset, false alarms and cloud share: how much
    of a difference between two settings the training's randomness alone makes (the intervals by clip in each
    seed's table do not hold it)."""
    seeds = list(results)
    lines = [
        "**spread over adaptation seeds** (after adaptation: falls alerted after onset, false alarms, cloud)",
        "",
        "| policy | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name in results[seeds[0]].tables["after"]:
        cells = [spread_cell(results[seed].tables["after"].get(name)) for seed in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
