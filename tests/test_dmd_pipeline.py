"""The DMD steps on tiny real-class models and small real data: image-folder replay (resumable),
replay of logged Kafka traffic with the cloud-verdict cache and caregiver labels, and `fallwatch dmd run`."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from redis import Redis

from cloud_workers.model import Clip, LlavaVideoCloudModel
from core.images import encode_jpeg
from core.kafka_io import make_producer, send
from core.locks import file_lock
from core.settings import ConfigError, Settings
from dmd_offline.dataset import load_dataset, shard_paths
from dmd_offline.pipeline import as_async, run_evaluate, run_publish, run_replay, run_threshold, run_train
from dmd_offline.replay import REPLAY_LOCK, replay
from dmd_offline.sources import ReplayItem, image_folder_items, video_folder_items
from edge_workers.model import ViltEdgeModel, load_edge_model
from edge_workers.registry import SwitcherRegistry
from edge_workers.switcher import latest_version, load_switcher
from fallwatch.devkit.models import ModelPaths
from fallwatch.stack import free_port
from schemas import Frame, Label, OperatorEvent, Verdict
from tests.conftest import SHARED_DATASETS, consume_until, run_fallwatch, settings_for, write_config

REPO = Path(__file__).resolve().parents[1]
FALLS_FALLACTION = SHARED_DATASETS / "falls-fallaction"
PER_SPLIT_AND_CLASS = 5  # 30 images: 10 per split, both classes in each


class CountingCloudModel(LlavaVideoCloudModel):
    """The real tiny LLaVA-NeXT-Video model, remembering the length of every clip it was asked about."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.clip_lengths: list[int] = []

    def predict(self, clips: list[Clip]) -> np.ndarray:
        self.clip_lengths.extend(len(clip) for clip in clips)
        return super().predict(clips)


def write_synthetic_folder(folder: Path) -> None:
    """The falls-fallaction layout with drawn images: an upright figure (no fall) or a lying one (fall)."""
    rows, meta = [], []
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("fall", "no_fall"):
            for index in range(PER_SPLIT_AND_CLASS):
                image = rng.integers(0, 60, (240, 320, 3), dtype=np.uint8)
                x, y = int(rng.integers(40, 200)), int(rng.integers(40, 120))
                size = (120, 40) if label == "fall" else (40, 120)
                cv2.rectangle(image, (x, y), (x + size[0], y + size[1]), (200, 170, 150), -1)
                name = f"images/{split}_{label}_{index}.jpg"
                (folder / "images").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / name), image)
                rows.append({"image": name, "label": label, "split": split, "source_path": "synthetic"})
                meta.append({"image": name, "original_classes": label, "source_group": f"synthetic_{label}"})
    write_csv(folder / "labels.csv", rows)
    write_csv(folder / "meta.csv", meta)


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def copy_real_subset(source: Path, folder: Path) -> None:
    """The first images of each split and class of the real data set, in its own layout."""
    with (source / "labels.csv").open(newline="") as handle:
        labels = list(csv.DictReader(handle))
    with (source / "meta.csv").open(newline="") as handle:
        meta = {row["image"]: row for row in csv.DictReader(handle)}
    chosen = []
    for split in ("train", "val", "test"):
        for label in ("fall", "no_fall"):
            chosen += [row for row in labels if row["split"] == split and row["label"] == label][:PER_SPLIT_AND_CLASS]
    (folder / "images").mkdir(parents=True)
    for row in chosen:
        shutil.copy(source / row["image"], folder / row["image"])
    write_csv(folder / "labels.csv", chosen)
    write_csv(folder / "meta.csv", [meta[row["image"]] for row in chosen])


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("falls")
    if (FALLS_FALLACTION / "labels.csv").is_file():
        copy_real_subset(FALLS_FALLACTION, folder)
    else:
        write_synthetic_folder(folder)
    return folder


def tiny_settings(tiny: ModelPaths, tmp_path: Path, **dmd: object) -> Settings:
    sections = tiny.settings_sections()
    sections["cloud"]["num_frames"] = 4  # type: ignore[index]
    return Settings(**sections, dmd={"workdir": str(tmp_path / "work"), **dmd})


def cloud_model(settings: Settings) -> CountingCloudModel:
    model = CountingCloudModel.from_pretrained(settings.cloud.model, settings.cloud.question, num_frames=4)
    assert isinstance(model, CountingCloudModel)
    return model


async def interrupted_after(items: AsyncIterator[ReplayItem], count: int) -> AsyncIterator[ReplayItem]:
    seen = 0
    async for item in items:
        if seen == count:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a replay
        seen += 1
        yield item


