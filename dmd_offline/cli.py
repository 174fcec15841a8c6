"""`fallwatch dmd …` (also `python -m dmd_offline …`): the offline DMD steps, or all of them with `run`.

Options override the `dmd:` settings for one call. Heavy modules (torch, the
models) are imported inside the commands so `fallwatch --help` stays quick.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from core.entry import run_app, settings_with_logging
from core.settings import ConfigError

if TYPE_CHECKING:
    from core.settings import Settings

dmd_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Dual-Model Distillation offline tools.")

Workdir = Annotated[Path | None, typer.Option(help="work directory of the steps (default: dmd.workdir)")]
Source = Annotated[str | None, typer.Option(help="kafka, images or videos (default: dmd.source)")]
Folder = Annotated[Path | None, typer.Option(help="images: folder with labels.csv; videos: with clips.csv")]
Since = Annotated[str | None, typer.Option(help="kafka: records logged at or after this ISO time (with zone)")]
Until = Annotated[str | None, typer.Option(help="kafka: records logged before this ISO time (with zone)")]
Limit = Annotated[int | None, typer.Option(help="images: only the first N images of each split")]
Augment = Annotated[int | None, typer.Option(help="images: augmented copies of each train / val image (dmd.augment)")]
LoggedOnly = Annotated[
    bool, typer.Option("--logged-only", help="kafka: use logged cloud verdicts only, never run the large model")
]
TargetShare = Annotated[
    float | None, typer.Option(help="budget mode: defer this share of frames (default: the bucket method's peak)")
]


S = TypeVar("S", bound=BaseModel)


def with_options(section: S, options: dict[str, Any]) -> S:
    """A settings section with the given command-line options (None: not given) applied, validated like the config."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid option: {problems.replace('_', '-')}") from None


def configured(**overrides: Any) -> Settings:
    """Settings (with logging configured) and the given `dmd` options applied, validated like the config."""
    settings = settings_with_logging()
    settings.dmd = with_options(settings.dmd, overrides)
    return settings


@contextmanager
def timed(step: str) -> Iterator[None]:
    """Print how long the block took, as `[step: N s]`, once it is done."""
    started = time.perf_counter()
    yield
    typer.echo(f"[{step}: {time.perf_counter() - started:.1f} s]")


def replay_step(settings: Settings) -> None:
    from dmd_offline.pipeline import Workdir, run_replay

    with timed("replay"):
        summary = run_replay(settings)
        typer.echo(summary.describe())
        workdir = Workdir(settings.dmd.workdir)
        typer.echo(f"data set in {workdir.dataset}, paper JSON in {workdir.paper_json}")


def train_step(settings: Settings) -> None:
    from dmd_offline.pipeline import run_train

    with timed("train"):
        report = run_train(settings)
        typer.echo(
            f"switcher ({report.input_dim} → 512 → 128 → 1) trained on {report.train_rows} rows: {report.epochs_run} "
            f"epochs, best {report.best_epoch} (val loss {report.best_val_loss:.4f}, val accuracy "
            f"{report.val_accuracy:.3f}); agreements {report.agreement_share_train:.1%} of train, "
            f"positive-class weight {report.positive_class_weight:.3f}"
        )


def threshold_step(settings: Settings) -> None:
    from dmd_offline.pipeline import run_threshold

    with timed("threshold"):
        choice = run_threshold(settings)
        typer.echo(
            f"threshold {choice.threshold:.4f} ({choice.method}): defers {choice.deferred_share:.0%} of the "
            f"train split, expected F1 {choice.f1:.3f}"
        )


def evaluate_step(settings: Settings) -> None:
    from dmd_offline.pipeline import run_evaluate

    with timed("evaluate"):
        output = run_evaluate(settings)
        for result in output.evaluation.results:
            typer.echo(f"{result.name:>12}: F1 {result.f1:.3f}, {result.share_large:.0%} to the large model")
        typer.echo(f"report: {output.report_md} (and {output.report_json.name}, {len(output.plots)} plots)")


