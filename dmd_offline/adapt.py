"""`fallwatch dmd adapt`: the edge model learns the facility from its own logged traffic, behind a gate.

From the frames of a window (`dmd.since` / `dmd.until` of the `frames` topic, or a video folder):

1. **Targets**: a caregiver's label where an answered alert covered the frame, else the cloud's
   answer (the logged cloud verdict, or the cloud model's when `dmd.run_cloud_model`).
2. **Held-out slice**: each camera's latest `gate_share` of frames, or (`gate_slice: camera`) every
   frame of a seeded `gate_share` of the cameras; nothing below learns from it.
3. **Cross-fitting**: the other frames are split in `folds` of whole cameras (`cross_fit`), or of
   time blocks within each camera; for each fold, a copy of the running edge model is fine-tuned on the other folds
   (`dmd_offline.finetune`) and answers the fold. Those out-of-fold answers are the switcher's DMD
   rows: the switcher learns how the adapted edge errs on frames it did not learn from.
4. **The candidate**: the running edge fine-tuned on all of them; the switcher trained on the
   out-of-fold rows (`dmd.switcher_inputs`, `dmd.switcher_target`), its threshold deferring
   `target_offload_share` of the candidate's own scores of the held-out slice (scores only).
5. **The gate**, on the held-out slice. Where it has caregiver-labelled frames, those decide: what
   the candidate pair serves (its edge's answer, or the cloud's where its switcher defers) must be
   right on them at least as often as what the running pair serves, and say "fall" on the
   caregiver-acknowledged fall frames at least as often; its switcher's routing must be right on
   them at least as often as uncertainty deferral of as many frames. Where the labels hold no
   acknowledged fall (false alarms only, the usual case), the falls are judged on the held-out
   splits of `original_data` instead: the candidate edge must say "fall" on its fall images at
   least as often as the running edge, or a model that never says "fall" would pass on the
   false alarms alone. On a slice without labels,
   the candidate's edge must agree with the cloud at least as often as the running edge, and its F1
   on the cloud's fall answers must be as high (where falls are rare, saying "no fall" more agrees
   more and is no gain), and its switcher's routing must agree with the cloud at least as often as
   uncertainty deferral. Each check may lose by `gate_tolerance` at most. A learned switcher that
   loses its check is not published; with `confidence_fallback` one must also earn its place, by
   routing better than uncertainty deferral on the frames where the two differ by more than chance
   would (a one-sided sign test, `switcher_evidence`). Where it does not, the version routes by the
   edge's own confidence instead (a switcher without weights, its threshold set the same way), and
   the other checks are judged again with it. A refusal says which check failed, with its figures,
   in one line.
6. **Publish**: edge model and switcher as one version in `edge.model_registry`, with the hashes
   that bind them and the calibration the edge workers' drift guard compares cameras with (the
   candidate on the held-out slice); then ACTIVE points at it and the workers are told.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from transformers import ViltProcessor

from cloud_workers.model import CloudModel
from core.settings import ConfigError, DmdSettings, Settings
from dmd_offline.dataset import UNKNOWN, DatasetManifest, DmdData, DmdRow, agreement_scores, with_history
from dmd_offline.finetune import TrainingImages, finetune, save_edge
from dmd_offline.metrics import Outcomes, first_m, uncertainty_order
from dmd_offline.sources import ReplayItem, image_folder_items
from dmd_offline.threshold import ThresholdChoice, budget_threshold, share_threshold
from dmd_offline.train import TrainingReport, train_switcher
from edge_workers.model import EdgeBatch, ViltEdgeModel
from edge_workers.registry import (
    PAIR_EDGE_DIR,
    Calibration,
    PairVersion,
    activate,
    active_pair_files,
    read_active,
    save_pair,
)
from edge_workers.routing import served_threshold
from edge_workers.switcher import (
    Switcher,
    SwitcherMetadata,
    history_by_camera,
    history_length,
    latest_version,
    load_switcher,
    new_version,
)

log = logging.getLogger(__name__)

PREDICT_BATCH = 16
HELD_OUT_SPLITS = ("val", "test")  # of original_data: what the edge model did not learn from
ROUTING_CHECK = "switcher vs uncertainty"
DECILES = [q / 10 for q in range(1, 10)]


class GateRefused(Exception):
    """The candidate is not published; the message says why in one line."""


@dataclass
class AdaptFrame:
    input_id: str
    group: str  # the camera
    order_key: float  # capture time (ms) or position: the chronological order within a camera
    image_rgb: np.ndarray
    cloud_probability: float | None  # None: no cloud answer logged (and none computed)
    label: int | None  # a caregiver's answer (1 fall, 0 not), None where nobody answered


def frames_of(
    items: Iterable[ReplayItem], cloud_model: CloudModel | None, batch_size: int, labels_are_caregivers: bool
) -> list[AdaptFrame]:
    """The window's frames with their cloud answers (computed where none was logged, with a cloud model).

    `labels_are_caregivers`: the items' ground truth is a caregiver's label (logged traffic), not an
    annotation (a folder), which adaptation must never see.
    """
    frames: list[AdaptFrame] = []
    pending: list[tuple[AdaptFrame, ReplayItem]] = []
    for item in items:
        label = item.ground_truth if labels_are_caregivers else None
        cloud = None if item.logged is None else item.logged.fall_probability
        frame = AdaptFrame(item.input_id, item.group, item.order_key, item.image_rgb, cloud, label)
        frames.append(frame)
        if cloud is None and cloud_model is not None:
            pending.append((frame, item))
        if len(pending) >= batch_size:
            answer_in_cloud(pending, cloud_model)
    if pending:
        answer_in_cloud(pending, cloud_model)
    return frames


def answer_in_cloud(pending: list[tuple[AdaptFrame, ReplayItem]], cloud_model: CloudModel | None) -> None:
    assert cloud_model is not None
    probabilities = cloud_model.predict([item.clip() for _, item in pending])
    for (frame, _), probability in zip(pending, probabilities, strict=True):
        # a cloud model that answers NaN has not answered: the frame is no "no fall" target
        frame.cloud_probability = float(probability) if math.isfinite(probability) else None
    pending.clear()


def held_out_slice(
    frames: list[AdaptFrame], share: float, by: Literal["time", "camera"] = "time", seed: int = 0
) -> np.ndarray:
    """True for the frames the gate judges: each camera's latest `share` of frames (at least one, when the
    camera has two or more), or, `by` camera, every frame of a seeded `share` of the cameras (at least one
    held out and one left; with a single camera, its latest frames)."""
    groups = sorted({frame.group for frame in frames})
    if by == "camera" and len(groups) >= 2:
        count = min(len(groups) - 1, max(1, round(share * len(groups))))
        chosen = set(np.random.default_rng(seed).choice(groups, size=count, replace=False).tolist())
        return np.array([frame.group in chosen for frame in frames])
    held = np.zeros(len(frames), dtype=bool)
    for group in groups:
        indices = sorted((i for i, f in enumerate(frames) if f.group == group), key=lambda i: frames[i].order_key)
        count = min(len(indices) - 1, max(1, round(share * len(indices)))) if len(indices) > 1 else 0
        held[indices[len(indices) - count :]] = True
    return held


def fold_ids(frames: list[AdaptFrame], folds: int, by: str) -> np.ndarray:
    """A fold per frame: whole cameras (`by` camera, when there are enough), else time blocks of each camera."""
    groups = sorted({frame.group for frame in frames})
    if by == "camera" and len(groups) >= folds:
        by_group = {group: index % folds for index, group in enumerate(groups)}
        return np.array([by_group[frame.group] for frame in frames])
    ids = np.zeros(len(frames), dtype=int)
    for group in groups:
        indices = sorted((i for i, f in enumerate(frames) if f.group == group), key=lambda i: frames[i].order_key)
        for block, part in enumerate(np.array_split(np.array(indices, dtype=int), folds)):
            ids[part] = block
    return ids


def targets(frames: list[AdaptFrame], cloud_threshold: float) -> np.ndarray:
    """1 / 0 per frame: the caregiver's label, else the cloud's answer; -1 where neither is known."""

    def target(frame: AdaptFrame) -> int:
        if frame.label is not None:
            return frame.label
        return -1 if frame.cloud_probability is None else int(frame.cloud_probability >= cloud_threshold)

    return np.array([target(frame) for frame in frames], dtype=int)


def predict(edge: ViltEdgeModel, images: list[np.ndarray]) -> EdgeBatch:
    """Seeded (ViLT draws its patch order at random), in batches."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = [edge.predict(images[i : i + PREDICT_BATCH]) for i in range(0, len(images), PREDICT_BATCH)]
    return EdgeBatch(
        np.concatenate([part.fall_probability for part in parts]), np.concatenate([part.hidden for part in parts])
    )