def test_image_folder_replay_resumes_after_an_interruption(tiny_models, labelled_folder: Path, tmp_path: Path):
    settings = tiny_settings(tiny_models, tmp_path, batch_size=2, shard_size=4)
    edge = load_edge_model(settings)
    cloud = cloud_model(settings)
    directory = tmp_path / "interrupted"

    def items() -> AsyncIterator[ReplayItem]:
        return as_async(image_folder_items(labelled_folder))

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(replay(interrupted_after(items(), 11), settings, edge, cloud, directory, "folder"))
    # batches of 2, shards of 4: the first 8 rows are in two whole shards, rows 9–10 were in memory
    assert len(shard_paths(directory)) == 2
    summary = asyncio.run(replay(items(), settings, edge, cloud, directory, "folder"))
    assert summary.resumed == 8 and summary.rows == 22
    assert summary.large_computed == 22 and summary.large_logged == 0
    assert summary.ground_truth_known == 22

    uninterrupted = tmp_path / "whole"
    asyncio.run(replay(items(), settings, edge, cloud, uninterrupted, "folder"))
    resumed, whole = load_dataset(directory), load_dataset(uninterrupted)
    with (labelled_folder / "labels.csv").open(newline="") as handle:
        listed = list(csv.DictReader(handle))
    assert [row.input_id for row in resumed.rows] == [row["image"] for row in listed], "deterministic order"
    assert [row.split for row in resumed.rows] == [row["split"] for row in listed]
    assert [row.ground_truth for row in resumed.rows] == [int(row["label"] == "fall") for row in listed]
    assert all(row.group for row in resumed.rows), "meta.csv's source_group is kept"
    assert resumed.hidden.shape == (30, edge.hidden_size)
    np.testing.assert_allclose(resumed.hidden, whole.hidden, rtol=1e-5, atol=1e-5)
    assert [row.label for row in resumed.rows] == [row.label for row in whole.rows]
    for row in resumed.rows:
        assert row.label == int(row.small_prediction == row.large_prediction)


def frame_at(camera: str, start: datetime, seq: int, image_path: Path) -> Frame:
    image = cv2.imread(str(image_path))
    captured_at = start + timedelta(seconds=0.5 * seq)
    jpeg = encode_jpeg(image)
    return Frame(
        frame_id=Frame.make_id(camera, captured_at, seq),
        camera_id=camera,
        room="101",
        seq=seq,
        captured_at=captured_at,
        width=image.shape[1],
        height=image.shape[0],
        jpeg=jpeg,
    )


def logged_cloud_verdict(frame: Frame, probability: float, reason: str) -> Verdict:
    return Verdict.for_frame(
        frame,
        source="cloud",
        final=True,
        fall_probability=probability,
        decision=probability >= 0.5,
        switcher_score=0.2,
        offload_reason=reason,
        edge_model="edge",
        cloud_model="cloud",
        timings_ms={"model_per_request": 777.0},
        energy_j=42.0,
    )


async def publish_traffic(settings: Settings, frames: list[Frame], verdicts: list[Verdict], labels: list[Label]):
    producer = make_producer(settings)
    await producer.start()
    topics = settings.kafka.topics
    try:
        acks = [await send(producer, topics.frames, frame.camera_id, frame) for frame in frames]
        acks.append(await producer.send(topics.frames, key=b"cam-a", value=b"not a frame"))
        acks += [await send(producer, topics.verdicts, verdict.camera_id, verdict) for verdict in verdicts]
        acks += [await send(producer, topics.labels, label.camera_id, label) for label in labels]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def test_a_second_replay_into_the_data_set_one_is_writing_is_refused(
    tiny_models, labelled_folder: Path, tmp_path: Path
) -> None:
    """Two replays into one data set would pick the same shard names and replay the same inputs twice."""
    settings = tiny_settings(tiny_models, tmp_path)
    edge, cloud = load_edge_model(settings), cloud_model(settings)
    directory = tmp_path / "busy"
    items = as_async(image_folder_items(labelled_folder))
    with file_lock(directory / REPLAY_LOCK), pytest.raises(ConfigError) as refusal:  # the first one, running
        asyncio.run(replay(items, settings, edge, cloud, directory, "folder"))
    assert str(refusal.value) == (
        f"another `dmd replay` is writing to {directory}: wait for it to end, or give this one another --workdir"
    )
    assert shard_paths(directory) == [] and cloud.clip_lengths == [], "nothing replayed, no cloud answer paid for"


