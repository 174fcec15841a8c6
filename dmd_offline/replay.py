"""Replay inputs through both models and write the DMD data set (paper A.2).

For every input run the edge model (fall probability + last hidden layer) and get
the large model's answer on the input's clip: the cloud verdict logged for that
frame when there is one (a cache: a replay never pays for the GPU twice), the
cloud model otherwise. `label = 1` when the two models' fall predictions agree.
Rows go to NPZ shards (`dmd_offline.dataset`); an interrupted replay resumes
where its last whole shard ended.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cloud_workers.energy import CostMeter, open_energy_meter
from cloud_workers.model import CloudModel
from core.checkpoints import local_checkpoint_sha256
from core.locks import Held, file_lock
from core.settings import ConfigError, Settings
from dmd_offline.dataset import UNKNOWN, DatasetManifest, DmdRow, done_input_ids, write_manifest, write_shard
from dmd_offline.sources import ReplayItem
from edge_workers.model import EdgeModel

log = logging.getLogger(__name__)

REPLAY_LOCK = ".replay.lock"  # in the data set's directory, held while a replay writes to it


@dataclass
class ReplaySummary:
    rows: int = 0  # written by this run
    resumed: int = 0  # already in the data set from an earlier, interrupted run
    no_large_answer: int = 0  # no logged cloud verdict and the cloud model was not run
    agreements: int = 0
    large_logged: int = 0  # large answers taken from logged cloud verdicts
    large_computed: int = 0  # large answers computed by this replay
    ground_truth_known: int = 0
    logged_reasons: Counter[str] = field(default_factory=Counter)  # why the logged cloud answers were offloaded
    warnings: list[str] = field(default_factory=list)

    @property
    def exploration_share(self) -> float | None:
        """Share of the logged cloud answers that came from exploration (unbiased) rather than the switcher."""
        total = sum(self.logged_reasons.values())
        return self.logged_reasons["exploration"] / total if total else None

    def describe(self) -> str:
        exploration = self.exploration_share
        lines = [
            f"{self.rows} DMD rows written ({self.agreements} agreements), {self.resumed} already there",
            f"large-model answers: {self.large_logged} from logged cloud verdicts (cache), "
            f"{self.large_computed} computed, {self.no_large_answer} inputs without one skipped",
            f"ground truth known for {self.ground_truth_known} rows",
        ]
        if exploration is not None:
            lines.append(
                f"exploration share of the logged cloud answers: {exploration:.1%} ({dict(self.logged_reasons)})"
            )
        return "\n".join(lines + [f"WARNING: {warning}" for warning in self.warnings])


class DatasetWriter:
    """Runs the models a batch at a time and appends shards."""

    def __init__(
        self,
        settings: Settings,
        edge_model: EdgeModel,
        cloud_model: CloudModel | None,
        directory: Path,
        summary: ReplaySummary,
    ) -> None:
        self.settings = settings
        self.edge_model = edge_model
        self.cloud_model = cloud_model
        self.directory = directory
        self.summary = summary
        self.rows: list[DmdRow] = []
        self.hidden: list[np.ndarray] = []
        # the cloud workers' meters: NVML on a GPU, RAPL on a CPU where readable, else no energy (NaN)
        cpu = torch.device("cpu")
        self.edge_costs = CostMeter(cpu, open_energy_meter(cpu))
        self.cloud_costs = (
            CostMeter(cloud_model.device, open_energy_meter(cloud_model.device, cloud_model.gpu_indices))
            if cloud_model is not None
            else None
        )

    def run_batch(self, batch: list[ReplayItem]) -> None:
        edge_p, hidden, edge_ms, edge_j = self.edge_answers(batch)
        large_p, large_ms, large_j = self.large_answers(batch)
        for index, item in enumerate(batch):
            if np.isnan(large_p[index]):
                self.summary.no_large_answer += 1
                continue
            small = int(edge_p[index] >= self.settings.edge.decision_threshold)
            large = int(large_p[index] >= self.settings.cloud.decision_threshold)
            logged = item.logged
            row = DmdRow(
                input_id=item.input_id,
                image_path=item.image_path,
                group=item.group,
                split=item.split,
                order_key=item.order_key,
                small_fall_probability=float(edge_p[index]),
                large_fall_probability=float(large_p[index]),
                small_prediction=small,
                large_prediction=large,
                label=int(small == large),
                ground_truth=UNKNOWN if item.ground_truth is None else item.ground_truth,
                large_source="logged" if logged else "computed",
                offload_reason=logged.offload_reason if logged else "",
                small_time_ms=edge_ms,
                large_time_ms=float(large_ms[index]),
                small_energy_j=edge_j,
                large_energy_j=float(large_j[index]),
            )
            self.rows.append(row)
            self.hidden.append(hidden[index])
            self.summary.rows += 1
            self.summary.agreements += row.label
            self.summary.ground_truth_known += row.ground_truth != UNKNOWN
            if logged:
                self.summary.large_logged += 1
                self.summary.logged_reasons[logged.offload_reason or "unknown"] += 1
            else:
                self.summary.large_computed += 1
        if len(self.rows) >= self.settings.dmd.shard_size:
            self.flush()

    def edge_answers(self, batch: list[ReplayItem]) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The edge model's P(fall), hidden vectors, time and energy per frame (NaN when not measurable)."""
        started = time.perf_counter()
        self.edge_costs.start()
        # ViLT samples image patches at random: seed so a replay (and a resumed one) is reproducible
        torch.manual_seed(self.settings.dmd.seed)
        output = self.edge_model.predict([item.image_rgb for item in batch])
        per_frame_ms = (time.perf_counter() - started) * 1000 / len(batch)
        energy_j = self.edge_costs.stop().energy_j
        energy = np.nan if energy_j is None else energy_j / len(batch)
        return output.fall_probability, output.hidden, per_frame_ms, energy

    def large_answers(self, batch: list[ReplayItem]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The large model's P(fall), time and energy per frame: logged where logged, else computed (or NaN)."""
        probabilities = np.full(len(batch), np.nan)
        times = np.full(len(batch), np.nan)
        energies = np.full(len(batch), np.nan)
        to_compute: list[int] = []
        for index, item in enumerate(batch):
            if item.logged is not None:
                probabilities[index] = item.logged.fall_probability
                times[index] = item.logged.time_ms
                energies[index] = np.nan if item.logged.energy_j is None else item.logged.energy_j
            else:
                to_compute.append(index)
        if to_compute and self.cloud_model is not None and self.cloud_costs is not None:
            clips = [batch[i].clip() for i in to_compute]
            started = time.perf_counter()
            self.cloud_costs.start()
            probabilities[to_compute] = self.cloud_model.predict(clips)
            energy_j = self.cloud_costs.stop().energy_j
            times[to_compute] = (time.perf_counter() - started) * 1000 / len(to_compute)
            energies[to_compute] = np.nan if energy_j is None else energy_j / len(to_compute)
        return probabilities, times, energies

    def flush(self) -> None:
        if self.rows:
            write_shard(self.directory, self.rows, np.stack(self.hidden))
            self.rows.clear()
            self.hidden.clear()


async def replay(
    items: AsyncIterable[ReplayItem],
    settings: Settings,
    edge_model: EdgeModel,
    cloud_model: CloudModel | None,
    directory: Path,
    source: str,
    total: int | None = None,
) -> ReplaySummary:
    """Append one DMD row per input not yet in `directory`; `cloud_model=None` uses logged answers only."""
    with only_replay_into(directory):
        write_manifest(
            directory,
            DatasetManifest(
                source=source,
                edge_model=edge_model.name,
                edge_model_revision=settings.edge.revision,
                edge_model_sha256=local_checkpoint_sha256(edge_model.name),
                cloud_model=cloud_model.name if cloud_model is not None else settings.cloud.model,
                hidden_size=edge_model.hidden_size,
            ),
        )
        done = done_input_ids(directory)
        summary = ReplaySummary()
        writer = DatasetWriter(settings, edge_model, cloud_model, directory, summary)
        batch: list[ReplayItem] = []
        with tqdm(total=total, unit="input", desc="replay", disable=None) as progress:
            async for item in items:
                progress.update(1)
                if item.input_id in done:
                    summary.resumed += 1
                    continue
                batch.append(item)
                if len(batch) >= settings.dmd.batch_size:
                    writer.run_batch(batch)
                    batch.clear()
            if batch:
                writer.run_batch(batch)
            writer.flush()
        summary.warnings.extend(bias_warnings(summary, cloud_model is None))
        for warning in summary.warnings:
            log.warning("%s", warning)
        return summary


@contextmanager
def only_replay_into(directory: Path) -> Iterator[None]:
    """One replay at a time per data set: two would pick the same shard names and replay the same inputs."""
    try:
        with file_lock(directory / REPLAY_LOCK, wait=False):
            yield
    except Held:
        raise ConfigError(
            f"another `dmd replay` is writing to {directory}: wait for it to end, or give this one another --workdir"
        ) from None


def bias_warnings(summary: ReplaySummary, logged_only: bool) -> list[str]:
    warnings = []
    if summary.large_logged and summary.exploration_share == 0:
        warnings.append(
            "every logged cloud answer comes from a frame the switcher offloaded (no exploration): "
            "logged answers alone are a biased sample of traffic; turn on the edge's exploration rate"
        )
    if logged_only and summary.no_large_answer:
        warnings.append(
            f"{summary.no_large_answer} inputs had no logged cloud answer and the cloud model was not run: "
            "the data set holds only offloaded frames, a biased sample"
        )
    return warnings
