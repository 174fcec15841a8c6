"""The models `fallwatch bench cloud` measures: shared by the command and the benchmark it runs."""

from typing import Literal, get_args

ModelKind = Literal["tiny", "configured", "random-7b"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
