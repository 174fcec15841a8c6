"""The steps of `fallwatch dmd`, each reading the previous step's output from the work directory.

<workdir>/dataset/        NPZ shards + manifest (replay)       <workdir>/dmd.json   the paper's JSON form
<workdir>/replay.json     the replay's counts and warnings
<workdir>/switcher/       trained weights + training.json (train)
<workdir>/threshold.json  the chosen threshold and its curve (threshold)
<workdir>/report/         report.md, report.json, PNG curves (evaluate)
edge.switcher_registry/<version>/                               (publish)
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cloud_workers.loading import load_cloud_model
from cloud_workers.model import CloudModel
from core.settings import ConfigError, Settings
from dmd_offline.dataset import (
    DmdData,
    agreement_scores,
    assign_missing_splits,
    export_paper_json,
    load_dataset,
    switcher_splits_from_val,
    with_history,
)
from dmd_offline.evaluate import Evaluation, evaluate
from dmd_offline.metrics import Outcomes
from dmd_offline.plots import write_plots
from dmd_offline.publish import publish
from dmd_offline.replay import ReplaySummary, replay
from dmd_offline.report import json_report, markdown_report, write_report
from dmd_offline.sources import (
    ReplayItem,
    image_folder_items,
    kafka_items,
    read_log_index,
    video_folder_items,
    with_augmented_copies,
)
from dmd_offline.threshold import ThresholdChoice, bucket_threshold, budget_threshold
from dmd_offline.train import TrainingReport, load_trained, save_trained, train_switcher
from edge_workers.model import EdgeModel, load_edge_model
from edge_workers.switcher import history_length


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def paper_json(self) -> Path:
        return self.root / "dmd.json"

    @property
    def replay_summary(self) -> Path:
        return self.root / "replay.json"

    @property
    def switcher(self) -> Path:
        return self.root / "switcher"

    @property
    def threshold(self) -> Path:
        return self.root / "threshold.json"

    @property
    def report(self) -> Path:
        return self.root / "report"


async def as_async(items: Iterator[ReplayItem]) -> AsyncIterator[ReplayItem]:
    for item in items:
        yield item


def source_description(settings: Settings) -> str:
    dmd = settings.dmd
    if dmd.source == "kafka":
        window = f" logged from {dmd.since or 'the start'} to {dmd.until or 'the end'}"
        return f"kafka topic {settings.kafka.topics.frames}{window}"
    if dmd.folder is None:
        raise ConfigError(f"dmd.source is {dmd.source}: set dmd.folder (or --folder)")
    # checked before the models load, so a wrong folder costs a second, not a model load
    listing = dmd.folder / ("labels.csv" if dmd.source == "images" else "clips.csv")
    if not listing.is_file():
        raise ConfigError(f"{listing} not found: dmd.source {dmd.source} reads a folder with {listing.name}")
    if dmd.source == "images":
        limit = f", first {dmd.limit_per_split} per split" if dmd.limit_per_split else ""
        copies = f", {dmd.augment} augmented copies of each train / val image" if dmd.augment else ""
        return f"image folder {dmd.folder.resolve()}{limit}{copies}"
    return f"video folder {dmd.folder.resolve()} at {dmd.video_fps} fps"


async def replay_items(settings: Settings) -> AsyncIterator[ReplayItem]:
    dmd = settings.dmd
    if dmd.source == "kafka":
        index = await read_log_index(settings)
        async for item in kafka_items(settings, index, dmd.since, dmd.until):
            yield item
        return
    assert dmd.folder is not None  # checked by source_description
    if dmd.source == "images":
        items = with_augmented_copies(image_folder_items(dmd.folder, dmd.limit_per_split), dmd.augment, dmd.seed)
    else:
        items = video_folder_items(dmd.folder, dmd.video_fps, settings.edge.clip_frames, settings.edge.clip_seconds)
    async for item in as_async(items):
        yield item


def run_replay(
    settings: Settings, edge_model: EdgeModel | None = None, cloud_model: CloudModel | None = None
) -> ReplaySummary:
    dmd = settings.dmd
    source = source_description(settings)
    if not dmd.run_cloud_model and dmd.source != "kafka":
        raise ConfigError(f"a {dmd.source} folder has no logged cloud verdicts: dmd.run_cloud_model must be true")
    edge_model = edge_model or load_edge_model(settings)
    # without the cloud model only frames with a logged cloud verdict can become rows
    cloud_model = (cloud_model or load_cloud_model(settings)) if dmd.run_cloud_model else None
    workdir = Workdir(dmd.workdir)
    summary = asyncio.run(replay(replay_items(settings), settings, edge_model, cloud_model, workdir.dataset, source))
    export_paper_json(load_dataset(workdir.dataset), workdir.paper_json)
    workdir.replay_summary.write_text(
        json.dumps({**asdict(summary), "exploration_share": summary.exploration_share}, indent=2)
    )
    return summary


def read_replay_summary(workdir: Workdir) -> ReplaySummary | None:
    if not workdir.replay_summary.is_file():
        return None
    raw = json.loads(workdir.replay_summary.read_text())
    raw.pop("exploration_share")
    raw["logged_reasons"] = Counter(raw["logged_reasons"])
    return ReplaySummary(**raw)


def split_dataset(settings: Settings) -> DmdData:
    dmd = settings.dmd
    history = history_length(dmd.switcher_inputs, dmd.switcher_history)
    data = with_history(load_dataset(Workdir(dmd.workdir).dataset), history)
    data = assign_missing_splits(data, dmd.val_share, dmd.test_share)
    return switcher_splits_from_val(data, dmd.val_share, dmd.seed) if dmd.switcher_split == "val" else data


def run_train(settings: Settings) -> TrainingReport:
    data = split_dataset(settings)
    switcher, report = train_switcher(data.split("train"), data.split("val"), settings.dmd)
    save_trained(Workdir(settings.dmd.workdir).switcher, switcher, report)
    return report


def run_threshold(settings: Settings) -> ThresholdChoice:
    workdir = Workdir(settings.dmd.workdir)
    train = split_dataset(settings).split("train")
    switcher, _ = load_trained(workdir.switcher)
    scores = agreement_scores(switcher, train)
    outcomes = Outcomes.of(train)
    if settings.dmd.target_offload_share is None:
        choice = bucket_threshold(scores, outcomes, settings.dmd.buckets)
    else:
        choice = budget_threshold(scores, outcomes, settings.dmd.target_offload_share)
    workdir.threshold.write_text(json.dumps(asdict(choice), indent=2))
    return choice


def read_threshold(workdir: Workdir) -> ThresholdChoice:
    if not workdir.threshold.is_file():
        raise ConfigError(f"no threshold in {workdir.threshold}: run `fallwatch dmd threshold` first")
    return ThresholdChoice(**json.loads(workdir.threshold.read_text()))


@dataclass(frozen=True)
class EvaluationOutput:
    evaluation: Evaluation
    report_md: Path
    report_json: Path
    plots: list[Path]


def run_evaluate(settings: Settings) -> EvaluationOutput:
    workdir = Workdir(settings.dmd.workdir)
    data = split_dataset(settings)
    test = data.split("test")
    if not test.rows:
        raise ConfigError("the test split is empty: nothing to evaluate on (dmd.test_share, or split=test)")
    switcher, training = load_trained(workdir.switcher)
    choice = read_threshold(workdir)
    evaluation = evaluate(data.split("train"), test, switcher, choice.threshold, settings.dmd)
    plots = write_plots(evaluation, workdir.report)
    replay_summary = read_replay_summary(workdir)
    report_md, report_json = write_report(
        workdir.report,
        markdown_report(data, training, choice, evaluation, plots, replay_summary, settings.dmd.switcher_split),
        json_report(data, training, choice, evaluation, replay_summary),
    )
    return EvaluationOutput(evaluation, report_md, report_json, plots)


def run_publish(settings: Settings) -> Path:
    workdir = Workdir(settings.dmd.workdir)
    data = split_dataset(settings)
    switcher, training = load_trained(workdir.switcher)
    choice = read_threshold(workdir)
    evaluation = evaluate(data.split("train"), data.split("test"), switcher, choice.threshold, settings.dmd)
    return publish(settings, data.manifest, switcher, choice, training, evaluation)
