"""The edge model wrapper, the tiny checkpoints and the switcher artifact.

Runs on tiny random checkpoints of the real ViLT classes, saved and loaded back with
`from_pretrained`, and on real fall images from ../shared when they are present.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import ViltForQuestionAnswering

from core.images import decode_jpeg_rgb, encode_jpeg, encode_jpeg_rgb
from core.settings import DEFAULT_QUESTION, ConfigError, Settings
from edge_workers.metrics import EdgeMetrics
from edge_workers.model import (
    SHIPPED_CALIBRATION_FRAMES,
    EdgeBatch,
    EdgeModel,
    ViltEdgeModel,
    load_edge_model,
    seeded_fall_probability,
)
from edge_workers.registry import SwitcherRegistry
from edge_workers.switcher import (
    Switcher,
    SwitcherMetadata,
    SwitcherMismatch,
    check_compatible,
    create_untrained_switcher,
    latest_version,
    load_switcher,
    new_version,
    save_switcher,
)
from fallwatch.devkit.tiny_edge import build_tiny_edge_model, real_size_processor, set_fall_bias
from tests.conftest import SHARED_DATASETS

FALL_IMAGES = SHARED_DATASETS / "falls-fallaction" / "images"
FRAME_HEIGHT, FRAME_WIDTH = 480, 640


def read_rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(FALL_IMAGES / name).convert("RGB"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Three 640x480 RGB frames: real fall images when ../shared exists, else smooth synthetic ones."""
    if FALL_IMAGES.is_dir():
        images = [read_rgb(name) for name in ("fa_00004.jpg", "fa_00006.jpg", "fa_00007.jpg")]
        return [cv2.resize(image, (FRAME_WIDTH, FRAME_HEIGHT), interpolation=cv2.INTER_AREA) for image in images]
    rows, cols = np.mgrid[0:FRAME_HEIGHT, 0:FRAME_WIDTH]
    return [
        np.stack([(rows * k) % 256, (cols * 2 * k) % 256, ((rows + cols) * k) % 256], axis=-1).astype(np.uint8)
        for k in (1, 2, 3)
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_edge_model(tmp_path_factory.mktemp("tiny-vilt"))


@pytest.fixture(scope="module")
def edge(tiny_dir: Path) -> ViltEdgeModel:
    return ViltEdgeModel.from_pretrained(str(tiny_dir), DEFAULT_QUESTION)


def predict_seeded(model: ViltEdgeModel, images: list[np.ndarray]) -> EdgeBatch:
    # ViLT samples image patches randomly on every forward: seed so runs are comparable.
    torch.manual_seed(0)
    return model.predict(images)


def test_tiny_model_loads_and_predicts_a_batch(edge: ViltEdgeModel, tiny_dir: Path, frames: list[np.ndarray]):
    assert isinstance(edge, EdgeModel)
    assert edge.name == str(tiny_dir)
    assert edge.hidden_size == edge.model.classifier[-1].in_features == 2 * edge.model.config.hidden_size

    batch = predict_seeded(edge, frames)

    assert batch.fall_probability.shape == (3,)
    assert batch.hidden.shape == (3, edge.hidden_size)
    assert batch.fall_probability.dtype == np.float32 and batch.hidden.dtype == np.float32
    assert np.all((batch.fall_probability >= 0) & (batch.fall_probability <= 1))
    assert np.all(np.isfinite(batch.hidden))


def test_hidden_is_the_input_of_the_last_classifier_linear(edge: ViltEdgeModel, frames: list[np.ndarray]):
    inputs = edge.preprocess(frames)
    torch.manual_seed(0)
    with torch.inference_mode():
        pooled = edge.model.vilt(**inputs).pooler_output
        # Linear → LayerNorm → GELU: everything of the head but its last Linear.
        expected_hidden = edge.model.classifier[:3](pooled)
        logits = edge.model.classifier[-1](expected_hidden)
    yes, no = edge.model.config.label2id["yes"], edge.model.config.label2id["no"]
    expected_fall = torch.softmax(logits[:, [yes, no]], dim=-1)[:, 0]

    batch = predict_seeded(edge, frames)

    np.testing.assert_allclose(batch.hidden, expected_hidden.numpy(), atol=1e-5)
    np.testing.assert_allclose(batch.fall_probability, expected_fall.numpy(), atol=1e-6)
    # GELU output, not the pooled output or the LayerNorm output: GELU(x) >= -0.17 everywhere.
    assert batch.hidden.min() > -0.1701


def test_batch_equals_one_frame_at_a_time(edge: ViltEdgeModel, frames: list[np.ndarray]):
    batch = predict_seeded(edge, frames)
    for index, frame in enumerate(frames):
        single = predict_seeded(edge, [frame])
        np.testing.assert_allclose(single.hidden[0], batch.hidden[index], atol=1e-4)
        np.testing.assert_allclose(single.fall_probability[0], batch.fall_probability[index], atol=1e-4)


@pytest.mark.parametrize("fall", [True, False], ids=["fall", "no-fall"])
def test_set_fall_bias_makes_the_answer_deterministic(tmp_path: Path, frames: list[np.ndarray], fall: bool):
    directory = build_tiny_edge_model(tmp_path / "tiny")
    set_fall_bias(directory, fall=fall)
    model = ViltEdgeModel.from_pretrained(str(directory), DEFAULT_QUESTION)

    probabilities = model.predict(frames).fall_probability

    if fall:
        assert np.all(probabilities > 0.99), probabilities
    else:
        assert np.all(probabilities < 0.01), probabilities


def test_a_frame_in_a_batch_of_mixed_sizes_gets_the_answer_it_gets_alone(edge: ViltEdgeModel, frames: list[np.ndarray]):
    portrait = np.ascontiguousarray(frames[1].transpose(1, 0, 2))  # 640 high, 480 wide
    small = cv2.resize(frames[2], (200, 150))
    mixed = [frames[0], portrait, small, frames[1]]

    batch = predict_seeded(edge, mixed)

    assert batch.hidden.shape == (4, edge.hidden_size)
    for index, frame in enumerate(mixed):
        alone = predict_seeded(edge, [frame])
        np.testing.assert_allclose(batch.hidden[index], alone.hidden[0], atol=1e-4)
        np.testing.assert_allclose(batch.fall_probability[index], alone.fall_probability[0], atol=1e-5)
    # `preprocess` alone brings them to the first frame's grid without padding (ViLT would fill padding
    # with random patches), and that squashes the portrait frame into another picture
    inputs = edge.preprocess(mixed)
    assert inputs["pixel_values"].shape[1:] == edge.preprocess([frames[0]])["pixel_values"].shape[1:]
    assert bool(inputs["pixel_mask"].all())
    torch.manual_seed(0)
    squashed = edge.infer(inputs)
    assert not np.allclose(squashed.hidden[1], batch.hidden[1], atol=1e-3)


def test_grouped_preprocessing_equals_the_processors_default_bit_for_bit(edge: ViltEdgeModel, frames: list[np.ndarray]):
    default = edge.processor(
        images=frames,
        text=[edge.question] * len(frames),
        return_tensors="pt",
        truncation=True,
        max_length=edge.max_question_tokens,
        input_data_format="channels_last",
    )

    grouped = edge.preprocess(frames)

    assert set(grouped) == set(default)
    for key in default:
        assert torch.equal(grouped[key], default[key]), key
    # and at the real checkpoint's size (384-pixel shortest edge)
    real = real_size_processor()
    images = real.image_processor(frames, return_tensors="pt", input_data_format="channels_last")
    grouped_images = real.image_processor(
        frames, return_tensors="pt", input_data_format="channels_last", disable_grouping=False
    )
    assert images["pixel_values"].shape == (3, 3, 384, 512)
    assert torch.equal(images["pixel_values"], grouped_images["pixel_values"])


def test_checkpoint_without_yes_no_answers_is_refused(tiny_dir: Path, tmp_path: Path):
    directory = tmp_path / "no-yes-no"
    shutil.copytree(tiny_dir, directory)
    model = ViltForQuestionAnswering.from_pretrained(directory)
    answers = [f"answer{index}" for index in range(model.config.num_labels)]
    model.config.id2label = dict(enumerate(answers))
    model.config.label2id = {answer: index for index, answer in enumerate(answers)}
    model.save_pretrained(directory)

    with pytest.raises(ValueError, match="yes"):
        ViltEdgeModel.from_pretrained(str(directory), DEFAULT_QUESTION)


def test_int8_model_keeps_the_hook_and_the_hidden_vectors(
    edge: ViltEdgeModel, tiny_dir: Path, frames: list[np.ndarray]
):
    quantized = ViltEdgeModel.from_pretrained(str(tiny_dir), DEFAULT_QUESTION, quantize_int8=True)
    assert not isinstance(quantized.model.classifier[-1], nn.Linear)  # really replaced by the int8 Linear
    assert quantized.hidden_size == edge.hidden_size

    fp32 = predict_seeded(edge, frames)
    int8 = predict_seeded(quantized, frames)

    cosine = np.sum(fp32.hidden * int8.hidden, axis=1) / (
        np.linalg.norm(fp32.hidden, axis=1) * np.linalg.norm(int8.hidden, axis=1)
    )
    assert np.all(cosine >= 0.99), cosine
    np.testing.assert_allclose(int8.fall_probability, fp32.fall_probability, atol=0.02)


def test_bf16_autocast_keeps_the_answers_within_tolerance(
    edge: ViltEdgeModel, tiny_dir: Path, frames: list[np.ndarray]
):
    bf16 = ViltEdgeModel.from_pretrained(str(tiny_dir), DEFAULT_QUESTION, bf16_autocast=True)

    fp32 = predict_seeded(edge, frames)
    mixed = predict_seeded(bf16, frames)

    assert mixed.hidden.dtype == np.float32 and not np.array_equal(mixed.hidden, fp32.hidden), "bf16 really ran"
    cosine = np.sum(fp32.hidden * mixed.hidden, axis=1) / (
        np.linalg.norm(fp32.hidden, axis=1) * np.linalg.norm(mixed.hidden, axis=1)
    )
    assert np.all(cosine >= 0.99), cosine
    np.testing.assert_allclose(mixed.fall_probability, fp32.fall_probability, atol=0.02)


def test_switcher_architecture_follows_the_paper():
    switcher = Switcher(input_dim=1536)

    linears = [layer for layer in switcher.layers if isinstance(layer, nn.Linear)]
    dropouts = [layer for layer in switcher.layers if isinstance(layer, nn.Dropout)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(1536, 512), (512, 128), (128, 1)]
    assert [layer.p for layer in dropouts] == [0.3, 0.3]
    assert sum(isinstance(layer, nn.ReLU) for layer in switcher.layers) == 2
    assert switcher(torch.zeros(4, 1536)).shape == (4,)
    assert Switcher(input_dim=64)(torch.zeros(2, 64)).shape == (2,)


def test_agreement_probability_is_deterministic_and_restores_training_mode():
    torch.manual_seed(0)
    switcher = Switcher(input_dim=16)
    hidden = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)

    first = switcher.agreement_probability(hidden)
    second = switcher.agreement_probability(hidden)

    assert first.shape == (5,) and first.dtype == np.float32
    assert np.all((first > 0) & (first < 1))
    np.testing.assert_array_equal(first, second)  # dropout is off
    assert switcher.training  # the caller's mode is kept
    with pytest.raises(ValueError, match="16"):
        switcher.agreement_probability(hidden[:, :8])


