"""`fallwatch bench adaptation` with tiny models on drawn clips: folds, gates, pooled tables, switchers.

The edge model leans to "fall" on every frame (test_adaptation's copy), so the running pair alerts on
every clip and the simulated caregiver answers each alert: the fall clip's after its onset is
acknowledged, the others are false alarms. The numbers the tiny models give are arbitrary; what is
checked is what the study is made of.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.settings import Settings
from dmd_offline.clips import read_labelled_clips
from edge_workers.model import ViltEdgeModel
from edge_workers.switcher import create_untrained_switcher
from fallwatch.benchmarks.adaptation import PAPER_FAMILY, SERVED, SWITCHER_KINDS, Study, folds_for, with_seed
from fallwatch.devkit.models import ModelPaths
from tests.conftest import run_fallwatch, write_config
from tests.test_adaptation import fall_leaning_copy

CLIPS = 3  # drawn_clips: one fall, two without


def study_settings(tiny: ModelPaths, tmp_path: Path) -> Settings:
    edge = fall_leaning_copy(tiny.edge, tmp_path / "edge-vilt")
    registry = tmp_path / "switchers"
    create_untrained_switcher(registry, ViltEdgeModel.from_pretrained(str(edge), Settings().edge.question).hidden_size,
                              str(edge))  # fmt: skip
    return Settings(
        edge={"model": str(edge), "switcher_registry": str(registry)},
        cloud={**tiny.settings_sections()["cloud"], "num_frames": 4},
        alerting={"k": 2, "n": 3, "down_for_s": 0.5},
        eval={"cache_dir": str(tmp_path / "cache"), "bootstrap": 20, "fps": 10},
        dmd={
            "learning_rate": 3e-3,
            "max_epochs": 5,
            "patience": 2,
            "adapt": {"learning_rate": 5e-3, "epochs": 2, "batch_size": 8, "cross_fit": "time"},
        },
    )


def test_halves_hold_every_other_clip_of_each_label(drawn_clips: Path) -> None:
    clips = read_labelled_clips(drawn_clips)
    first, second = folds_for(clips, "halves")
    assert [c.file for c in first.adapt_on] == [c.file for c in second.held_out] == ["tips-over.mp4", "sits.mp4"]
    assert [c.file for c in first.held_out] == [c.file for c in second.adapt_on] == ["walks.mp4"]
    assert all(len(f.adapt_on) == CLIPS - 1 for f in folds_for(clips, "leave-one-out"))


def test_the_study_pools_every_held_out_clip_into_one_row_per_policy(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    study = Study(study_settings(tiny_models, tmp_path), drawn_clips, tmp_path / "work")
    result = study.run("leave-one-out", True)

    assert result.folds == len(result.gates) == len(result.seconds) == CLIPS
    for gate in result.gates:
        assert gate["caregiver_labelled_frames"] > 0, "the running pair's alerts were answered"
        assert isinstance(gate["passed"], bool) and 0 <= gate["threshold"] <= 1
        assert gate["switcher_rows"] > 0
    before, after = result.tables["before"], result.tables["after"]
    families = [kind.family for kind in SWITCHER_KINDS]
    assert {f"{family} 30%" for family in families} <= set(after), "every switcher kind beside the candidate's"
    assert f"{PAPER_FAMILY} 30%" not in before, "the running pair has one switcher"
    for table in (before, after):
        for name, scores in table.items():
            assert (scores["fall_clips"], scores["no_fall_clips"]) == (1, 2), name  # each clip held out once
        assert (table["edge-only"]["cloud_share"], table["cloud-only"]["cloud_share"]) == (0.0, 1.0)
        assert table["uncertainty 50%"]["cloud_share"] <= 0.5 + 0.1
    # after the gate: per fold, the candidate's own pair where it passed, the running pair's elsewhere
    published = result.tables["published"]
    assert list(published) == [SERVED] and (published[SERVED]["fall_clips"], published[SERVED]["no_fall_clips"]) == (
        1,
        2,
    )
    if all(gate["passed"] for gate in result.gates):
        assert published[SERVED] == after[SERVED]
    elif not any(gate["passed"] for gate in result.gates):
        assert published[SERVED] == before[SERVED]
    assert {kind.name for kind in SWITCHER_KINDS} | {"uncertainty"} == set(result.auroc)
    for points in result.auroc.values():
        assert all(value is None or 0 <= value <= 1 for _, value, _, _ in points)


def test_gate_only_records_each_folds_verdict_and_evaluates_nothing(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    settings = study_settings(tiny_models, tmp_path)
    report = tmp_path / "report"
    result = run_fallwatch(
        "bench", "adaptation", "--clips", str(drawn_clips), "--protocol", "halves", "--gate-only",
        "--report", str(report), env=write_config(settings, tmp_path / "config.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((report / "report.json").read_text())
    assert payload["folds"] == 2 and not payload["caregiver"]
    assert payload["tables"] == {"before": {}, "after": {}, "published": {}} and payload["auroc"] == {}
    for gate in payload["gates"]:
        assert gate["caregiver_labelled_frames"] == gate["gate_labelled_frames"] == 0
        assert "cloud agreement" in gate, "without labels the gate checks agreement with the cloud"
        candidate, running, passed = gate["cloud agreement"]
        assert passed == (candidate >= running)
    assert result.stdout.count("gate: ") == 2


def test_a_folder_without_clips_csv_is_one_line(tmp_path: Path) -> None:
    result = run_fallwatch("bench", "adaptation", "--clips", str(tmp_path))
    assert result.returncode != 0
    assert "clips.csv not found" in result.stderr and "Traceback" not in result.stderr


def test_seeds_run_the_study_once_per_training_seed_and_tabulate_the_spread(
    tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    settings = study_settings(tiny_models, tmp_path)
    seeded = with_seed(settings, 2)
    assert (seeded.dmd.adapt.seed, seeded.dmd.seed) == (settings.dmd.adapt.seed + 2, settings.dmd.seed + 2)
    assert seeded.dmd.adapt.model_dump(exclude={"seed"}) == settings.dmd.adapt.model_dump(exclude={"seed"})
    assert seeded.eval == settings.eval, "the bootstrap and the random policy keep their seed"

    report = tmp_path / "report"
    result = run_fallwatch(
        "bench", "adaptation", "--clips", str(drawn_clips), "--protocol", "halves", "--seeds", "2",
        "--report", str(report), env=write_config(settings, tmp_path / "config.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tables = {seed: json.loads((report / f"seed-{seed}" / "report.json").read_text()) for seed in (0, 1)}
    assert all(payload["folds"] == 2 for payload in tables.values())
    spread = (report / "spread.md").read_text()
    assert "| policy | seed 0 | seed 1 |" in spread and spread in result.stdout
    for name in tables[0]["tables"]["after"]:
        cells = [tables[seed]["tables"]["after"][name] for seed in (0, 1)]
        row = " | ".join(
            f"{s['detected']}/{s['fall_clips']}, {s['false_alarms']} FA, {s['cloud_share']:.0%}" for s in cells
        )
        assert f"| {name} | {row} |" in spread


def test_seeds_with_gate_only_is_one_line(drawn_clips: Path) -> None:
    result = run_fallwatch("bench", "adaptation", "--clips", str(drawn_clips), "--gate-only", "--seeds", "2")
    assert result.returncode != 0
    assert "--gate-only" in result.stderr and "Traceback" not in result.stderr