@dataclass
class RunningPair:
    edge_dir: Path
    version: str | None  # the registry's active version; None: edge.model with the newest switcher
    switcher: Switcher | None
    threshold: float | None


def running_pair(settings: Settings) -> RunningPair:
    registry = settings.edge.model_registry
    if registry is not None and read_active(registry) is not None:
        files = active_pair_files(registry)
        switcher, metadata = load_switcher(files.switcher_dir)
        threshold = served_threshold(settings.edge, metadata.threshold)
        return RunningPair(files.edge_dir, files.version.version, switcher, threshold)
    edge_dir = Path(settings.edge.model)
    if not edge_dir.is_dir():
        raise ConfigError(f"edge.model {settings.edge.model!r} is not a local directory: adaptation needs the weights")
    newest = latest_version(settings.edge.switcher_registry)
    if newest is None:
        return RunningPair(edge_dir, None, None, None)
    switcher, metadata = load_switcher(newest)
    return RunningPair(edge_dir, None, switcher, served_threshold(settings.edge, metadata.threshold))


def dmd_rows(
    frames: list[AdaptFrame],
    output: EdgeBatch,
    cloud_threshold: float,
    edge_threshold: float,
    source: str,
    history: int,
) -> DmdData:
    """The switcher's rows: frames with a cloud answer, labelled by the edge's agreement with it. Each row's
    last `history` edge probabilities are read from all frames of its camera, as a live worker reads them,
    not only from the frames the cloud answered."""
    previous = frames_history(frames, output.fall_probability, history) if history else None
    rows, kept = [], []
    for index, frame in enumerate(frames):
        if frame.cloud_probability is None:
            continue
        small = int(output.fall_probability[index] >= edge_threshold)
        large = int(frame.cloud_probability >= cloud_threshold)
        rows.append(
            DmdRow(
                input_id=frame.input_id,
                image_path=frame.input_id,
                group=frame.group,
                split="",
                order_key=frame.order_key,
                small_fall_probability=float(output.fall_probability[index]),
                large_fall_probability=frame.cloud_probability,
                small_prediction=small,
                large_prediction=large,
                label=int(small == large),
                ground_truth=UNKNOWN if frame.label is None else frame.label,
                large_source="logged",
                offload_reason="",
                small_time_ms=float("nan"),
                large_time_ms=float("nan"),
                small_energy_j=float("nan"),
                large_energy_j=float("nan"),
            )
        )
        kept.append(index)
    manifest = DatasetManifest(
        source=source, edge_model="adapted", cloud_model="logged", hidden_size=output.hidden.shape[1]
    )
    return DmdData(manifest, rows, output.hidden[kept], None if previous is None else previous[kept])


