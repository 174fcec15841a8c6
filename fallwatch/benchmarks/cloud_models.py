"""The models `fallwatch bench cloud` measures: shared by the command and the benchmark it runs."""

from enum import StrEnum


class ModelKind(StrEnum):
    tiny = "tiny"
    configured = "configured"  # cloud.model
    random_7b = "random-7b"  # LLaVA-NeXT-Video-7B's architecture, random weights (a GPU)