def metadata_for(version: str, input_dim: int = 16, edge_model: str = "tiny-vilt") -> SwitcherMetadata:
    return SwitcherMetadata(
        version=version,
        input_dim=input_dim,
        threshold=0.7,
        edge_model=edge_model,
        edge_model_revision="abc123",
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        trained=True,
        training_window="2025-01-01/2025-01-02",
        offload_policy={"budget": 0.6},
        metrics={"f1": 0.9},
    )


def test_save_and_load_round_trip(tmp_path: Path):
    torch.manual_seed(1)
    switcher = Switcher(input_dim=16)
    metadata = metadata_for("20250102T030405000000Z")
    hidden = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)

    path = save_switcher(tmp_path / "registry", switcher, metadata)
    loaded, loaded_metadata = load_switcher(path)

    assert path == tmp_path / "registry" / metadata.version
    assert sorted(entry.name for entry in path.iterdir()) == ["switcher.json", "switcher.safetensors"]
    assert loaded_metadata == metadata
    assert not loaded.training
    np.testing.assert_array_equal(loaded.agreement_probability(hidden), switcher.agreement_probability(hidden))
    with pytest.raises(FileExistsError):
        save_switcher(tmp_path / "registry", switcher, metadata)
    with pytest.raises(ValueError, match="input_dim"):
        save_switcher(tmp_path / "registry", Switcher(input_dim=8), metadata_for("20250102T030405000001Z"))