def test_an_edge_model_changed_in_place_since_the_replay_is_not_resumed_nor_published(
    tiny_models, labelled_folder: Path, tmp_path: Path
) -> None:
    """The switcher learns the edge model's hidden vectors; published after its files changed, it would be bound
    to the new files and served on vectors it never saw."""
    edge = tmp_path / "edge-vilt"
    shutil.copytree(tiny_models.edge, edge)
    settings = tiny_settings(tiny_models, tmp_path, source="images", folder=str(labelled_folder))
    settings.edge.model = str(edge)
    settings.edge.switcher_registry = tmp_path / "registry"
    settings.edge.registry_announce_key = ""
    run_replay(settings)
    run_train(settings)
    run_threshold(settings)
    run_evaluate(settings)
    config = edge / "config.json"
    config.write_text(config.read_text().replace("{", '{"retrained": true,', 1))  # trained again, in place
    with pytest.raises(ConfigError, match=f"the files of edge model {edge} changed since the replay"):
        run_publish(settings)
    assert not (tmp_path / "registry").exists(), "nothing published"
    with pytest.raises(ConfigError, match=r"\(the edge model's files changed since\)"):
        run_replay(settings)


def test_kafka_replay_reuses_logged_cloud_verdicts_and_reads_labels(
    stack_state, tiny_models, labelled_folder: Path, tmp_path: Path
) -> None:
    sections = tiny_settings(tiny_models, tmp_path).model_dump(include={"edge", "cloud", "dmd"}, mode="json")
    settings = settings_for(stack_state, tmp_path, **sections)
    images = sorted((labelled_folder / "images").iterdir())[:12]
    start = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    frames = [
        frame_at(camera, start, seq, images[2 * seq + (camera == "cam-b")])
        for camera in ("cam-a", "cam-b")
        for seq in range(6)
    ]
    # logged cloud answers for 5 frames (one explored), distinctive probabilities no model would produce
    logged = {frames[i].frame_id: 0.123 + 0.01 * i for i in (1, 2, 4, 7, 8)}
    verdicts = [
        logged_cloud_verdict(frame, logged[frame.frame_id], "exploration" if i == 4 else "switcher")
        for i, frame in enumerate(frames)
        if frame.frame_id in logged
    ]
    verdicts.append(verdicts[0].model_copy(update={"source": "edge", "final": False, "fall_probability": 0.9}))
    label = Label(
        label_id="alert-1:true_fall",
        alert_id="alert-1",
        camera_id="cam-a",
        room="101",
        frame_ids=[frames[3].frame_id, frames[4].frame_id],
        verdict="true_fall",
        labelled_by="nurse",
    )
    asyncio.run(publish_traffic(settings, frames, verdicts, [label, label]))

    edge = load_edge_model(settings)
    cloud = cloud_model(settings)
    from dmd_offline.pipeline import replay_items

    directory = tmp_path / "kafka"
    summary = asyncio.run(replay(replay_items(settings), settings, edge, cloud, directory, "kafka"))

    assert summary.rows == 12, "the undecodable record is skipped, every frame replayed"
    assert summary.large_logged == 5 and summary.large_computed == 7
    assert len(cloud.clip_lengths) == 7, "the cloud model ran only for the frames without a logged verdict"
    assert summary.logged_reasons == {"switcher": 4, "exploration": 1}
    assert summary.exploration_share == pytest.approx(0.2)
    assert summary.ground_truth_known == 2
    data = load_dataset(directory)
    by_id = {row.input_id: row for row in data.rows}
    assert set(by_id) == {frame.frame_id for frame in frames}
    for frame_id, probability in logged.items():
        row = by_id[frame_id]
        assert row.large_source == "logged" and row.large_fall_probability == pytest.approx(probability)
        assert row.large_time_ms == 777.0 and row.large_energy_j == 42.0
    computed = [row for row in data.rows if row.large_source == "computed"]
    assert all(np.isnan(row.large_energy_j) and row.large_time_ms != 777.0 for row in computed)
    assert by_id[frames[3].frame_id].ground_truth == 1 and by_id[frames[4].frame_id].ground_truth == 1
    assert by_id[frames[0].frame_id].ground_truth == -1
    # clips are built as the edge builds them: the camera's frames so far, at most edge.clip_frames
    computed_seqs = [frame.seq for frame in frames if frame.frame_id not in logged]
    assert cloud.clip_lengths == [min(seq + 1, settings.edge.clip_frames) for seq in computed_seqs]
    assert [row.image_path.split("/")[1] for row in data.rows] == sorted(
        row.image_path.split("/")[1] for row in data.rows
    )

    # a second replay resumes: nothing is recomputed, nothing is paid for twice
    again = asyncio.run(replay(replay_items(settings), settings, edge, cloud, directory, "kafka"))
    assert again.resumed == 12 and again.rows == 0 and len(cloud.clip_lengths) == 7