@dataclass(frozen=True)
class GateCheck:
    name: str
    candidate: float | None
    running: float | None  # for the deferral check: uncertainty deferral at the candidate's share
    passed: bool
    # the routing check's one-sided sign test: the chance of winning by at least as much with routing no better
    by_chance: float | None = None


REFUSALS = {
    "cloud agreement": "the candidate agrees with the cloud on {c:.1%} of the held-out frames, "
    "the running pair on {r:.1%}",
    "cloud falls F1": "the candidate's F1 on the cloud's fall answers is {c:.1%}, the running pair's {r:.1%}",
    "caregiver labels": "the candidate pair is right on {c:.1%} of the {n} caregiver-labelled frames, "
    "the running pair on {r:.1%}",
    "caregiver falls": "the candidate pair says fall on {c:.1%} of the {f} caregiver-acknowledged fall frames, "
    "the running pair on {r:.1%}",
    "original falls": "no caregiver acknowledged a fall on the held-out slice, and the candidate says fall on "
    "{c:.1%} of the {o} fall images of original_data's held-out splits, the running edge on {r:.1%}",
    ROUTING_CHECK: "the candidate's switcher is right on {c:.1%} with {s:.0%} to the cloud, "
    "uncertainty deferral on {r:.1%}",
}


@dataclass(frozen=True)
class KnownFalls:
    """Which fall images of `original_data`'s held-out splits each edge model calls a fall."""

    candidate: np.ndarray
    running: np.ndarray


