"""The `fallwatch` command line: one subcommand per service, the local stack, topics, settings, models, the demo.

Every service also runs as `python -m <package>`, which is the same command (`<package>.main`).
Every command takes `-h` and `--config FILE`, before or after the subcommand. A user mistake
(bad config, missing file, unreachable broker) prints one line and exits with status 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from alerting.cli import alerts_app
from alerting.main import alerting, dashboard
from cloud_workers.main import cloud
from core.entry import ConfigOption, VersionOption, run_app, settings_with_logging
from core.logs import configure_logging
from core.settings import Settings
from dmd_offline.cli import dmd_app, eval_command
from edge_workers.main import edge
from fallwatch.benchmarks.adaptation_command import bench_adaptation
from fallwatch.benchmarks.alerting import bench_alerting
from fallwatch.benchmarks.capacity_command import bench_capacity
from fallwatch.benchmarks.cloud_command import bench_cloud
from fallwatch.benchmarks.drift_command import bench_drift
from fallwatch.benchmarks.edge_command import bench_edge
from fallwatch.benchmarks.facility_command import bench_facility
from fallwatch.benchmarks.producer_command import bench_producer
from fallwatch.benchmarks.soak_command import bench_soak
from fallwatch.configuration import config_app
from fallwatch.health import health
from producers.cli import cameras_app
from producers.main import producer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The local Kafka + Redis + MQTT stack.")
models_app = typer.Typer(no_args_is_help=True, help="Model checkpoints and switchers.")
topics_app = typer.Typer(no_args_is_help=True, help="The Kafka topics of fallwatch.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: a table, against a baseline measured in the same run.")
app.add_typer(stack_app, name="stack")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(dmd_app, name="dmd")
app.add_typer(cameras_app, name="cameras")
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")
app.add_typer(alerts_app, name="alerts")
bench_app.command("adaptation")(bench_adaptation)
bench_app.command("drift")(bench_drift)
bench_app.command("alerting")(bench_alerting)
bench_app.command("capacity")(bench_capacity)
bench_app.command("cloud")(bench_cloud)
bench_app.command("edge")(bench_edge)
bench_app.command("facility")(bench_facility)
bench_app.command("producer")(bench_producer)
bench_app.command("soak")(bench_soak)
app.command("eval")(eval_command)


@app.callback()
def root(config: ConfigOption = None, version: VersionOption = False) -> None:
    """The options before the subcommand (each subcommand takes --config too)."""


# --- local stack ------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka (KRaft), redis-server and mosquitto locally and create the topics."""
    from core.kafka_io import topic_specs
    from fallwatch.stack import LocalStack

    settings = settings_with_logging()
    state = LocalStack.from_settings(settings).up(topic_specs(settings))
    typer.echo(
        f"kafka {state.bootstrap_servers} (pid {state.kafka.pid}), redis {state.redis_url} "
        f"(pid {state.redis.pid}), mqtt 127.0.0.1:{state.mqtt.port if state.mqtt else '-'} "
        f"(pid {state.mqtt.pid if state.mqtt else '-'}); logs in {settings.state_dir}"
    )


@stack_app.command("down")
def stack_down() -> None:
    """Stop the local stack."""
    from fallwatch.stack import LocalStack

    stopped = LocalStack.from_settings(settings_with_logging()).down()
    typer.echo("local stack stopped" if stopped else "no local stack was running")


@stack_app.command("status")
def stack_status() -> None:
    """Show whether the local stack runs, and where."""
    from fallwatch.stack import LocalStack, listens_on

    stack = LocalStack.from_settings(settings_with_logging())
    state = stack.read_state()
    if state is None:
        typer.echo("no local stack")
        raise typer.Exit(1)
    for name, service in (("kafka", state.kafka), ("redis", state.redis), ("mqtt", state.mqtt)):
        if service is None:
            typer.echo(f"{name}: not part of this stack (started before it had one)")
            continue
        alive = service.running() and listens_on(service.pid, service.port)
        typer.echo(f"{name}: {'up' if alive else 'DOWN'} port {service.port} pid {service.pid} log {service.log}")
    if not stack.healthy(state):
        raise typer.Exit(1)


