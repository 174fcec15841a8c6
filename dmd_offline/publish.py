"""Publishing a trained switcher, its threshold and metrics into the registry the edge workers watch."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from redis.exceptions import RedisError

from core.checkpoints import local_checkpoint_sha256
from core.operator_events import publish_operator_events
from core.redis_io import sync_redis_client
from core.settings import ConfigError, Settings
from dmd_offline.dataset import DatasetManifest
from dmd_offline.evaluate import Evaluation
from dmd_offline.threshold import ThresholdChoice
from dmd_offline.train import TrainingReport
from edge_workers.registry import announce_switcher
from edge_workers.switcher import Switcher, SwitcherMetadata, new_version, save_switcher
from schemas import OperatorEvent, OperatorEventKind

log = logging.getLogger(__name__)


def publish_metrics(choice: ThresholdChoice, training: TrainingReport, evaluation: Evaluation) -> dict[str, float]:
    metrics = {
        "train_f1_at_threshold": choice.f1,
        "train_deferred_share": choice.deferred_share,
        "val_accuracy": training.val_accuracy,
        "best_val_loss": training.best_val_loss,
        "test_rows": float(evaluation.rows),
    }
    for result in evaluation.results:
        key = result.name.replace("-", "_")
        metrics[f"test_f1_{key}"] = result.f1
        metrics[f"test_share_large_{key}"] = result.share_large
        if result.apgr is not None:
            metrics[f"test_apgr_{key}"] = result.apgr
    return metrics


def served_elsewhere(settings: Settings) -> None:
    """A ConfigError where `edge.model_registry` is set: the workers serve its versions (edge model and switcher
    together) and never read `edge.switcher_registry`, so a switcher published there would not be served."""
    if settings.edge.model_registry is not None:
        raise ConfigError(
            f"edge.model_registry is set ({settings.edge.model_registry}): the edge workers serve its versions and "
            "never read edge.switcher_registry; publish edge model and switcher together with `fallwatch dmd "
            "adapt` (`dmd run --no-publish` evaluates without publishing)"
        )


def publish(
    settings: Settings,
    manifest: DatasetManifest,
    switcher: Switcher,
    choice: ThresholdChoice,
    training: TrainingReport,
    evaluation: Evaluation,
) -> Path:
    """A new version in `edge.switcher_registry`, announced to running edge workers through Redis.

    Refuses a switcher the configured edge model would reject.
    """
    if manifest.edge_model != settings.edge.model:
        raise ConfigError(
            f"the switcher was trained on hidden vectors of edge model {manifest.edge_model!r} but the edge "
            f"workers run {settings.edge.model!r}: they would refuse it; replay with the edge model they run"
        )
    if manifest.edge_model_sha256 is not None and local_checkpoint_sha256(settings.edge.model) != (
        manifest.edge_model_sha256
    ):
        # it would be bound to the files there now, and the workers would serve it on another model's vectors
        raise ConfigError(
            f"the files of edge model {settings.edge.model} changed since the replay: the switcher learnt the "
            "hidden vectors of the model before; replay again (another --workdir)"
        )
    metadata = SwitcherMetadata(
        version=new_version(),
        input_dim=switcher.input_dim,
        inputs=switcher.inputs,
        history=switcher.history,
        threshold=choice.threshold,
        edge_model=manifest.edge_model,
        edge_model_revision=manifest.edge_model_revision,
        created_at=datetime.now(UTC),
        trained=True,
        training_window=manifest.source,
        offload_policy={
            "method": choice.method,
            "buckets": settings.dmd.buckets,
            "train_deferred_share": choice.deferred_share,
            "target_share": choice.target_share,
            "test_deferred_share": evaluation.result("DMD").share_large,
            "reference": evaluation.reference,
        },
        metrics=publish_metrics(choice, training, evaluation),
    )
    path = save_switcher(settings.edge.switcher_registry, switcher, metadata)
    announce(settings, metadata.version)
    return path


def announce(settings: Settings, version: str) -> None:
    """Tell the running edge workers about a new version (or an active one after a rollback)."""
    key = settings.edge.registry_announce_key
    if not key:
        return
    try:
        with sync_redis_client(settings.redis) as redis:
            announce_switcher(redis, key, version)
    except RedisError as exc:
        # the edge workers also poll the registry: they pick the version up within edge.registry_poll_s
        log.warning("could not announce version %s through Redis (%s); workers will find it by polling", version, exc)


def tell_operators(settings: Settings, kind: OperatorEventKind, line: str, version: str | None) -> None:
    """The command's line about a version, as an event on `operator-events` too."""
    event = OperatorEvent(kind=kind, service="dmd_offline", message=line, version=version)
    publish_operator_events(settings, [event])