def test_latest_version_picks_the_newest_complete_artifact(tmp_path: Path):
    registry = tmp_path / "registry"
    assert latest_version(registry) is None
    switcher = Switcher(input_dim=16)
    for version in ("20250301T000000000000Z", "20250101T000000000000Z", "20250201T000000000000Z"):
        save_switcher(registry, switcher, metadata_for(version))
    # A write in progress (hidden staging directory) and a stray file are not versions.
    (registry / ".20991231T000000000000Z.partial.tmp").mkdir()
    (registry / "20991231T000000000000Z.txt").write_text("not a switcher")

    assert latest_version(registry) == registry / "20250301T000000000000Z"

    newer = new_version()
    assert re.fullmatch(r"\d{8}T\d{12}Z", newer)
    assert newer > "20250301T000000000000Z"


def test_check_compatible_refuses_another_edge_model_or_hidden_size():
    metadata = metadata_for("20250102T030405000000Z", input_dim=1536, edge_model="dandelin/vilt-b32-finetuned-vqa")

    check_compatible(metadata, "dandelin/vilt-b32-finetuned-vqa", 1536)
    with pytest.raises(SwitcherMismatch, match="768"):
        check_compatible(metadata, "dandelin/vilt-b32-finetuned-vqa", 768)
    with pytest.raises(SwitcherMismatch, match="other/model"):
        check_compatible(metadata, "other/model", 1536)