@dataclass
class GateResult:
    frames: int
    checks: list[GateCheck]
    cloud_share: float  # the candidate switcher's share of the held-out frames to the cloud
    labelled: int = 0  # held-out frames with a caregiver's label
    labelled_falls: int = 0
    original_falls: int = 0  # fall images of original_data that judged the falls instead (none acknowledged)
    passed_over: GateCheck | None = None  # the learned switcher's routing check, where the confidence router won

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def refusal(self) -> str:
        reasons = [
            REFUSALS[check.name].format(
                c=check.candidate,
                r=check.running,
                s=self.cloud_share,
                n=self.labelled,
                f=self.labelled_falls,
                o=self.original_falls,
            )
            for check in self.checks
            if not check.passed
        ]
        return "not published: " + "; ".join(reasons) + f" (held-out slice of {self.frames} frames)"

    def fallback_line(self, evidence: float) -> str:
        """Why the version routes by the edge's confidence (only where the learned switcher was replaced)."""
        routing = self.passed_over
        assert routing is not None
        instead = ": the version routes by the edge's confidence instead"
        if routing.candidate is None or routing.running is None:
            return "no held-out frame has a cloud answer or a caregiver label to judge the learned switcher" + instead
        line = (
            f"the learned switcher is right on {routing.candidate:.1%} of the held-out frames it routes, "
            f"uncertainty deferral on {routing.running:.1%}"
        )
        if routing.passed and routing.by_chance is not None:
            line += f": no evidence it routes better (sign test p = {routing.by_chance:.2f}, at most {evidence} needed)"
        return line + instead

    def reported_checks(self) -> list[GateCheck]:
        """The checks, and the learned switcher's lost one where the confidence router replaced it."""
        if self.passed_over is None:
            return list(self.checks)
        return [*self.checks, replace(self.passed_over, name=f"learned {ROUTING_CHECK}")]

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "gate_frames": float(self.frames),
            "gate_cloud_share": self.cloud_share,
            "gate_labelled_frames": float(self.labelled),
        }
        for check in self.reported_checks():  # a check without frames to judge on is left out
            key = check.name.replace(" ", "_")
            if check.candidate is not None and check.running is not None:
                metrics[f"gate_{key}_candidate"] = check.candidate
                metrics[f"gate_{key}_running"] = check.running
            if check.by_chance is not None:
                metrics[f"gate_{key}_by_chance"] = check.by_chance
        return metrics


def gate(
    frames: list[AdaptFrame],
    candidate: EdgeBatch,
    candidate_deferred: np.ndarray,
    running: EdgeBatch,
    running_deferred: np.ndarray,
    settings: Settings,
    known_falls: KnownFalls | None = None,
) -> GateResult:
    """The checks of the module docstring on the held-out frames; `*_deferred`: each pair's switcher sends
    the frame to the cloud (all False for a running edge model without a switcher); `known_falls` judges
    the falls where the labels acknowledge none.

    Caregiver labels, where the slice has any, decide: they say where the cloud itself is wrong (a
    person lying on a bed is no fall, whatever the cloud answers), so agreement with the cloud is
    checked only on a slice without them. On labelled frames each pair is judged on what it serves,
    as the caregivers get it: the cloud's answer where its switcher defers, the edge's elsewhere.
    """
    edge_threshold = settings.edge.decision_threshold
    tolerance = settings.dmd.adapt.gate_tolerance
    cloud_known = np.array([f.cloud_probability is not None for f in frames])
    cloud = np.array([(f.cloud_probability or 0.0) >= settings.cloud.decision_threshold for f in frames])
    labelled = np.array([f.label is not None for f in frames])
    labels = np.array([bool(f.label) for f in frames])
    falls = labelled & labels
    new = candidate.fall_probability >= edge_threshold
    old = running.fall_probability >= edge_threshold

    def share(mask: np.ndarray, right: np.ndarray) -> float | None:
        return float(np.mean(right[mask])) if mask.any() else None

    def check(name: str, ours: float | None, theirs: float | None) -> GateCheck:
        passed = ours is None or theirs is None or ours >= theirs - tolerance
        return GateCheck(name, ours, theirs, passed)

    original_falls = 0
    # a frame can only be answered by the cloud where the cloud's answer is known
    deferred, running_deferred = candidate_deferred & cloud_known, running_deferred & cloud_known
    if labelled.any():
        new_served, old_served = np.where(deferred, cloud, new), np.where(running_deferred, cloud, old)
        checks = [
            check("caregiver labels", share(labelled, new_served == labels), share(labelled, old_served == labels)),
            check("caregiver falls", share(falls, new_served), share(falls, old_served)),
        ]
        if not falls.any() and known_falls is not None:
            ours, theirs = float(known_falls.candidate.mean()), float(known_falls.running.mean())
            checks.append(check("original falls", ours, theirs))
            original_falls = len(known_falls.candidate)
        judged, reference = labelled & cloud_known, labels
    else:
        # agreeing more by saying "no fall" more is no gain where falls are rare: F1 on the cloud's falls too
        checks = [
            check("cloud agreement", share(cloud_known, new == cloud), share(cloud_known, old == cloud)),
            check("cloud falls F1", fall_f1(new[cloud_known], cloud[cloud_known]),
                  fall_f1(old[cloud_known], cloud[cloud_known])),
        ]  # fmt: skip
        judged, reference = cloud_known, cloud
    if judged.any():
        # the caregivers' labels where the slice has any, else the cloud: how often the routed answer is right
        known = np.flatnonzero(judged)
        args = candidate.fall_probability[known], new[known], deferred[known], cloud[known], reference[known]
        by_switcher, by_uncertainty, by_chance = deferral_rightness(*args)
        checks.append(replace(check(ROUTING_CHECK, by_switcher, by_uncertainty), by_chance=by_chance))
    cloud_share = float(candidate_deferred.mean()) if len(frames) else 0.0
    return GateResult(len(frames), checks, cloud_share, int(labelled.sum()), int(falls.sum()), original_falls)


