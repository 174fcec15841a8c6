"""The dev kit's model pairs: the tiny untrained pair for tests and demos, and finding the trained reference pair."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from edge_workers.model import ViltEdgeModel
from edge_workers.switcher import create_untrained_switcher, latest_version
from fallwatch.devkit.tiny_cloud import build_tiny_cloud_model
from fallwatch.devkit.tiny_edge import build_tiny_edge_model

log = logging.getLogger(__name__)


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
