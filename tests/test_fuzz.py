"""Fuzzing the decoders every consumer runs on untrusted bytes: the schema codec and the JPEG path.

Whatever the bytes, `schemas.decode` returns a message or raises `SchemaError` (the dead-letter reason), and
the JPEG path returns an image, None or a refusal: nothing else may escape, or one record would stop a worker.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.images import decode_jpeg_rgb, encode_jpeg
from edge_workers.service import jpeg_size_problem
from schemas import CloudRequest, DeadLetter, FallEvent, Frame, Label, SchemaError, Verdict, decode

MODELS = [Frame, CloudRequest, Verdict, FallEvent, Label, DeadLetter]
VALID_JPEG = encode_jpeg(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))

# JSON values as a producer gone wrong might write them: any shape, NaN and infinities included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted({name for model in MODELS for name in model.model_fields})


@st.composite
def near_messages(draw: st.DrawFn) -> bytes:
    """Objects with the messages' own field names and random values: past the JSON parser, into validation."""
    names = draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=10, unique=True))
    record = {name: draw(json_values) for name in names}
    if draw(st.booleans()):
        record["schema_version"] = 1
    return json.dumps(record, allow_nan=True).encode()


def decodes_or_refuses(model: type, raw: bytes) -> None:
    try:
        decode(model, raw)
    except SchemaError as exc:
        assert str(exc), "a refusal says why"


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@fuzz
@given(raw=st.binary(max_size=512))
def test_random_bytes_never_crash_the_codec(model: type, raw: bytes) -> None:
    decodes_or_refuses(model, raw)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@fuzz
@given(raw=near_messages())
def test_wrong_shapes_and_values_never_crash_the_codec(model: type, raw: bytes) -> None:
    decodes_or_refuses(model, raw)


@fuzz
@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID_JPEG) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, len(VALID_JPEG)),
)
def test_damaged_jpegs_never_crash_the_image_path(flips: list[tuple[int, int]], cut: int) -> None:
    damaged = bytearray(VALID_JPEG)
    for index, value in flips:
        damaged[index] = value
    jpeg = bytes(damaged[:cut])
    problem = jpeg_size_problem(jpeg, min_side=16, max_pixels=4096 * 4096)
    assert problem is None or "pixels" in problem
    image = decode_jpeg_rgb(jpeg)
    assert image is None or (image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8)


@fuzz
@given(raw=st.binary(max_size=2048))
def test_random_bytes_never_crash_the_image_path(raw: bytes) -> None:
    problem = jpeg_size_problem(raw, min_side=16, max_pixels=4096 * 4096)
    assert problem is None or "pixels" in problem
    image = decode_jpeg_rgb(raw)
    assert image is None or image.dtype == np.uint8