def publish_step(settings: Settings) -> None:
    from dmd_offline.pipeline import run_publish
    from dmd_offline.publish import served_elsewhere, tell_operators

    served_elsewhere(settings)
    with timed("publish"):
        path = run_publish(settings)
        line = f"published switcher version {path.name} in {settings.edge.switcher_registry}"
        typer.echo(line)
        tell_operators(settings, "version_published", line, path.name)


@dmd_app.command("replay")
def replay_command(
    workdir: Workdir = None,
    source: Source = None,
    folder: Folder = None,
    since: Since = None,
    until: Until = None,
    limit_per_split: Limit = None,
    augment: Augment = None,
    logged_only: LoggedOnly = False,
) -> None:
    """Run both models over logged traffic or a labelled folder; write the DMD data set (resumable)."""
    replay_step(
        configured(
            workdir=workdir,
            source=source,
            folder=folder,
            since=since,
            until=until,
            limit_per_split=limit_per_split,
            augment=augment,
            run_cloud_model=False if logged_only else None,
        )
    )


@dmd_app.command("train")
def train_command(workdir: Workdir = None) -> None:
    """Train the switcher on the data set's train split (early stopping on val)."""
    train_step(configured(workdir=workdir))


@dmd_app.command("threshold")
def threshold_command(workdir: Workdir = None, target_offload_share: TargetShare = None) -> None:
    """Choose the threshold: the bucket method's F1 peak, or the share given by --target-offload-share."""
    threshold_step(configured(workdir=workdir, target_offload_share=target_offload_share))


@dmd_app.command("evaluate")
def evaluate_command(workdir: Workdir = None) -> None:
    """Compare DMD with the baselines on the test split: report.md, report.json and PNG curves."""
    evaluate_step(configured(workdir=workdir))


@dmd_app.command("publish")
def publish_command(workdir: Workdir = None) -> None:
    """Publish the trained switcher with its threshold and metrics to edge.switcher_registry."""
    publish_step(configured(workdir=workdir))


@dmd_app.command("run")
def run_command(
    workdir: Workdir = None,
    source: Source = None,
    folder: Folder = None,
    since: Since = None,
    until: Until = None,
    limit_per_split: Limit = None,
    augment: Augment = None,
    logged_only: LoggedOnly = False,
    target_offload_share: TargetShare = None,
    publish: Annotated[bool, typer.Option(help="publish the switcher at the end")] = True,
) -> None:
    """Every step: replay, train, threshold, evaluate, publish."""
    settings = configured(
        workdir=workdir,
        source=source,
        folder=folder,
        since=since,
        until=until,
        limit_per_split=limit_per_split,
        augment=augment,
        run_cloud_model=False if logged_only else None,
        target_offload_share=target_offload_share,
    )
    if publish:
        from dmd_offline.publish import served_elsewhere

        served_elsewhere(settings)  # before the replay: not after an hour of it
    with timed("dmd run"):
        replay_step(settings)
        train_step(settings)
        threshold_step(settings)
        evaluate_step(settings)
        if publish:
            publish_step(settings)


def share(value: float | None) -> str:
    """A gate check's figure as the refusal lines write it; a check without frames to judge on is "–"."""
    return "–" if value is None else f"{value:.1%}"


def adapt_step(settings: Settings, publish: bool) -> None:
    from dmd_offline.adapt import Adaptation, publish_candidate, read_window
    from dmd_offline.publish import announce, tell_operators

    with timed("adapt"):
        frames, original, source = read_window(settings)
        candidate = Adaptation(settings, original, source).run(frames)
        gate = candidate.gate
        typer.echo(
            f"adapted on {candidate.adaptation_frames} frames ({len(candidate.rows.rows)} out-of-fold switcher rows), "
            f"held out {gate.frames}: "
            + ", ".join(f"{check.name} {share(check.candidate)} vs {share(check.running)}" for check in gate.checks)
        )
        if gate.passed_over is not None:
            typer.echo(gate.fallback_line(settings.dmd.adapt.switcher_evidence))
        typer.echo("; ".join(f"{step} {seconds:.1f} s" for step, seconds in candidate.seconds.items()))
        if not gate.passed:
            typer.echo(gate.refusal())
            tell_operators(settings, "candidate_refused", gate.refusal(), candidate.running.version)
            raise typer.Exit(1)
        if publish:
            version = publish_candidate(settings, candidate, source)
            announce(settings, version)
            line = f"published version {version} (edge model and switcher) in {settings.edge.model_registry}"
            typer.echo(line)
            tell_operators(settings, "version_published", line, version)