def fall_f1(says_fall: np.ndarray, reference: np.ndarray) -> float | None:
    """F1 of the fall answers against `reference`; None where neither says fall anywhere."""
    true = int(np.sum(says_fall & reference))
    wrong = int(np.sum(says_fall != reference))
    return None if true + wrong == 0 else 2 * true / (2 * true + wrong)


def deferral_rightness(
    probability: np.ndarray, new: np.ndarray, deferred: np.ndarray, cloud: np.ndarray, reference: np.ndarray
) -> tuple[float, float, float]:
    """How often the switcher's routing, and uncertainty deferral of as many frames, is right (`reference`),
    and the one-sided sign test of the switcher's win (`sign_test`)."""
    m = int(deferred.sum())
    by_switcher = np.where(deferred, cloud, new) == reference
    by_uncertainty = np.where(first_m(uncertainty_order(probability.astype(float)), m), cloud, new) == reference
    wins, losses = int(np.sum(by_switcher & ~by_uncertainty)), int(np.sum(by_uncertainty & ~by_switcher))
    return float(np.mean(by_switcher)), float(np.mean(by_uncertainty)), sign_test(wins, losses)


def sign_test(wins: int, losses: int) -> float:
    """P(at least `wins` of the `wins + losses` frames where two routings differ go one way, were each
    a coin toss): how likely a win this large is from a routing no better than the other."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def scores_of(switcher: Switcher, output: EdgeBatch, frames: list[AdaptFrame]) -> np.ndarray:
    """The switcher's scores of a camera's frames, its history read in frame order within each camera."""
    history = frames_history(frames, output.fall_probability, switcher.history)
    return switcher.agreement_probability(output.hidden, output.fall_probability, history)


def frames_history(frames: list[AdaptFrame], probabilities: np.ndarray, k: int) -> np.ndarray:
    """Each frame's camera's k previous edge probabilities, in frame order within each camera."""
    order = np.array([f.order_key for f in frames])
    return history_by_camera(probabilities, [f.group for f in frames], order, k)


def calibration_of(output: EdgeBatch, scores: np.ndarray, threshold: float, edge_threshold: float) -> Calibration:
    return Calibration(
        frames=len(scores),
        fall_rate=float(np.mean(output.fall_probability >= edge_threshold)),
        offload_share=float(np.mean(scores < threshold)),
        score_quantiles=[float(q) for q in np.quantile(scores, DECILES)],
    )


@dataclass
class Candidate:
    edge: ViltEdgeModel
    switcher: Switcher  # the learned one, or the confidence router in its place (`GateResult.passed_over`)
    choice: ThresholdChoice
    gate: GateResult
    calibration: Calibration
    training: TrainingReport  # of the learned switcher
    running: RunningPair
    adaptation_frames: int
    rows: DmdData  # the switcher's out-of-fold rows
    seconds: dict[str, float] = field(default_factory=dict)


class Adaptation:
    """One adaptation run over a window's frames (the steps of the module docstring)."""

    def __init__(self, settings: Settings, original: TrainingImages | None, source: str) -> None:
        self.settings = settings
        self.original = original
        self.source = source
        self.running = running_pair(settings)
        self.seconds: dict[str, float] = {}

    def base_model(self) -> ViltEdgeModel:
        return ViltEdgeModel.from_pretrained(str(self.running.edge_dir), self.settings.edge.question)

    def adapted(self, frames: list[AdaptFrame], known: np.ndarray, seed: int) -> ViltEdgeModel:
        facility = TrainingImages([frames[i].image_rgb for i in np.flatnonzero(known)], self.targets[known])
        return finetune(self.base_model(), facility, self.original, self.settings.dmd.adapt, seed)

    def run(self, frames: list[AdaptFrame]) -> Candidate:
        adapt = self.settings.dmd.adapt
        started = time.perf_counter()
        held = held_out_slice(frames, adapt.gate_share, adapt.gate_slice, adapt.seed)
        learn = [f for f, h in zip(frames, held, strict=True) if not h]
        gate_frames = [f for f, h in zip(frames, held, strict=True) if h]
        if not gate_frames or not learn:
            raise ConfigError(f"{len(frames)} frames in the window: too few to learn from and hold some out")
        self.targets = targets(learn, self.settings.cloud.decision_threshold)
        folds = fold_ids(learn, adapt.folds, adapt.cross_fit)
        oof = self.out_of_fold(learn, folds)
        self.seconds["cross-fitting"] = time.perf_counter() - started
        started = time.perf_counter()
        edge = self.adapted(learn, self.targets >= 0, adapt.seed)
        self.seconds["final edge"] = time.perf_counter() - started
        started = time.perf_counter()
        switcher, training, choice = self.switcher_on(oof)
        self.seconds["switcher"] = time.perf_counter() - started
        started = time.perf_counter()
        judged = self.judge(edge, gate_frames, oof, switcher, choice)
        self.seconds["gate"] = time.perf_counter() - started
        return Candidate(edge, *judged, training, self.running, len(learn), oof, self.seconds)

    def judge(
        self, edge: ViltEdgeModel, frames: list[AdaptFrame], oof: DmdData, switcher: Switcher, choice: ThresholdChoice
    ) -> tuple[Switcher, ThresholdChoice, GateResult, Calibration]:
        """The gate on the held-out frames, both pairs answering them (`routed_gate`)."""
        images = [f.image_rgb for f in frames]
        base = self.base_model()
        candidate_out, running_out = predict(edge, images), predict(base, images)
        running_deferred = self.running_deferred(running_out, frames)
        labelled = [f.label for f in frames if f.label is not None]
        known_falls = self.known_falls(edge, base) if labelled and not any(labelled) else None
        return routed_gate(
            frames, oof, switcher, choice, candidate_out, running_out, running_deferred, self.settings, known_falls
        )

    def known_falls(self, candidate: ViltEdgeModel, running: ViltEdgeModel) -> KnownFalls | None:
        """Both edges on the fall images of `original_data`'s held-out splits (None where it is not set)."""
        shortest = int(running.processor.image_processor.size["shortest_edge"])
        held = original_images(self.settings.dmd.adapt.original_data, shortest, HELD_OUT_SPLITS)
        if held is None:
            return None
        falls = [image for image, target in zip(held.images, held.targets, strict=True) if target == 1]
        if not falls:
            return None
        threshold = self.settings.edge.decision_threshold
        return KnownFalls(
            predict(candidate, falls).fall_probability >= threshold,
            predict(running, falls).fall_probability >= threshold,
        )

    def running_deferred(self, output: EdgeBatch, frames: list[AdaptFrame]) -> np.ndarray:
        """The frames the running pair's switcher sends to the cloud (none without a switcher)."""
        if self.running.switcher is None or self.running.threshold is None:
            return np.zeros(len(frames), dtype=bool)
        return scores_of(self.running.switcher, output, frames) < self.running.threshold

    def out_of_fold(self, learn: list[AdaptFrame], folds: np.ndarray) -> DmdData:
        """Each fold answered by an edge model adapted on the other folds."""
        hidden_parts, probability_parts, order = [], [], []
        for fold in sorted(set(folds.tolist())):
            inside = folds == fold
            edge = self.adapted(learn, (~inside) & (self.targets >= 0), self.settings.dmd.adapt.seed + 1 + fold)
            output = predict(edge, [learn[i].image_rgb for i in np.flatnonzero(inside)])
            hidden_parts.append(output.hidden)
            probability_parts.append(output.fall_probability)
            order.extend(np.flatnonzero(inside).tolist())
        output = EdgeBatch(np.concatenate(probability_parts), np.concatenate(hidden_parts))
        frames = [learn[i] for i in order]
        settings = self.settings
        return dmd_rows(
            frames,
            output,
            settings.cloud.decision_threshold,
            settings.edge.decision_threshold,
            self.source,
            settings.dmd.switcher_history,
        )

    def switcher_on(self, rows: DmdData) -> tuple[Switcher, TrainingReport, ThresholdChoice]:
        return switcher_on(rows, self.settings.dmd)


