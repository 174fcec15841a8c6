"""Offline and live agree: the same clips through the real services give the per-clip outcome `eval` gives.

The clips stream as cameras through the real producer, edge worker, cloud worker (in this process) and
alerting service (`python -m alerting`) on the real Kafka and Redis. The model pair is the tiny one of
the real classes, made deterministic and decisive: the edge's answer head and the switcher's last layer
are scaled up and centred on these clips, so answers vary from frame to frame by a wide margin, and every
decision threshold sits in a wide gap between the answers, where float noise cannot move a frame across.
The policy is the switcher at its threshold, so some frames are answered at the edge and others by the
cloud. `eval` replays the same policy; every frame, verdict, alert and person-down change must match.
One camera is 16:9 beside 4:3 ones, so the edge worker's batches mix frame sizes.
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import ViltForQuestionAnswering

from cloud_workers.loading import load_cloud_model
from cloud_workers.service import CloudWorker
from core.settings import CameraSettings, Settings
from dmd_offline.clip_outputs import CLIP_START, ClipOutputs, LazyModels, camera_id_for, clip_outputs
from dmd_offline.clips import read_labelled_clips
from dmd_offline.event_replay import Scores, policies, replay
from dmd_offline.scoring import ClipScore, score_clip
from edge_workers.model import load_edge_model
from edge_workers.service import EdgeWorker
from edge_workers.switcher import Switcher, latest_version, load_switcher, save_switcher
from fallwatch.devkit.models import ModelPaths
from producers.service import run_producers
from schemas import FallEvent, Frame, PersonDown, Verdict
from tests.alerting_helpers import wait_until_consumed
from tests.conftest import consume_until, read_all, running, service_process, settings_for, write_video

SPREAD = 3.0  # the scaled logits' standard deviation over the clips' frames
MIN_GAP = 1e-2  # a threshold this far from every answer cannot be crossed by float noise


def gap_threshold(values: np.ndarray) -> float:
    """The middle of the widest gap between the sorted values in their middle third."""
    ordered = np.sort(values)
    low, high = len(ordered) // 3, 2 * len(ordered) // 3
    index = low + int(np.argmax(np.diff(ordered[low : high + 1])))
    gap = ordered[index + 1] - ordered[index]
    assert gap > MIN_GAP, f"no wide gap between the answers {ordered}"
    return float((ordered[index] + ordered[index + 1]) / 2)


def centred_scale(linear: torch.nn.Linear, rows: list[int], inputs: torch.Tensor) -> None:
    """Make the margin of `rows[0]`'s logit over `rows[1]`'s (or the logit itself) spread by SPREAD on `inputs`,
    centred at its median."""
    with torch.no_grad():
        margins = inputs @ linear.weight[rows[0]] - (inputs @ linear.weight[rows[1]] if len(rows) > 1 else 0.0)
        linear.weight[rows] *= SPREAD / float(margins.std())
        linear.bias[rows] = 0.0
        linear.bias[rows[0]] = -float(margins.median()) * SPREAD / float(margins.std())


def decisive_pair(tiny: ModelPaths, directory: Path, outputs: list[ClipOutputs]) -> ModelPaths:
    """A copy of the tiny pair whose edge answers and switcher scores spread widely over these clips' frames."""
    pair = ModelPaths(directory / "edge-vilt", directory / "cloud-llava", directory / "switchers")
    shutil.copytree(tiny.edge, pair.edge)
    shutil.copytree(tiny.cloud, pair.cloud)
    hidden = torch.from_numpy(np.concatenate([clip.hidden for clip in outputs]))
    model = ViltForQuestionAnswering.from_pretrained(pair.edge)
    label2id = model.config.label2id
    centred_scale(model.classifier[-1], [label2id["yes"], label2id["no"]], hidden)
    model.save_pretrained(pair.edge)
    newest = latest_version(tiny.switcher_registry)
    assert newest is not None
    switcher, metadata = load_switcher(newest)
    with torch.no_grad():
        switcher.eval()
        penultimate = switcher.layers[:-1](hidden)
    centred_scale(switcher.layers[-1], [0], penultimate)
    save_switcher(pair.switcher_registry, switcher, metadata.model_copy(update={"edge_model": str(pair.edge)}))
    return pair


def offline_outputs(settings: Settings, folder: Path) -> list[ClipOutputs]:
    models = LazyModels(lambda: load_edge_model(settings), lambda: load_cloud_model(settings))
    return clip_outputs(settings, folder, read_labelled_clips(folder), models)[0]


def agreement_settings(stack_state, tmp_path: Path, pair: ModelPaths, folder: Path) -> Settings:
    sections = pair.settings_sections()
    # the cloud answers in time, offline and live: nothing hangs on how loaded this machine is
    sections["edge"].update(cloud_deadline_s=600.0, batch_size=4)
    sections["cloud"].update(num_frames=4, batch_size=4)
    cameras = [
        CameraSettings(
            id=camera_id_for(clip.file), room=camera_id_for(clip.file), url=str(folder / clip.file), realtime=False
        ).model_dump()
        for clip in read_labelled_clips(folder)
    ]
    settings = settings_for(
        stack_state,
        tmp_path,
        producers={"cameras": cameras},
        alerting={"k": 2, "n": 3, "down_for_s": 1.0, "up_after_s": 1.0, "cloud_wait_s": 600.0, "tick_s": 0.2},
        eval={"cache_dir": str(tmp_path / "cache"), "bootstrap": 0},
        **sections,
    )
    return settings