# --- topics -----------------------------------------------------------------------------------
@topics_app.command("create")
def topics_create() -> None:
    """Create every topic on the configured brokers: kafka.partitions each, frames kept frames_retention_hours.

    Topics that exist are left alone; where one differs from the settings, it says how.
    """
    from core.kafka_io import create_topics, topic_specs

    settings = settings_with_logging(())
    kafka = settings.kafka
    reports = asyncio.run(create_topics(kafka, topic_specs(settings), kafka.partitions))
    for report in reports:
        configs = " ".join(f"{key}={value}" for key, value in report.configs.items())
        state = "created" if report.created else "exists"
        differs = f"; DIFFERS: {', '.join(report.differences)}" if report.differences else ""
        typer.echo(f"{report.name}: {state}, {report.partitions} partitions {configs}{differs}".rstrip())


# --- services: the same commands as `python -m <package>` -------------------------------------
app.command("producer")(producer)
app.command("edge")(edge)
app.command("cloud")(cloud)
app.command("alerting")(alerting)
app.command("dashboard")(dashboard)
app.command("health")(health)


# --- models -----------------------------------------------------------------------------------
@models_app.command("tiny")
def models_tiny(directory: Annotated[Path, typer.Argument(help="where to write the tiny checkpoints")]) -> None:
    """Build tiny random (UNTRAINED) models of the real classes, and an untrained switcher."""
    from fallwatch.devkit.models import build_tiny_models

    configure_logging()
    paths = build_tiny_models(directory)
    typer.echo(f"untrained tiny models written; use them with:\n{paths.yaml_snippet()}")


@models_app.command("train-reference")
def models_train_reference(
    dataset: Annotated[Path, typer.Option(help="labelled image folder (labels.csv with train/val splits)")] = Path(
        "../shared/datasets/falls-fallaction"
    ),
    output: Annotated[Path, typer.Option(help="where the pair is written")] = Path("models/reference"),
    seed: Annotated[int, typer.Option(help="model initialisation, shuffling and augmentation")] = 0,
    limit_per_split: Annotated[int | None, typer.Option(help="only the first N images of each split")] = None,
) -> None:
    """Train the reference pair here: a compact ViLT edge model and a BlazePose cloud model (no test images)."""
    from fallwatch.devkit.reference import train_reference_pair

    configure_logging()
    summary = train_reference_pair(dataset, output, Settings().edge.question, seed, limit_per_split)
    for name, model in (("edge (compact ViLT)", summary.edge), ("cloud (BlazePose + MLP)", summary.cloud)):
        typer.echo(
            f"{name}: val F1 {model.val_f1:.3f}, accuracy {model.val_accuracy:.3f}, "
            f"{model.epochs_run} epochs (best {model.best_epoch}), {model.seconds:.0f} s"
        )
    typer.echo(
        f"reference pair written to {output} in {summary.seconds:.0f} s. Next, the DMD data, switcher and report:\n"
        "  fallwatch --config config/reference.yaml dmd run"
    )


# --- demo -------------------------------------------------------------------------------------
class DemoModels(StrEnum):
    auto = "auto"
    reference = "reference"
    tiny = "tiny"


@app.command("demo")
def demo(
    clips: Annotated[Path, typer.Option(help="a folder of video files, one camera each")] = Path(
        "../shared/datasets/fall-clips"
    ),
    fps: Annotated[float, typer.Option(help="sampling rate per camera")] = 2.0,
    models: Annotated[
        DemoModels, typer.Option(help="auto: the trained reference pair when there is one, else tiny")
    ] = DemoModels.auto,
) -> None:
    """Stream a folder of videos as cameras through every service on the local stack."""
    from fallwatch.demo import run_demo

    configure_logging("WARNING")
    run_demo(clips, fps, models.value)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