def test_logged_only_replay_warns_about_the_biased_sample(stack_state, tiny_models, labelled_folder, tmp_path):
    sections = tiny_settings(tiny_models, tmp_path).model_dump(include={"edge", "cloud", "dmd"}, mode="json")
    settings = settings_for(stack_state, tmp_path, **sections)
    images = sorted((labelled_folder / "images").iterdir())[:4]
    start = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    frames = [frame_at("cam-a", start, seq, images[seq]) for seq in range(4)]
    logged_from = datetime.now(UTC) - timedelta(seconds=1)
    asyncio.run(publish_traffic(settings, frames, [logged_cloud_verdict(frames[1], 0.7, "switcher")], []))
    from dmd_offline.pipeline import replay_items

    edge = load_edge_model(settings)
    for window, name in (({"until": logged_from}, "before"), ({"since": logged_from + timedelta(hours=1)}, "after")):
        windowed = settings.model_copy(update={"dmd": settings.dmd.model_copy(update=window)})
        empty = asyncio.run(replay(replay_items(windowed), windowed, edge, None, tmp_path / name, "kafka"))
        assert empty.rows == empty.no_large_answer == 0, f"nothing was logged {name} the window"
    settings.dmd.since = logged_from
    summary = asyncio.run(replay(replay_items(settings), settings, edge, None, tmp_path / "logged-only", "kafka"))
    assert summary.rows == 1 and summary.no_large_answer == 3
    assert summary.exploration_share == 0.0
    assert any("biased sample" in warning and "exploration" in warning for warning in summary.warnings)
    assert any("only offloaded frames" in warning for warning in summary.warnings)


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return run_fallwatch(*args, env={"FALLWATCH_CONFIG": str(config)})


