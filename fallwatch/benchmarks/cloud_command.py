"""`fallwatch bench cloud`: the command; the measurements are in fallwatch.benchmarks.cloud.

Kept free of torch and transformers imports, so registering it costs `fallwatch` nothing.
"""

from __future__ import annotations

from typing import Annotated

import typer

from core.settings import ConfigError
from fallwatch.benchmarks.cloud_models import MODEL_KINDS, ModelKind


def bench_cloud(
    model: Annotated[str, typer.Option(help="tiny | configured (cloud.model) | random-7b (the 7B, GPU)")] = "tiny",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes of the model-alone table")] = "1,4,8,16",
    frames: Annotated[int, typer.Option(help="frames per clip")] = 8,
    repeats: Annotated[int, typer.Option(help="timed batches per measurement (median)")] = 3,
    generate_tokens: Annotated[int, typer.Option(help="new tokens of the generate baseline")] = 10,
    agreement_clips: Annotated[int, typer.Option(help="clips on which one-forward and generate are compared")] = 32,
    worker_requests: Annotated[int, typer.Option(help="requests for the worker run on Kafka + Redis (0: skip)")] = 64,
    worker_batch: Annotated[int, typer.Option(help="the worker's batch size")] = 8,
    worker_rounds: Annotated[int, typer.Option(help="alternating rounds of model alone and worker (median)")] = 3,
) -> None:
    """Cloud model and worker: requests/s, latency, energy per request; one forward vs generate."""
    if model not in MODEL_KINDS:
        raise ConfigError(f"--model must be one of {', '.join(MODEL_KINDS)}, not {model!r}")
    try:
        sizes = [int(size) for size in batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, not {batch_sizes!r}") from None
    if min(sizes) < 1 or min(frames, repeats, worker_batch, worker_rounds, agreement_clips) < 1 or worker_requests < 0:
        raise ConfigError(
            "batch sizes, --frames, --repeats, --worker-batch, --worker-rounds and --agreement-clips must be at least 1"
        )
    from core.logs import configure_logging
    from fallwatch.benchmarks.cloud import run_benchmark

    configure_logging("WARNING")
    kind: ModelKind = model  # type: ignore[assignment]  # checked against MODEL_KINDS above
    run_benchmark(
        kind, sizes, frames, repeats, generate_tokens, agreement_clips, worker_requests, worker_batch, worker_rounds
    )