def routed_gate(
    frames: list[AdaptFrame],
    oof: DmdData,
    switcher: Switcher,
    choice: ThresholdChoice,
    candidate_out: EdgeBatch,
    running_out: EdgeBatch,
    running_deferred: np.ndarray,
    settings: Settings,
    known_falls: KnownFalls | None = None,
) -> tuple[Switcher, ThresholdChoice, GateResult, Calibration]:
    """The gate with the learned switcher; where it does not earn its place against the edge's own
    confidence (`earns_its_place`), with the confidence router in its place (`dmd.adapt.confidence_fallback`).
    Returns the router the version would serve, its threshold, the gate's result and the calibration.

    A router's threshold defers `target_offload_share` of the candidate's own scores of the held-out
    frames (scores only: no label or cloud answer). The out-of-fold rows it was trained on were answered
    by fold models that learnt from less, so a threshold set on them gives another share on the final edge."""
    share = settings.dmd.adapt.target_offload_share

    def gated(router: Switcher, fitted: ThresholdChoice) -> tuple[np.ndarray, ThresholdChoice, GateResult]:
        scores = scores_of(router, candidate_out, frames)
        threshold, deferred = share_threshold(scores, share)
        on_slice = replace(fitted, threshold=threshold, deferred_share=deferred / len(scores))
        # judged as the workers will route it: at `edge.switcher_threshold` where that overrides its own
        served = scores < served_threshold(settings.edge, threshold)
        result = gate(frames, candidate_out, served, running_out, running_deferred, settings, known_falls)
        return scores, on_slice, result

    scores, choice, result = gated(switcher, choice)
    routing = next((c for c in result.checks if c.name == ROUTING_CHECK), GateCheck(ROUTING_CHECK, None, None, True))
    if settings.dmd.adapt.confidence_fallback and not earns_its_place(routing, settings.dmd.adapt.switcher_evidence):
        switcher, fitted = confidence_router(oof, share)
        scores, choice, result = gated(switcher, fitted)
        # the router now is uncertainty deferral: the check would compare it with itself
        result.checks = [c for c in result.checks if c.name != ROUTING_CHECK]
        result.passed_over = routing
        log.warning("%s", result.fallback_line(settings.dmd.adapt.switcher_evidence))
    served = served_threshold(settings.edge, choice.threshold)
    calibration = calibration_of(candidate_out, scores, served, settings.edge.decision_threshold)
    return switcher, choice, result, calibration