def test_dmd_run_replays_trains_evaluates_and_publishes(
    stack_state, tiny_models, labelled_folder: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    settings = tiny_settings(tiny_models, tmp_path)
    settings.edge.switcher_registry = registry
    settings.edge.registry_announce_key = f"test:{uuid.uuid4().hex}:announced"
    settings.redis.url = stack_state.redis_url
    settings.kafka = settings_for(stack_state, tmp_path).kafka  # this test's own operator-events topic
    config = tmp_path / "fallwatch.yaml"
    write_config(settings, config)
    workdir = tmp_path / "work"

    result = run_cli("dmd", "run", "--source", "images", "--folder", str(labelled_folder), config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[dmd run:" in result.stdout

    report = (workdir / "report" / "report.md").read_text()
    assert "| Model | F1 Score [95 % CI] | % Large Model | Time (s) | Energy (J) |" in report
    for name in ("small-only", "large-only", "uncertainty", "random", "DMD", "oracle"):
        assert f"| {name} |" in report
    payload = json.loads((workdir / "report" / "report.json").read_text())
    results = {r["name"]: r for r in payload["evaluation"]["results"]}
    assert results["large-only"]["share_large"] == 1.0 and results["small-only"]["share_large"] == 0.0
    assert payload["evaluation"]["reference"] == "ground truth"
    # the breakdown by meta.csv's source_group covers every test row, and the whole test curve is printed
    groups = payload["evaluation"]["groups"]
    assert sum(group["rows"] for group in groups) == payload["evaluation"]["rows"] == 10
    assert all(f"| {group['group']} | {group['rows']} |" in report for group in groups)
    assert "## F1 vs % deferred (test split)" in report
    for plot in ("f1_vs_deferred_train", "f1_vs_deferred_test", "time_vs_deferred"):
        assert (workdir / "report" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    paper = json.loads((workdir / "dmd.json").read_text())
    edge = ViltEdgeModel.from_pretrained(settings.edge.model, settings.edge.question)
    assert len(paper) == 30
    assert all(set(record) == {"image_path", "last_hidden_layer", "label"} for record in paper)
    assert all(len(record["last_hidden_layer"]) == edge.hidden_size for record in paper)

    newest = latest_version(registry)
    assert newest is not None
    _, metadata = load_switcher(newest)
    threshold = json.loads((workdir / "threshold.json").read_text())
    assert metadata.trained and metadata.threshold == threshold["threshold"]
    assert metadata.offload_policy["method"] == "bucket"
    assert metadata.metrics["test_f1_DMD"] == pytest.approx(results["DMD"]["f1"])
    # the edge worker's own registry accepts it for the edge model it runs
    registry_view = SwitcherRegistry(registry, edge.name, edge.hidden_size, poll_s=5.0, announce_key=None)
    assert registry_view.load_newest().metadata.version == metadata.version
    with Redis.from_url(stack_state.redis_url) as redis:  # announced to running edge workers
        assert redis.get(settings.edge.registry_announce_key) == metadata.version.encode()

    # budget mode on the same data: the threshold step alone, then publish a second version
    result = run_cli("dmd", "threshold", "--target-offload-share", "0.3", config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "threshold.json").read_text())["deferred_share"] == pytest.approx(0.3)
    published = run_cli("dmd", "publish", config=config)
    assert published.returncode == 0, published.stderr[-3000:]
    newest_again = latest_version(registry)
    assert newest_again is not None and newest_again != newest
    assert load_switcher(newest_again)[1].offload_policy["method"] == "budget"
    line = f"published switcher version {newest_again.name} in {registry}"
    assert line in published.stdout.splitlines()

    # each publish is an operator event too, with the command's line
    events = asyncio.run(consume_until(settings, settings.kafka.topics.operator_events, OperatorEvent,
                                       lambda m: len(m) >= 2))  # fmt: skip
    assert [(e.kind, e.service, e.version) for e in events] == [
        ("version_published", "dmd_offline", newest.name),
        ("version_published", "dmd_offline", newest_again.name),
    ]
    assert events[1].message == line

    # with Kafka and Redis gone, the version is still published; telling the operators is one attempt
    # and one warning, not a service's minute of retries
    settings.kafka.bootstrap_servers = f"localhost:{free_port()}"
    settings.redis.url = f"redis://localhost:{free_port()}/0"
    write_config(settings, config)
    offline = run_cli("dmd", "publish", config=config)
    assert offline.returncode == 0, offline.stderr[-3000:]
    newest_offline = latest_version(registry)
    assert newest_offline is not None and newest_offline.name not in (newest.name, newest_again.name)
    assert f"published switcher version {newest_offline.name} in {registry}" in offline.stdout.splitlines()
    assert "could not send 1 operator event(s)" in offline.stderr and "retry" not in offline.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dmd", "replay", "--source", "images", "--folder", "/nonexistent"), "/nonexistent/labels.csv not found"),
        (("dmd", "replay", "--source", "tapes"), "--source"),
        (("dmd", "train", "--workdir", "/nonexistent-dmd"), "no DMD data set in /nonexistent-dmd/dataset"),
    ],
)
def test_dmd_mistakes_get_one_readable_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    result = run_cli(*args, config=config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_switcher_no_worker_would_serve_is_not_published(tmp_path: Path) -> None:
    """With `edge.model_registry` set the workers serve its versions and never read `edge.switcher_registry`:
    `dmd run` and `dmd publish` refuse in one line, `dmd run` before it replays anything."""
    config = tmp_path / "pairs.yaml"
    workdir = tmp_path / "dmd"
    config.write_text(yaml.safe_dump({"edge": {"model_registry": str(tmp_path / "registry")},
                                      "dmd": {"workdir": str(workdir)}}))  # fmt: skip
    for args in (("dmd", "run"), ("dmd", "publish")):
        result = run_cli(*args, config=config)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: edge.model_registry is set ({tmp_path / 'registry'}): the edge workers serve its versions"
        ), result.stderr
    assert not workdir.exists(), "nothing replayed"


def test_python_dash_m_dmd_offline_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmd_offline", "replay", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0 and "--logged-only" in result.stdout


def test_annotated_video_folder_gives_frames_with_clips_and_per_frame_truth(clip_path: Path, tmp_path: Path):
    shutil.copy(clip_path, tmp_path / "clip.mp4")
    write_csv(tmp_path / "clips.csv", [{"file": "clip.mp4", "label": "fall", "fall_start_s": "1.0"}])
    items = list(video_folder_items(tmp_path, fps=2.0, clip_frames=3, clip_seconds=4.0))
    capture = cv2.VideoCapture(str(clip_path))
    duration_s = capture.get(cv2.CAP_PROP_FRAME_COUNT) / capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    assert abs(len(items) - duration_s * 2) <= 1, "sampled at 2 fps"
    times = [float(item.image_path.rsplit("#t=", 1)[1]) for item in items]
    assert [item.ground_truth for item in items] == [int(t >= 1.0) for t in times]
    assert [len(item.clip()) for item in items][:4] == [1, 2, 3, 3], "the preceding frames, at most clip_frames"
    assert all(item.image_rgb.dtype == np.uint8 and item.image_rgb.shape[2] == 3 for item in items)
    assert len({item.input_id for item in items}) == len(items)