def test_a_switcher_follows_its_edge_model_to_another_mount_by_content(tmp_path: Path, tiny_dir: Path) -> None:
    """A registry and models mounted elsewhere (a container's /models): the path differs, the content does not."""
    trained_on = tmp_path / "host" / "edge-vilt"
    shutil.copytree(tiny_dir, trained_on)
    create_untrained_switcher(tmp_path / "switchers", 32, str(trained_on))
    mounted = tmp_path / "container" / "edge-vilt"
    shutil.copytree(trained_on, mounted)

    registry = SwitcherRegistry(tmp_path / "switchers", str(mounted), 32, poll_s=60, announce_key=None)
    assert registry.load_newest().metadata.edge_model == str(trained_on), "the same model at another path fits"

    set_fall_bias(mounted, fall=True)  # another model at that path now
    changed = SwitcherRegistry(tmp_path / "switchers", str(mounted), 32, poll_s=60, announce_key=None)
    with pytest.raises(ConfigError, match="content hash"):
        changed.load_newest()


def test_untrained_switcher_is_seeded_and_marked(tmp_path: Path, edge: ViltEdgeModel):
    first = create_untrained_switcher(tmp_path / "a", edge.hidden_size, edge.name, threshold=0.6, seed=3)
    second = create_untrained_switcher(tmp_path / "b", edge.hidden_size, edge.name, threshold=0.6, seed=3)
    switcher_a, metadata = load_switcher(first)
    switcher_b, _ = load_switcher(second)

    assert metadata.trained is False
    assert metadata.threshold == 0.6
    check_compatible(metadata, edge.name, edge.hidden_size)
    hidden = np.ones((2, edge.hidden_size), dtype=np.float32)
    np.testing.assert_array_equal(switcher_a.agreement_probability(hidden), switcher_b.agreement_probability(hidden))


def test_jpeg_encodes_and_decodes_to_rgb_and_corrupt_bytes_to_none() -> None:
    red_bgr = np.zeros((16, 16, 3), np.uint8)
    red_bgr[..., 2] = 255  # OpenCV's channel order is BGR: this image is pure red
    image = decode_jpeg_rgb(encode_jpeg(red_bgr))
    assert image is not None and image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert image[..., 0].min() > 240 and image[..., 1:].max() < 15, "red first"
    again = decode_jpeg_rgb(encode_jpeg_rgb(image))
    assert again is not None and again[..., 0].min() > 240 and again[..., 1:].max() < 15, "RGB in, RGB out"
    assert decode_jpeg_rgb(b"\xff\xd8 truncated") is None