def earns_its_place(routing: GateCheck, evidence: float) -> bool:
    """A learned switcher is served only where its routing beats the edge's own confidence by more than
    chance would (`dmd.adapt.switcher_evidence`): the router without weights needs no such proof."""
    return routing.passed and routing.by_chance is not None and routing.by_chance <= evidence


def confidence_router(rows: DmdData, share: float) -> tuple[Switcher, ThresholdChoice]:
    """The switcher without weights that routes by the edge's confidence, and what deferring `share` of the
    out-of-fold rows gives there, as for a learned one."""
    router = Switcher(rows.hidden.shape[1], "confidence")
    return router, budget_threshold(agreement_scores(router, rows), Outcomes.of(rows), share)


def switcher_on(rows: DmdData, dmd: DmdSettings) -> tuple[Switcher, TrainingReport, ThresholdChoice]:
    """A switcher trained on out-of-fold rows (a seeded share held out for early stopping), and what deferring
    `target_offload_share` of them gives (its published threshold is set on the held-out slice: `routed_gate`)."""
    rows = with_history(rows, history_length(dmd.switcher_inputs, dmd.switcher_history))
    held = np.random.default_rng(dmd.seed).random(len(rows.rows)) < dmd.val_share
    train, val = rows.select(~held), rows.select(held)
    switcher, training = train_switcher(train, val, dmd)
    choice = budget_threshold(agreement_scores(switcher, rows), Outcomes.of(rows), dmd.adapt.target_offload_share)
    return switcher, training, choice


