"""`fallwatch eval` on tiny real-class models and drawn videos: scoring, the cache, the policies, the command.

The agreement of `eval` with the live services is in test_eval_live_agreement.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud_workers.loading import load_cloud_model
from core.settings import ConfigError, Settings
from dmd_offline.clip_outputs import LazyModels
from dmd_offline.event_eval import EventEvaluation, run_event_eval
from dmd_offline.scoring import score_clip
from edge_workers.model import load_edge_model
from edge_workers.registry import PAIR_EDGE_DIR
from fallwatch.devkit.models import ModelPaths
from schemas import FallEvent
from tests.conftest import run_fallwatch, write_config
from tests.test_edge_worker_pairs import publish_version

START = datetime(2026, 1, 1, tzinfo=UTC)


def alert_at(opened_s: float, first_fall_s: float, sent_s: float) -> FallEvent:
    return FallEvent(
        alert_id="a",
        camera_id="cam",
        room="101",
        state="open",
        opened_at=START + timedelta(seconds=opened_s),
        updated_at=START + timedelta(seconds=sent_s),
        first_fall_at=START + timedelta(seconds=first_fall_s),
        confidence=0.9,
        evidence_frame_ids=["f1", "f2", "f3"],
        rule="3 of 5",
    )


def test_an_alert_before_the_fall_start_is_a_false_alarm_not_a_detection() -> None:
    early = score_clip(True, 2.0, START, alert_at(opened_s=1.5, first_fall_s=0.5, sent_s=2.6))
    assert (early.outcome, early.early, early.detected, early.false_alarm) == ("false alarm", True, False, True)
    assert early.time_to_alert_s is None, "a false alarm has no time to alert, even when it was sent after the fall"
    at_the_start = score_clip(True, 2.0, START, alert_at(opened_s=2.0, first_fall_s=1.0, sent_s=2.1))
    assert at_the_start.false_alarm, "no frame of the fall can have confirmed an alert at its very start"

    detected = score_clip(True, 2.0, START, alert_at(opened_s=3.0, first_fall_s=2.5, sent_s=3.4))
    assert detected.detected and detected.time_to_alert_s == pytest.approx(1.4), "fall start → sent"
    assert not detected.evidence_before_onset
    leaning = score_clip(True, 2.0, START, alert_at(opened_s=3.0, first_fall_s=1.0, sent_s=3.4))
    assert leaning.detected and leaning.evidence_before_onset

    assert score_clip(False, None, START, alert_at(1.0, 0.5, 1.1)).false_alarm
    assert score_clip(True, 2.0, START, None).outcome == "missed"
    assert score_clip(False, None, None, None).outcome == "no alert"


def eval_settings(tiny: ModelPaths, tmp_path: Path, **sections: object) -> Settings:
    models = tiny.settings_sections()
    return Settings(
        edge=models["edge"],
        cloud={**models["cloud"], "num_frames": 4},
        eval={"cache_dir": str(tmp_path / "cache"), "report_dir": str(tmp_path / "report"), "bootstrap": 50},
        **sections,
    )


def never(what: str) -> Callable[[], object]:
    def load() -> object:
        raise AssertionError(f"the {what} model was loaded: the cache was not used")

    return load


def summary(evaluation: EventEvaluation) -> list[tuple[str, float, list[str]]]:
    return [(r.policy.name, r.scores.cloud_share, [c.outcome for c in r.clips]) for r in evaluation.results]


def test_a_second_run_reuses_the_cache_and_runs_no_model(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    settings = eval_settings(tiny_models, tmp_path)
    models = LazyModels(lambda: load_edge_model(settings), lambda: load_cloud_model(settings))
    first = run_event_eval(settings, drawn_clips, models)
    frames = first.cache.frames
    assert frames >= 8 and (first.cache.edge_computed, first.cache.cloud_computed) == (frames, frames)

    again = run_event_eval(settings, drawn_clips, LazyModels(never("edge"), never("cloud")))  # type: ignore[arg-type]
    assert (again.cache.edge_computed, again.cache.cloud_computed) == (0, 0)
    assert (again.cache.edge_cached, again.cache.cloud_cached) == (frames, frames)
    assert summary(again) == summary(first)

    # another clip length for the cloud: its answers are computed again, the edge's are not
    settings.edge.clip_frames = 2
    changed = run_event_eval(
        settings,
        drawn_clips,
        LazyModels(never("edge"), lambda: load_cloud_model(settings)),  # type: ignore[arg-type]
    )
    assert (changed.cache.edge_computed, changed.cache.cloud_computed) == (0, frames)


def test_every_policy_is_replayed_at_its_cloud_share(tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path):
    settings = eval_settings(tiny_models, tmp_path, alerting={"k": 2, "n": 3, "down_for_s": 0.5})
    settings.eval.cloud_shares = [0.5]
    evaluation = run_event_eval(settings, drawn_clips)
    shares = {result.policy.name: result.scores.cloud_share for result in evaluation.results}
    assert shares["edge-only"] == 0.0 and shares["cloud-only"] == 1.0
    one_frame = 1 / evaluation.cache.frames
    assert shares["random 50%"] == pytest.approx(0.5, abs=one_frame)
    for family in ("DMD", "uncertainty"):  # the tiny models' scores tie a lot: a tie at the threshold stays
        assert 0 < shares[f"{family} 50%"] <= 0.5 + one_frame
    for result in evaluation.results:
        scores = result.scores
        assert (scores.fall_clips, scores.no_fall_clips) == (1, 2)
        assert [clip.is_fall for clip in result.clips] == [True, False, False]
        assert scores.cloud_s > 0 or scores.cloud_share == 0
        assert scores.detection.value in (0.0, 1.0)


def test_fallwatch_eval_prints_the_table_and_writes_the_report(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    settings = eval_settings(tiny_models, tmp_path)
    env = write_config(settings, tmp_path / "config.yaml")
    result = run_fallwatch("eval", "--clips", str(drawn_clips), "--share", "0.5", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("edge-only", "cloud-only", "DMD at its threshold", "uncertainty 50%", "random 50%"):
        assert row in result.stdout
    report = tmp_path / "report"
    assert {"report.md", "report.json", "events_vs_cloud_share.png"} <= {p.name for p in report.iterdir()}
    payload = json.loads((report / "report.json").read_text())
    by_name = {p["policy"]["name"]: p for p in payload["policies"]}
    assert by_name["cloud-only"]["scores"]["cloud_share"] == 1.0
    assert [clip["file"] for clip in by_name["edge-only"]["clips"]] == ["tips-over.mp4", "walks.mp4", "sits.mp4"]
    assert "| tips-over.mp4 | fall at 2 s |" in (report / "report.md").read_text()


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        (None, "clips.csv not found"),
        ("file,label,fall_start_s\nx.mp4,maybe,\n", "label 'maybe'"),
        ("file,label,fall_start_s\nx.mp4,fall,\n", "needs its fall_start_s"),
        ("file,label,fall_start_s\nmissing.mp4,fall,1.0\n", "missing.mp4"),
    ],
)
def test_eval_mistakes_get_one_readable_line(
    tiny_models: ModelPaths, tmp_path: Path, csv_text: str | None, message: str
) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    if csv_text is not None:
        (folder / "clips.csv").write_text(csv_text)
    env = write_config(eval_settings(tiny_models, tmp_path), tmp_path / "config.yaml")
    result = run_fallwatch("eval", "--clips", str(folder), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_eval_scores_the_pair_the_registry_serves_and_its_threshold_override(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    publish_version(registry, tiny_models, tmp_path, fall=True, version="v1")  # an edge that says "fall" everywhere
    settings = eval_settings(tiny_models, tmp_path)
    settings.edge.model_registry = registry  # edge.model still names the tiny edge, which the workers do not serve
    served = run_event_eval(settings, drawn_clips)
    assert served.switcher.version == "v1" and served.switcher_threshold == 0.0
    assert all(bool((outputs.edge_p > 0.99).all()) for outputs in served.outputs)
    edge_only = served.result("edge-only").scores  # as the served edge would: every clip alerts from its start
    assert (edge_only.false_alarms, edge_only.early_alarms, edge_only.detected) == (3, 1, 0)

    settings.edge.switcher_threshold = 0.4  # the workers' override is the replay's too
    assert run_event_eval(settings, drawn_clips).switcher_threshold == 0.4

    (registry / "v1" / PAIR_EDGE_DIR / "config.json").write_text("{}")  # not what v1 recorded
    with pytest.raises(ConfigError, match="cannot use version v1: the edge model of v1 does not match"):
        run_event_eval(settings, drawn_clips)


def test_two_clips_that_would_be_one_camera_are_refused(tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path):
    folder = tmp_path / "clips"
    shutil.copytree(drawn_clips, folder)
    shutil.copy(folder / "walks.mp4", folder / "walks.avi")
    (folder / "clips.csv").write_text(
        "file,label,fall_start_s\ntips-over.mp4,fall,2\nwalks.mp4,no_fall,\nwalks.avi,no_fall,\n"
    )
    with pytest.raises(ConfigError, match=r"walks.mp4 and walks.avi would be one camera \('walks'\)"):
        run_event_eval(eval_settings(tiny_models, tmp_path), folder)
