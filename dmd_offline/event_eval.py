"""`fallwatch eval`: event-level evaluation of a folder of labelled clips, every routing policy, one rule.

Models run once per clip (`dmd_offline.clip_outputs`, cached); every policy is then replayed through
the edge's router and the alerting rule (`dmd_offline.event_replay`) and scored per clip and per
policy (`dmd_offline.scoring`); `dmd_offline.event_report` writes the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.checkpoints import local_checkpoint_sha256
from core.settings import AlertRule, ConfigError, Settings

if TYPE_CHECKING:
    from cloud_workers.model import CloudModel
    from edge_workers.model import EdgeModel
from dmd_offline.clip_outputs import CLIP_START, CacheStats, ClipOutputs, LazyModels, clip_outputs
from dmd_offline.clips import LabelledClip, read_labelled_clips
from dmd_offline.event_replay import ClipRun, Policy, Scores, policies, replay
from dmd_offline.scoring import ClipFacts, ClipScore, PolicyScores, aggregate, score_clip
from edge_workers.registry import active_pair_files
from edge_workers.routing import served_threshold
from edge_workers.switcher import SwitcherMetadata, check_compatible, latest_version, load_switcher


@dataclass(frozen=True)
class PolicyResult:
    policy: Policy
    scores: PolicyScores
    clips: list[ClipScore]  # in the order of clips.csv
    fallbacks: int


@dataclass
class EventEvaluation:
    folder: Path
    clips: list[LabelledClip]
    outputs: list[ClipOutputs]
    switcher: SwitcherMetadata
    switcher_threshold: float
    rule: AlertRule  # the defaults; rooms may override them (`alerting.rooms`)
    cache: CacheStats
    results: list[PolicyResult] = field(default_factory=list)
    scoring_s: float = 0.0

    def result(self, name: str) -> PolicyResult:
        return next(result for result in self.results if result.policy.name == name)


def clip_facts(run: ClipRun) -> ClipFacts:
    outputs = run.outputs
    clip = outputs.clip
    score = score_clip(clip.is_fall, clip.fall_start_s, CLIP_START, run.first_alert)
    no_fall_s = outputs.duration_s if clip.fall_start_s is None else min(clip.fall_start_s, outputs.duration_s)
    cloud = np.array(sorted(run.cloud_frames), dtype=int)
    return ClipFacts(
        score=score,
        no_fall_s=no_fall_s,
        truth=outputs.fall_truth(),
        predicted=run.final_decisions(),
        offloaded=run.offloaded,
        edge_s=float(outputs.edge_ms.sum()) / 1000,
        cloud_s=float(outputs.cloud_ms[cloud].sum()) / 1000,
        edge_j=float(outputs.edge_j.sum()),
        cloud_j=float(outputs.cloud_j[cloud].sum()),
    )


def served_settings(settings: Settings) -> Settings:
    """The settings naming the pair an edge worker serves: with `edge.model_registry`, its ACTIVE version's edge
    model and switcher (checked as the worker checks them), else `edge.model` and `edge.switcher_registry`."""
    if settings.edge.model_registry is None:
        return settings
    files = active_pair_files(settings.edge.model_registry)
    served = {"model": str(files.edge_dir), "revision": None, "switcher_registry": files.switcher_dir.parent}
    return settings.model_copy(update={"edge": settings.edge.model_copy(update=served)})


def published_switcher(settings: Settings, hidden_size: int) -> tuple[Any, SwitcherMetadata]:
    registry = settings.edge.switcher_registry
    newest = latest_version(registry)
    if newest is None:
        raise ConfigError(f"no switcher in {registry} (edge.switcher_registry): publish one with `fallwatch dmd run`")
    switcher, metadata = load_switcher(newest)
    check_compatible(metadata, settings.edge.model, hidden_size, local_checkpoint_sha256(settings.edge.model))
    return switcher, metadata


def evaluate_policies(evaluation: EventEvaluation, scores: Scores, settings: Settings) -> None:
    ev = settings.eval
    for policy in policies(scores, evaluation.switcher_threshold, ev.cloud_shares):
        runs = replay(evaluation.outputs, scores, policy, settings)
        facts = [clip_facts(run) for run in runs]
        evaluation.results.append(
            PolicyResult(
                policy=policy,
                scores=aggregate(facts, ev.bootstrap, ev.confidence, ev.seed),
                clips=[fact.score for fact in facts],
                fallbacks=sum(run.fallbacks for run in runs),
            )
        )


def edge_model(settings: Settings) -> EdgeModel:
    from edge_workers.model import load_edge_model  # transformers and the model only when a model must run

    return load_edge_model(settings)


def cloud_model(settings: Settings) -> CloudModel:
    from cloud_workers.loading import load_cloud_model

    return load_cloud_model(settings)


def run_event_eval(settings: Settings, folder: Path, models: LazyModels | None = None) -> EventEvaluation:
    """Models on every clip (or the cache), then every policy through the router and the alert rule; the pair is
    the one the edge worker serves (`served_settings`)."""
    settings = served_settings(settings)
    clips = read_labelled_clips(folder)
    if not clips:
        raise ConfigError(f"{folder / 'clips.csv'} lists no clip")
    if not any(clip.is_fall for clip in clips):
        raise ConfigError(f"{folder / 'clips.csv'} holds no fall clip: nothing to detect")
    models = models or LazyModels(lambda: edge_model(settings), lambda: cloud_model(settings))
    outputs, cache = clip_outputs(settings, folder, clips, models)
    started = time.perf_counter()
    switcher, metadata = published_switcher(settings, outputs[0].hidden.shape[1])
    threshold = served_threshold(settings.edge, metadata.threshold)
    evaluation = EventEvaluation(
        folder=folder,
        clips=clips,
        outputs=outputs,
        switcher=metadata,
        switcher_threshold=threshold,
        rule=settings.alerting.rule_for(""),
        cache=cache,
    )
    evaluate_policies(evaluation, Scores.of(outputs, switcher, settings.eval.seed), settings)
    evaluation.scoring_s = time.perf_counter() - started
    return evaluation