def publish_candidate(settings: Settings, candidate: Candidate, window: str) -> str:
    """Write the candidate as one version of `edge.model_registry` and make it the active one."""
    if not candidate.gate.passed:
        raise GateRefused(candidate.gate.refusal())
    registry = settings.edge.model_registry
    if registry is None:
        raise ConfigError("edge.model_registry is not set: adapted versions are published there")
    version = new_version()
    metadata = SwitcherMetadata(
        version=version,
        input_dim=candidate.switcher.input_dim,
        inputs=candidate.switcher.inputs,
        history=candidate.switcher.history,
        threshold=candidate.choice.threshold,
        edge_model=PAIR_EDGE_DIR,  # bound to the version's own edge model when saved
        created_at=datetime.now(UTC),
        trained=True,
        training_window=window,
        offload_policy={"method": "budget", "target_share": candidate.choice.target_share},
        metrics=candidate.gate.as_metrics(),
    )
    pair = PairVersion(
        version=version,
        created_at=metadata.created_at,
        parent=candidate.running.version,
        edge_base=str(candidate.running.edge_dir),
        edge_sha256="",  # filled in by save_pair from what it wrote
        switcher_sha256="",
        calibration=candidate.calibration,
        training_window=window,
        gate=candidate.gate.as_metrics(),
    )
    with tempfile.TemporaryDirectory(prefix="fallwatch-adapt-") as scratch:
        edge_dir = save_edge(candidate.edge, Path(scratch) / "edge")
        written = save_pair(registry, pair, edge_dir, candidate.switcher, metadata)
    try:
        activate(registry, version, replacing=candidate.running.version)
    except ConfigError:
        shutil.rmtree(written)  # judged against a version no longer active: nothing names it
        raise
    return version


def shrunk(image: np.ndarray, shortest_edge: int) -> np.ndarray:
    """The image with its shorter side at `shortest_edge` (never enlarged): the model sees no more, and a
    window's frames stay small in memory."""
    height, width = image.shape[:2]
    scale = shortest_edge / min(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def original_images(
    folder: Path | None, shortest_edge: int, splits: tuple[str, ...] = ("train",)
) -> TrainingImages | None:
    """The images of `splits` of the image folder the edge model learnt from (`dmd.adapt.original_data`)."""
    if folder is None:
        return None
    items = [item for item in image_folder_items(folder) if item.split in splits]
    if not items:
        raise ConfigError(f"dmd.adapt.original_data: {folder}/labels.csv has no {' or '.join(splits)} split")
    return TrainingImages(
        [shrunk(item.image_rgb, shortest_edge) for item in items],
        np.array([item.ground_truth for item in items], dtype=np.int64),
    )


def read_window(settings: Settings) -> tuple[list[AdaptFrame], TrainingImages | None, str]:
    """The window's frames (with cloud answers and caregiver labels), the original data, the window's name."""
    from cloud_workers.loading import load_cloud_model
    from dmd_offline.pipeline import replay_items, source_description

    dmd = settings.dmd
    source = source_description(settings)
    if not dmd.run_cloud_model and dmd.source != "kafka":
        raise ConfigError(f"a {dmd.source} folder has no logged cloud verdicts: dmd.run_cloud_model must be true")
    shortest_edge = running_shortest_edge(settings)

    async def collect() -> list[ReplayItem]:
        items = []
        async for item in replay_items(settings):
            item.image_rgb = shrunk(item.image_rgb, shortest_edge)
            items.append(item)
        return items

    items = asyncio.run(collect())
    missing = dmd.run_cloud_model and any(item.logged is None for item in items)
    cloud_model = load_cloud_model(settings) if missing else None
    frames = frames_of(items, cloud_model, dmd.batch_size, labels_are_caregivers=dmd.source == "kafka")
    return frames, original_images(dmd.adapt.original_data, shortest_edge), source


def running_shortest_edge(settings: Settings) -> int:
    processor = ViltProcessor.from_pretrained(str(running_pair(settings).edge_dir))
    return int(processor.image_processor.size["shortest_edge"])
