"""`fallwatch bench drift` on the test stack: a camera off the running pair's calibration is flagged.

The calibration is the pair's DMD test split, replayed by an edge model that says "no fall" on every
image; the pair served is the same tiny ViLT leaning to "fall" on every frame, as a room the pair
never saw makes it. The camera streams the drawn clips looped, paced in real time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from cloud_workers.loading import load_cloud_model
from core.settings import Settings
from dmd_offline.pipeline import Workdir, as_async
from dmd_offline.replay import replay
from dmd_offline.sources import image_folder_items
from edge_workers.model import ViltEdgeModel, load_edge_model
from edge_workers.switcher import create_untrained_switcher
from fallwatch.benchmarks.drift import reference_calibration
from fallwatch.devkit.models import ModelPaths
from fallwatch.stack import LocalStack
from tests.conftest import run_fallwatch, set_edge_fall_bias, settings_for, write_config
from tests.test_adaptation import fall_leaning_copy
from tests.test_dmd_pipeline import write_synthetic_folder

FPS = 10.0
MIN_FRAMES = 8
SECONDS = 3.0


def calibrated_settings(tiny: ModelPaths, tmp_path: Path, stack_dir: Path, state) -> Settings:
    """edge.model: the fall-leaning copy, with a switcher; dmd.workdir: a test split the "no"-copy answered."""
    quiet = tmp_path / "no-fall-edge"
    shutil.copytree(tiny.edge, quiet)
    set_edge_fall_bias(quiet, fall=False)
    folder = tmp_path / "images"
    write_synthetic_folder(folder)
    sections = tiny.settings_sections()
    settings = settings_for(
        state,
        tmp_path,
        edge={**sections["edge"], "model": str(quiet)},
        cloud={**sections["cloud"], "num_frames": 4},
        dmd={"workdir": str(tmp_path / "dmd")},
        eval={"fps": FPS},
    )
    directory = Workdir(settings.dmd.workdir).dataset
    items = as_async(image_folder_items(folder))
    asyncio.run(replay(items, settings, load_edge_model(settings), load_cloud_model(settings), directory, "images"))

    served = fall_leaning_copy(tiny.edge, tmp_path / "fall-edge")
    hidden = ViltEdgeModel.from_pretrained(str(served), settings.edge.question).hidden_size
    create_untrained_switcher(tmp_path / "switchers", hidden, str(served))
    settings.edge.model = str(served)
    settings.edge.switcher_registry = tmp_path / "switchers"
    settings.edge.drift.drift_min_frames = MIN_FRAMES
    settings.edge.drift.drift_window = 2 * MIN_FRAMES
    settings.state_dir = stack_dir  # bench drift runs on the local stack when one is up
    return settings


def test_bench_drift_flags_the_camera_and_reports_when(
    local_stack: LocalStack, stack_state, tiny_models: ModelPaths, drawn_clips: Path, tmp_path: Path
) -> None:
    settings = calibrated_settings(tiny_models, tmp_path, local_stack.state_dir, stack_state)
    calibration, test_rows = reference_calibration(settings)
    assert test_rows == 10 and calibration.frames == 10, "the test split only"
    assert calibration.fall_rate == 0.0
    for pinned in (0.0, 1.0):  # the offload share at the threshold the worker routes by, an override's too
        settings.edge.switcher_threshold = pinned
        assert reference_calibration(settings)[0].offload_share == pinned
    settings.edge.switcher_threshold = None

    result = run_fallwatch(
        "bench", "drift", "--clips", str(drawn_clips), "--seconds", str(SECONDS),
        env=write_config(settings, tmp_path / "config.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "edge fall rate 0%" in result.stdout and "10 frames" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {drawn_clips} |"))
    published, flagged_after, reasons = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert abs(int(published) - SECONDS * FPS) <= 2, "paced at eval.fps"
    # the guard judges once MIN_FRAMES are in, and those take (MIN_FRAMES - 1) / FPS to stream
    assert (MIN_FRAMES - 1) / FPS <= float(flagged_after) < SECONDS + 10, row
    assert re.search(r"edge fall rate 100% against 0%", reasons), reasons
