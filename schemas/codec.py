"""The one encode/decode pair every service uses for topic values."""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError

from schemas.messages import Message

M = TypeVar("M", bound=Message)


class SchemaError(ValueError):
    """A record that is not a valid message of the expected type; goes to `dead-letters`."""


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode(model: type[M], raw: bytes | None) -> M:
    if not raw:
        raise SchemaError(f"empty record, expected {model.__name__}")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise SchemaError(f"invalid {model.__name__}: {validation_problems(exc)}") from None


def validation_problems(exc: ValidationError) -> str:
    """pydantic's errors on one line: where, and what (the first five)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}" for err in exc.errors()[:5])