@dmd_app.command("adapt")
def adapt_command(
    workdir: Workdir = None,
    source: Source = None,
    folder: Folder = None,
    since: Since = None,
    until: Until = None,
    logged_only: LoggedOnly = False,
    publish: Annotated[bool, typer.Option(help="publish the candidate when it passes the gate")] = True,
) -> None:
    """Adapt the edge model to the facility's logged frames, retrain the switcher, gate and publish both."""
    adapt_step(
        configured(
            workdir=workdir,
            source=source,
            folder=folder,
            since=since,
            until=until,
            run_cloud_model=False if logged_only else None,
        ),
        publish,
    )


@dmd_app.command("rollback")
def rollback_command() -> None:
    """Make the version that was active before the current one active again (edge model and switcher)."""
    from dmd_offline.publish import announce, tell_operators
    from edge_workers.registry import rollback

    settings = settings_with_logging()
    registry = settings.edge.model_registry
    if registry is None:
        raise ConfigError("edge.model_registry is not set: there is no version to roll back")
    left, back_to = rollback(registry)
    announce(settings, back_to)
    line = f"rolled back from {left} to {back_to}"
    typer.echo(line)
    tell_operators(settings, "version_rolled_back", line, back_to)


def eval_command(
    clips: Annotated[Path | None, typer.Option(help="folder with clips.csv (default: eval.clips)")] = None,
    report_dir: Annotated[Path | None, typer.Option(help="where the report goes (default: eval.report_dir)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="model outputs cache (default: eval.cache_dir)")] = None,
    fps: Annotated[float | None, typer.Option(help="camera sampling rate (default: eval.fps)")] = None,
    edge_latency: Annotated[
        float | None, typer.Option("--edge-latency", help="s from capture to the edge verdict (eval.edge_latency_s)")
    ] = None,
    cloud_latency: Annotated[
        float | None,
        typer.Option("--cloud-latency", help="s from the edge verdict to the cloud's (eval.cloud_latency_s)"),
    ] = None,
    share: Annotated[
        list[float] | None,
        typer.Option("--share", help="a cloud share to compare the deferral policies at (repeatable)"),
    ] = None,
    bootstrap: Annotated[int | None, typer.Option(help="bootstrap resamples by clip (eval.bootstrap)")] = None,
) -> None:
    """Event-level evaluation of labelled clips: every routing policy through the alert rule, per clip and policy."""
    from rich.console import Console

    from dmd_offline.event_eval import run_event_eval
    from dmd_offline.event_report import print_table, write_event_report

    with timed("eval"):
        settings = settings_with_logging()
        settings.eval = with_options(
            settings.eval,
            {
                "clips": clips,
                "report_dir": report_dir,
                "cache_dir": cache_dir,
                "fps": fps,
                "edge_latency_s": edge_latency,
                "cloud_latency_s": cloud_latency,
                "cloud_shares": share or None,
                "bootstrap": bootstrap,
            },
        )
        if settings.eval.clips is None:
            raise ConfigError("no clips: pass --clips FOLDER (a folder with clips.csv) or set eval.clips")
        evaluation = run_event_eval(settings, settings.eval.clips)
        print_table(evaluation, Console(highlight=False, width=200))
        md_path, json_path, plots = write_event_report(evaluation, settings)
        typer.echo(f"report: {md_path} (and {json_path.name}, {len(plots)} plot)")


dmd_app.command("eval")(eval_command)


def main(argv: list[str] | None = None) -> None:
    run_app(dmd_app, argv)
