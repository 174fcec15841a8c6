"""`fallwatch bench capacity`: the table it prints, and which cloud share it uses."""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import Settings
from edge_workers.switcher import create_untrained_switcher, latest_version, load_switcher, new_version, save_switcher
from fallwatch.benchmarks.capacity import current_cloud_share
from tests.conftest import run_fallwatch


def publish_with_test_share(registry: Path, share: float) -> None:
    create_untrained_switcher(registry, 64, "edge-model")
    newest = latest_version(registry)
    assert newest is not None
    switcher, metadata = load_switcher(newest)
    policy = {"method": "bucket", "test_deferred_share": share}
    save_switcher(registry, switcher, metadata.model_copy(update={"version": new_version(), "offload_policy": policy}))


def test_the_cloud_share_is_the_switchers_capped_by_the_budget(tmp_path: Path) -> None:
    registry = tmp_path / "switchers"
    assert current_cloud_share(Settings(edge={"switcher_registry": str(registry)}), None) is None
    publish_with_test_share(registry, 0.4)
    assert current_cloud_share(Settings(edge={"switcher_registry": str(registry)}), None).share == 0.4
    capped = current_cloud_share(Settings(edge={"switcher_registry": str(registry), "max_offload_ratio": 0.3}), None)
    assert capped.share == 0.3 and capped.source.startswith("edge.max_offload_ratio (the budget; switcher ")
    assert current_cloud_share(Settings(), 0.1).source == "--cloud-share"


def test_bench_capacity_prints_cameras_per_option_and_gpu_seconds_per_camera_hour(tiny_models) -> None:
    result = run_fallwatch(
        "bench", "capacity", "--fps", "2", "--model-dir", str(tiny_models.edge), "--rounds", "1", "--batch-size", "2",
        "--cloud-seconds-per-request", "0.5",
        env={"FALLWATCH_EDGE__SWITCHER_REGISTRY": str(tiny_models.switcher_registry),
             "FALLWATCH_EDGE__MAX_OFFLOAD_RATIO": "0.25", "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for option in ("fp32", "dynamic int8 (edge.quantize_int8)", "bf16 autocast (edge.bf16_autocast)"):
        row = re.search(rf"│ {re.escape(option)}\s+│\s+([\d.,]+) │\s+([\d.,]+) │\s+([\d.]+)× │\s+([\d.]+) │"
                        rf"\s+([\d.]+) │\s+([\d.]+) │", out)  # fmt: skip
        assert row is not None, out
        assert float(row.group(1).replace(",", "")) > 0 and float(row.group(6)) > 0
    assert re.search(r"│ fp32 .*│\s+1\.00× │\s+0\.0000 │", out), "fp32 is the baseline"
    # 2 fps × 3600 s × 0.25 = 1,800 requests; × 0.5 s = 900 GPU s per camera-hour; 3600 / 900 = 4 cameras
    assert re.search(r"│\s+0\.250 │ edge\.max_offload_ratio \(the budget\) │\s+1,800 │\s+0\.5 │\s+900 │\s+4 │", out), (
        out
    )
