"""The `fallwatch` command line: one subcommand per service, the local stack, models, the demo.

Every service also runs as `python -m <package>`, which is the same command.
A user mistake (bad config, missing file, unreachable stack) prints one line
and exits with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alerting.bench import bench_alerting
from cloud_workers.bench import bench_cloud
from dmd_offline.cli import dmd_app, eval_command
from edge_workers.bench import bench_edge
from fallwatch.logs import configure_logging
from fallwatch.runtime import exit_on_sigterm, run_until_signalled
from fallwatch.settings import CONFIG_ENV, CameraSettings, ConfigError, Settings, load_settings
from producers.bench import bench_producer
from producers.cli import cameras_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The local Kafka + Redis stack.")
models_app = typer.Typer(no_args_is_help=True, help="Model checkpoints and switchers.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: a table, against a baseline measured in the same run.")
app.add_typer(stack_app, name="stack")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(dmd_app, name="dmd")
app.add_typer(cameras_app, name="cameras")
bench_app.command("alerting")(bench_alerting)
bench_app.command("cloud")(bench_cloud)
bench_app.command("edge")(bench_edge)
bench_app.command("producer")(bench_producer)
app.command("eval")(eval_command)


@app.callback()
def root(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (also FALLWATCH_CONFIG)")
    ] = None,
) -> None:
    if config is not None:
        # an environment variable, so services started as subprocesses read the same file
        os.environ[CONFIG_ENV] = str(config)


def settings_with_logging() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level)
    return settings


# --- local stack ------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka (KRaft) and redis-server locally and create the topics."""
    from fallwatch.kafka_io import topic_specs
    from fallwatch.stack import LocalStack

    settings = settings_with_logging()
    state = LocalStack.from_settings(settings).up(topic_specs(settings))
    typer.echo(
        f"kafka {state.bootstrap_servers} (pid {state.kafka.pid}), redis {state.redis_url} "
        f"(pid {state.redis.pid}); logs in {settings.state_dir}"
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
    from fallwatch.stack import LocalStack, pid_alive, port_accepts

    stack = LocalStack.from_settings(settings_with_logging())
    state = stack.read_state()
    if state is None:
        typer.echo("no local stack")
        raise typer.Exit(1)
    for name, service in (("kafka", state.kafka), ("redis", state.redis)):
        alive = pid_alive(service.pid) and port_accepts(service.port)
        typer.echo(f"{name}: {'up' if alive else 'DOWN'} port {service.port} pid {service.pid} log {service.log}")
    if not stack.healthy(state):
        raise typer.Exit(1)


# --- services ---------------------------------------------------------------------------------
@app.command("producer")
def producer(
    video: Annotated[
        list[Path] | None, typer.Option(help="add a camera that streams this video file (repeatable)")
    ] = None,
    fps: Annotated[float, typer.Option(help="sampling rate of --video cameras")] = 2.0,
) -> None:
    """Stream the configured cameras (and any --video files) to the `frames` topic."""
    from producers.service import run_producers

    settings = settings_with_logging()
    if video:
        settings.producers.cameras.extend(video_cameras(video, fps))
    if not settings.producers.cameras:
        raise ConfigError("no cameras: list them under producers.cameras in the config, or pass --video FILE")
    run_until_signalled(lambda stop: run_producers(settings, stop))


def video_cameras(videos: list[Path], fps: float) -> list[CameraSettings]:
    missing = [str(path) for path in videos if not path.is_file()]
    if missing:
        raise ConfigError(f"video file not found: {', '.join(missing)}")
    return [
        CameraSettings(id=f"cam-{index}", room=path.stem, url=str(path), fps=fps)
        for index, path in enumerate(videos, start=1)
    ]


@app.command("edge")
def edge() -> None:
    """Run an edge worker (consumer group on `frames`)."""
    from edge_workers.service import run_edge_worker

    settings = settings_with_logging()
    run_until_signalled(lambda stop: run_edge_worker(settings, stop))


@app.command("cloud")
def cloud() -> None:
    """Run a cloud worker (consumer group on `cloud-requests`)."""
    from cloud_workers.service import run_cloud_worker

    settings = settings_with_logging()
    run_until_signalled(lambda stop: run_cloud_worker(settings, stop))


@app.command("alerting")
def alerting() -> None:
    """Run the alerting service (faust app on `verdicts`)."""
    from alerting.app import run_alerting

    run_alerting(settings_with_logging())


@app.command("dashboard")
def dashboard() -> None:
    """Run the caregivers' web dashboard (needs alerting.dashboard_token)."""
    from alerting.dashboard import run_dashboard

    run_dashboard(settings_with_logging())


# --- models -----------------------------------------------------------------------------------
@models_app.command("tiny")
def models_tiny(directory: Annotated[Path, typer.Argument(help="where to write the tiny checkpoints")]) -> None:
    """Build tiny random (UNTRAINED) models of the real classes, and an untrained switcher."""
    from fallwatch.models import build_tiny_models

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
    from dmd_offline.reference import train_reference_pair

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
@app.command("demo")
def demo(
    clips: Annotated[Path, typer.Option(help="a folder of video files, one camera each")] = Path(
        "../shared/datasets/fall-clips"
    ),
    fps: Annotated[float, typer.Option(help="sampling rate per camera")] = 2.0,
    models: Annotated[
        str, typer.Option(help="auto: the trained reference pair when there is one, else tiny; reference; tiny")
    ] = "auto",
) -> None:
    """Stream a folder of videos as cameras through every service on the local stack."""
    from fallwatch.demo import run_demo

    if models not in ("auto", "reference", "tiny"):
        raise ConfigError(f"--models must be auto, reference or tiny, not {models!r}")
    configure_logging("WARNING")
    run_demo(clips, fps, models)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    # click itself turns usage errors into one line and exit status 2; our own mistakes are ConfigErrors
    try:
        app(args=argv)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


def run_service_command(name: str) -> None:
    """`python -m <package>`: the same as `fallwatch <name>`."""
    main([name, *sys.argv[1:]])