async def stream_live(settings: Settings) -> tuple[list[Frame], list[Verdict]]:
    published = await run_producers(settings, asyncio.Event())
    total = sum(published.values())
    topics = settings.kafka.topics
    async with (
        running(EdgeWorker(settings, load_edge_model(settings))),
        running(CloudWorker(settings, load_cloud_model(settings))),
    ):
        verdicts = await consume_until(
            settings, topics.verdicts, Verdict, lambda got: len({v.frame_id for v in got if v.final}) >= total, 300
        )
    frames = await consume_until(settings, topics.frames, Frame, lambda got: len(got) >= total)
    return frames, verdicts


def with_a_wide_camera(drawn_clips: Path, folder: Path) -> Path:
    """The drawn clips and a 16:9 one beside their 4:3 ones, as a facility's cameras differ: the edge
    worker's batches mix the two sizes, and each frame must get the answer eval gives its clip alone."""
    shutil.copytree(drawn_clips, folder)

    def bending(image: np.ndarray, index: int) -> None:
        top = 60 if index < 15 else 110
        cv2.rectangle(image, (200 + 2 * index, top), (240 + 2 * index, 200), (170, 190, 200), -1)

    write_video(folder / "bends-wide.mp4", 40, bending, width=426)
    with (folder / "clips.csv").open("a") as clips:
        clips.write("bends-wide.mp4,no_fall,\n")
    return folder


def test_eval_gives_the_per_clip_outcome_of_the_live_services(
    stack_state, tmp_path: Path, tiny_models: ModelPaths, drawn_clips: Path
) -> None:
    clips = with_a_wide_camera(drawn_clips, tmp_path / "clips")
    probe = agreement_settings(stack_state, tmp_path / "probe", tiny_models, clips)
    pair = decisive_pair(tiny_models, tmp_path / "pair", offline_outputs(probe, clips))
    settings = agreement_settings(stack_state, tmp_path, pair, clips)
    outputs = offline_outputs(settings, clips)
    newest = latest_version(pair.switcher_registry)
    assert newest is not None
    switcher: Switcher = load_switcher(newest)[0]
    settings.edge.decision_threshold = gap_threshold(np.concatenate([clip.edge_p for clip in outputs]))
    settings.cloud.decision_threshold = gap_threshold(np.concatenate([clip.cloud_p for clip in outputs]))
    scores = Scores.of(outputs, switcher, settings.eval.seed)
    settings.edge.switcher_threshold = gap_threshold(np.concatenate(scores.by_family["DMD"]))

    # offline: the switcher at its threshold, as the edge worker routes
    policy = next(p for p in policies(scores, settings.edge.switcher_threshold, []) if p.family == "DMD")
    runs = replay(outputs, scores, policy, settings)

    # live: the same clips as cameras through every service
    with service_process("alerting", settings, tmp_path):
        frames, verdicts = asyncio.run(stream_live(settings))
        asyncio.run(wait_until_consumed(settings, timeout_s=120))
        events = asyncio.run(read_all(settings, settings.kafka.topics.fall_events, FallEvent))
        changes = asyncio.run(read_all(settings, settings.kafka.topics.person_down, PersonDown))

    offloaded = {v.frame_id for v in verdicts if not v.final}
    assert 0 < len(offloaded) < len(frames), "some frames go to the cloud, some stay at the edge"
    alerted = 0
    for clip, run in zip(outputs, runs, strict=True):
        camera = clip.camera_id
        live_frames = sorted((f for f in frames if f.camera_id == camera), key=lambda f: f.seq)
        start: datetime = live_frames[0].captured_at
        positions = [(f.captured_at - start).total_seconds() for f in live_frames]
        assert np.allclose(positions, clip.position_s, atol=1e-3), f"{camera}: the producer's frames"

        finals = {v.frame_id: v for v in verdicts if v.camera_id == camera and v.final}
        live = [finals[f.frame_id] for f in live_frames]
        assert [v.source == "cloud" for v in live] == [i in run.cloud_frames for i in range(clip.frames)], camera
        assert [v.decision for v in live] == list(run.final_decisions()), f"{camera}: the final verdicts"
        expected_p = np.where([v.source == "cloud" for v in live], clip.cloud_p, clip.edge_p)
        assert np.allclose([v.fall_probability for v in live], expected_p, atol=1e-3), camera

        opened = [e for e in events if e.camera_id == camera and e.state == "open"]
        live_score = score_clip(clip.clip.is_fall, clip.clip.fall_start_s, start, opened[0] if opened else None)
        offline_score = score_clip(clip.clip.is_fall, clip.clip.fall_start_s, CLIP_START, run.first_alert)
        assert same_outcome(live_score, offline_score), f"{camera}: live {live_score}, eval {offline_score}"
        assert len(opened) == len([a for a in run.alerts if a.state == "open"])
        alerted += bool(opened)

        live_changes = [
            (c.down, round((c.changed_at - start).total_seconds(), 3)) for c in changes if c.camera_id == camera
        ]
        offline_changes = [(c.down, round((c.changed_at - CLIP_START).total_seconds(), 3)) for c in run.person_down]
        assert live_changes == offline_changes, f"{camera}: person-down changes"
    assert alerted > 0, "at least one clip raised an alert, so the comparison covers the rule's whole path"


def same_outcome(live: ClipScore, offline: ClipScore) -> bool:
    """The same judgement at the same capture times (when alerting sent it differs: live is wall clock)."""

    def key(score: ClipScore) -> tuple[object, ...]:
        opened = None if score.opened_s is None else round(score.opened_s, 3)
        first = None if score.first_fall_s is None else round(score.first_fall_s, 3)
        return score.outcome, score.early, opened, first

    return key(live) == key(offline)