def test_jpeg_decoding_gives_opencvs_exact_pixels_on_real_and_synthetic_images() -> None:
    """The fast decoder (simplejpeg) and OpenCV agree to the last bit: every colour subsampling, grey
    scale, odd sizes, the shared datasets' images when ../shared is there; what simplejpeg refuses
    goes to OpenCV, which decodes a PNG and, like simplejpeg, refuses a truncated JPEG."""
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (643, 481), interpolation=cv2.INTER_CUBIC)
    jpegs = [
        cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling])[1]
        .tobytes()
        for quality in (50, 95)
        for sampling in (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)
    ]  # fmt: skip
    jpegs.append(cv2.imencode(".jpg", cv2.cvtColor(smooth, cv2.COLOR_BGR2GRAY))[1].tobytes())
    jpegs += [path.read_bytes() for path in sorted(SHARED_DATASETS.rglob("*.jpg"))]
    truncated = jpegs[0][: len(jpegs[0]) // 2]
    png = cv2.imencode(".png", smooth)[1].tobytes()
    for image_bytes in [*jpegs, png]:
        expected = cv2.imdecode(np.frombuffer(image_bytes, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
        decoded = decode_jpeg_rgb(image_bytes)
        assert decoded is not None and decoded.shape == expected.shape
        np.testing.assert_array_equal(decoded, expected)
    assert decode_jpeg_rgb(truncated) is None


def auto_settings(tiny_dir: Path, **edge: object) -> Settings:
    return Settings(edge={"model": str(tiny_dir), "quantize_int8": "auto", **edge})


def test_auto_int8_is_on_when_the_calibration_frames_keep_fp32s_decisions(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edge_workers.model"):
        model = load_edge_model(auto_settings(tiny_dir, calibration_tolerance=0.5))
    [check] = [check for check in model.cpu_options if check.option == "quantize_int8"]
    assert check.enabled and check.setting == "auto"
    assert check.frames == len(list(SHIPPED_CALIBRATION_FRAMES.glob("*.jpg"))) == 12, "the shipped frames"
    assert check.decisions_changed == 0 and 0 < check.max_fall_diff <= 0.5
    assert not isinstance(model.model.classifier[-1], nn.Linear), "the model in use is the int8 one"
    assert "edge.quantize_int8 auto: ON; on 12 calibration frames (the shipped frames)" in caplog.text
    metrics = EdgeMetrics()
    metrics.use_cpu_options(model.cpu_options)
    assert metrics.value("fallwatch_edge_cpu_option", option="quantize_int8", setting="auto") == 1
    assert metrics.value("fallwatch_edge_cpu_option", option="bf16_autocast", setting="false") == 0
    assert metrics.value("fallwatch_edge_calibration_max_fall_diff", option="quantize_int8") == check.max_fall_diff


def test_auto_int8_stays_off_when_it_moves_p_fall_beyond_the_tolerance(tiny_dir: Path) -> None:
    measured = load_edge_model(auto_settings(tiny_dir, calibration_tolerance=0.5)).cpu_options
    [on] = [check for check in measured if check.option == "quantize_int8"]
    assert on.max_fall_diff is not None
    model = load_edge_model(auto_settings(tiny_dir, calibration_tolerance=on.max_fall_diff / 2))
    [off] = [check for check in model.cpu_options if check.option == "quantize_int8"]
    assert not off.enabled and off.max_fall_diff == on.max_fall_diff
    assert isinstance(model.model.classifier[-1], nn.Linear), "the fp32 model stays in use"


def test_auto_bf16_checks_the_facilitys_own_frames(tiny_dir: Path, tmp_path: Path, frames: list[np.ndarray]) -> None:
    folder = tmp_path / "own-frames"
    folder.mkdir()
    for index, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"frame-{index}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    settings = Settings(edge={"model": str(tiny_dir), "bf16_autocast": "auto", "calibration_frames": str(folder)})
    model = load_edge_model(settings)
    [check] = [check for check in model.cpu_options if check.option == "bf16_autocast"]
    assert check.frames == len(frames) and check.source == str(folder)
    assert model.bf16_autocast == check.enabled


def test_calibration_frames_without_frames_are_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^edge.calibration_frames: .* holds no JPEG or PNG frames$"):
        load_edge_model(auto_settings(tiny_dir, calibration_frames=str(tmp_path)))


def test_a_seeded_check_beside_live_forwards_draws_the_same_patches(tmp_path: Path, frames: list[np.ndarray]):
    # ViLT samples the patches of a frame over `max_image_length` from torch's global generator. The
    # `auto` checks run while a new version loads beside the live batches (the edge worker's hot
    # reload): a live forward between their seed and their forward would change what they compare.
    directory = build_tiny_edge_model(tmp_path / "tiny")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_image_length": 4}))
    candidate = ViltEdgeModel.from_pretrained(str(directory), DEFAULT_QUESTION)
    serving = ViltEdgeModel.from_pretrained(str(directory), DEFAULT_QUESTION)
    inputs = candidate.preprocess(frames)
    alone = seeded_fall_probability(candidate, inputs)
    unseeded = [candidate.infer(inputs).fall_probability for _ in range(2)]
    assert not np.array_equal(*unseeded), "the frames' patches are sampled"
    stop = threading.Event()

    def live_batches() -> None:
        while not stop.is_set():
            serving.predict(frames)

    thread = threading.Thread(target=live_batches)
    thread.start()
    try:
        beside = [seeded_fall_probability(candidate, inputs) for _ in range(30)]
    finally:
        stop.set()
        thread.join()
    for answers in beside:
        np.testing.assert_array_equal(answers, alone)
