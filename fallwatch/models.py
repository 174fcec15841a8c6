"""Loading the configured model pair; the tiny untrained pair for tests, and finding the trained reference pair."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cloud_workers.model import CloudModel, LlavaVideoCloudModel
from cloud_workers.pose import PoseFallCloudModel, is_pose_checkpoint
from cloud_workers.tiny import build_tiny_cloud_model
from edge_workers.model import EdgeModel, ViltEdgeModel
from edge_workers.switcher import create_untrained_switcher, latest_version
from edge_workers.tiny import build_tiny_edge_model
from fallwatch.settings import ConfigError, Settings

log = logging.getLogger(__name__)


@contextmanager
def loading(what: str, model_id: str) -> Iterator[None]:
    """A checkpoint that cannot be found or read is a settings mistake: one line, not a traceback."""
    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().exists():
        raise ConfigError(f"the {what} model directory {model_id} does not exist")
    try:
        yield
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load the {what} model {model_id!r}: {first_line}") from None


def load_edge_model(settings: Settings) -> EdgeModel:
    edge = settings.edge
    with loading("edge", edge.model):
        return ViltEdgeModel.from_pretrained(
            edge.model,
            edge.question,
            revision=edge.revision,
            quantize_int8=edge.quantize_int8,
            bf16_autocast=edge.bf16_autocast,
        )


def load_cloud_model(settings: Settings) -> CloudModel:
    cloud = settings.cloud
    with loading("cloud", cloud.model):
        if is_pose_checkpoint(cloud.model):
            return PoseFallCloudModel.from_pretrained(cloud.model, revision=cloud.revision)
        return LlavaVideoCloudModel.from_pretrained(
            cloud.model,
            cloud.question,
            num_frames=cloud.num_frames,
            revision=cloud.revision,
            device=cloud.device,
            dtype=cloud.dtype,
            device_map=cloud.device_map,
        )


@dataclass(frozen=True)
class ModelPaths:
    edge: Path
    cloud: Path
    switcher_registry: Path

    def settings_sections(self) -> dict[str, dict[str, str]]:
        return {
            "edge": {"model": str(self.edge), "switcher_registry": str(self.switcher_registry)},
            "cloud": {"model": str(self.cloud)},
        }

    def yaml_snippet(self) -> str:
        return (
            f"edge:\n  model: {self.edge}\n  switcher_registry: {self.switcher_registry}\n"
            f"cloud:\n  model: {self.cloud}\n"
        )


REFERENCE_MODELS = Path("models/reference")


def reference_models(directory: Path = REFERENCE_MODELS) -> ModelPaths | None:
    """The reference pair of `fallwatch models train-reference` with a published switcher, when all exist.

    Relative paths on purpose: a switcher names the edge model it was trained for by the
    configured string (config/reference.yaml), and the services compare that string.
    """
    paths = ModelPaths(directory / "edge-vilt", directory / "cloud-pose", directory / "switchers")
    trained = all((path / "config.json").is_file() for path in (paths.edge, paths.cloud))
    return paths if trained and latest_version(paths.switcher_registry) is not None else None


def build_tiny_models(directory: Path) -> ModelPaths:
    """Tiny random checkpoints of the real classes plus an untrained switcher; answers are arbitrary."""
    directory = directory.resolve()
    paths = ModelPaths(directory / "edge-vilt", directory / "cloud-llava", directory / "switchers")
    built = all((path / "config.json").is_file() for path in (paths.edge, paths.cloud))
    if built and latest_version(paths.switcher_registry) is not None:
        log.warning("reusing the UNTRAINED tiny models in %s: their verdicts are arbitrary", directory)
        return paths
    build_tiny_edge_model(paths.edge)
    build_tiny_cloud_model(paths.cloud)
    edge = ViltEdgeModel.from_pretrained(str(paths.edge), Settings().edge.question)
    create_untrained_switcher(paths.switcher_registry, edge.hidden_size, edge.name)
    log.warning("tiny models in %s are UNTRAINED: their verdicts are arbitrary", directory)
    return paths
