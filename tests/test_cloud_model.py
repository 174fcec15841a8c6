"""The cloud model on a tiny random LLaVA-NeXT-Video checkpoint, loaded through the real path.

Frames come from the real clips in ../shared/datasets/fall-clips when they are there,
otherwise from numpy; the tests do not depend on ../shared.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import LlavaNextVideoConfig

from cloud_workers.model import (
    LlavaVideoCloudModel,
    VideoTokenMismatchError,
    sample_frames,
    video_tokens_per_frame,
    yes_probability,
)
from fallwatch.devkit.tiny_cloud import (
    TINY_TOKENS_PER_FRAME,
    build_random_full_size_cloud_model,
    build_tiny_cloud_model,
    restrict_to_answers,
    set_fall_bias,
)

FALL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fall-clips"
QUESTION = "Is the person falling or lying on the floor?"
SHORT_QUESTION = "Is the person falling?"
NUM_FRAMES = 8


def read_clip(path: Path, max_frames: int, step: int) -> list[np.ndarray]:
    """Every `step`-th frame of a video file as RGB, at most `max_frames` of them."""
    capture = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    index = 0
    try:
        while len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index % step == 0:
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    return frames


@pytest.fixture(scope="module")
def clips() -> list[list[np.ndarray]]:
    """Six clips of 12 frames each: the real fall / no-fall videos, or synthetic ones."""
    paths = sorted(FALL_CLIPS.glob("*.mp4"))
    real = [read_clip(path, max_frames=12, step=8) for path in paths]
    if len(real) >= 3 and all(len(clip) == 12 for clip in real):
        return real
    return [synthetic_clip(seed) for seed in range(6)]


def synthetic_clip(seed: int) -> list[np.ndarray]:
    """12 frames of a bright block sliding down over a background colour of its own."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, 3, dtype=np.uint8)
    frames = []
    for step in range(12):
        frame = np.empty((120, 160, 3), dtype=np.uint8)
        frame[:] = background
        frame[step * 8 : step * 8 + 30, 60:100] = 255 - background
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cloud_model(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> LlavaVideoCloudModel:
    return LlavaVideoCloudModel.from_pretrained(str(tiny_dir), QUESTION, num_frames=NUM_FRAMES, device="cpu")


def load_fall_biased(tmp_path: Path, fall: bool) -> LlavaVideoCloudModel:
    directory = build_tiny_cloud_model(tmp_path / "tiny")
    set_fall_bias(directory, fall)
    return LlavaVideoCloudModel.from_pretrained(str(directory), QUESTION, num_frames=NUM_FRAMES)


def test_tiny_checkpoint_loads_through_from_pretrained(tiny_dir: Path, model: LlavaVideoCloudModel) -> None:
    assert (tiny_dir / "config.json").is_file()
    assert (tiny_dir / "chat_template.jinja").is_file() or (tiny_dir / "processor_config.json").is_file()
    assert model.name == str(tiny_dir)
    assert model.device.type == "cpu"
    assert model.processor.tokenizer.padding_side == "left"
    assert model.tokens_per_frame == TINY_TOKENS_PER_FRAME == 16
    tokenizer = model.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(model.yes_token_ids) == ["Yes", "yes"]
    assert tokenizer.convert_ids_to_tokens(model.no_token_ids) == ["No", "no"]
    prompt = model.prompt(QUESTION)
    assert prompt.startswith("USER: <video>\n")
    assert prompt.endswith("Answer Yes or No. ASSISTANT:")


def test_tokens_per_frame_of_the_real_7b_config_is_144() -> None:
    # LlavaNextVideoConfig() defaults to the 7B's CLIP ViT-L/14-336 and 2×2 pooling.
    assert video_tokens_per_frame(LlavaNextVideoConfig()) == 144


def test_the_random_7b_for_benchmarks_has_the_real_size_and_video_tokens() -> None:
    # Built on the meta device: the shapes of the real thing without allocating 14 GB.
    model = build_random_full_size_cloud_model(QUESTION, NUM_FRAMES, torch.device("meta"), torch.bfloat16)
    parameters = sum(p.numel() for p in model.model.parameters())
    assert 7.0e9 < parameters < 7.1e9, "DESIGN.md: 7.06 B parameters"
    assert model.model.dtype == torch.bfloat16 and model.tokens_per_frame == 144
    video = sample_frames([np.zeros((480, 640, 3), np.uint8)] * NUM_FRAMES, NUM_FRAMES)
    inputs = model.processor(text=[model.prompt(QUESTION)], videos=[video], return_tensors="pt")
    model.check_video_inputs(inputs, num_clips=1)  # 144 × 8 video tokens, 8 frames of 336 px
    assert tuple(inputs["pixel_values_videos"].shape) == (1, NUM_FRAMES, 3, 336, 336)


def test_predict_returns_one_probability_per_clip(model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]) -> None:
    batch = [clip[:NUM_FRAMES] for clip in clips[:3]]
    probabilities = model.predict(batch)
    assert probabilities.shape == (3,)
    assert probabilities.dtype == np.float32
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert model.predict([]).shape == (0,)


def test_the_answer_depends_on_the_video(model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]) -> None:
    # If the video were dropped, every clip would get the same text-only answer.
    probabilities = model.predict(clips)
    assert np.ptp(probabilities) > 1e-3


def test_batched_predict_equals_per_clip_predict(model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]) -> None:
    batched = model.predict(clips)
    one_by_one = np.array([model.predict([clip])[0] for clip in clips])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)


def test_left_padding_gives_each_prompt_the_answer_it_gets_alone(
    model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]
) -> None:
    # One question for every clip gives prompts of one length: no padding at all. Padding
    # arises when prompts differ in length, so ask questions of different lengths.
    tokenizer = model.processor.tokenizer
    lengths = {len(tokenizer(model.prompt(q))["input_ids"]) for q in (QUESTION, SHORT_QUESTION)}
    assert len(lengths) == 2
    questions = [QUESTION if index % 2 else SHORT_QUESTION for index in range(len(clips))]
    batched = model.yes_probabilities(clips, questions)
    one_by_one = np.array(
        [model.yes_probabilities([clip], [question])[0] for clip, question in zip(clips, questions, strict=True)]
    )
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)
    # The two questions give different answers, so a row that read its neighbour's
    # padding or the wrong last position would show.
    assert not np.allclose(
        model.yes_probabilities(clips[:1], [QUESTION]), model.yes_probabilities(clips[:1], [SHORT_QUESTION])
    )


@pytest.mark.parametrize("do_resize", [True, False])
def test_pixel_values_are_the_processors_own(
    model: LlavaVideoCloudModel, clips: list[list[np.ndarray]], monkeypatch: pytest.MonkeyPatch, do_resize: bool
) -> None:
    # model_inputs resizes clip by clip before the processor sees the frames (much cheaper than the
    # processor resizing the whole batch); the pixel values must still be the processor's own, bit
    # for bit (tolerance 0), for camera-sized frames of several sizes in one batch.
    monkeypatch.setattr(model.processor.video_processor, "do_resize", do_resize)
    cameras = [
        [cv2.resize(frame, size) for frame in clip]
        for clip, size in zip(clips[:3], [(640, 480), (1280, 720), (160, 120)], strict=True)
    ]
    prompts = [model.prompt(QUESTION)] * len(cameras)
    videos = [sample_frames(clip, NUM_FRAMES) for clip in cameras]
    expected = model.processor(text=prompts, videos=videos, padding=True, return_tensors="pt")
    inputs = model.model_inputs(cameras, [QUESTION] * len(cameras))
    assert torch.equal(inputs["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])


def test_video_token_guard_trips_when_the_video_is_dropped(
    model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]
) -> None:
    prompt = model.prompt(QUESTION)
    text_only = model.processor(text=[prompt], return_tensors="pt")
    with pytest.raises(VideoTokenMismatchError, match="pixel_values_videos"):
        model.check_video_inputs(text_only, num_clips=1)

    video = sample_frames(clips[0], NUM_FRAMES)
    prompt_without_video_token = prompt.replace("<video>", "")
    orphan_video = model.processor(text=[prompt_without_video_token], videos=[video], return_tensors="pt")
    assert "pixel_values_videos" in orphan_video
    with pytest.raises(VideoTokenMismatchError, match="video tokens per prompt"):
        model.check_video_inputs(orphan_video, num_clips=1)

    complete = model.processor(text=[prompt], videos=[video], return_tensors="pt")
    model.check_video_inputs(complete, num_clips=1)


def test_fall_bias_true_says_yes(tmp_path: Path, clips: list[list[np.ndarray]]) -> None:
    model = load_fall_biased(tmp_path, fall=True)
    assert np.all(model.predict(clips[:3]) > 0.99)
    assert all(answer.split()[0] == "Yes" for answer in model.generate_answers(clips[:3]))


def test_fall_bias_false_says_no(tmp_path: Path, clips: list[list[np.ndarray]]) -> None:
    model = load_fall_biased(tmp_path, fall=False)
    assert np.all(model.predict(clips[:3]) < 0.01)
    assert all(answer.split()[0] == "No" for answer in model.generate_answers(clips[:3]))


def test_one_forward_agrees_with_generate(tmp_path: Path, clips: list[list[np.ndarray]]) -> None:
    # Each model may only say "Yes" or "No", but which one is random per clip; a few seeds
    # make sure both answers occur, so the comparison covers both decisions.
    all_first_words: list[str] = []
    for seed in range(3):
        directory = build_tiny_cloud_model(tmp_path / f"tiny-{seed}", seed=seed)
        restrict_to_answers(directory)
        model = LlavaVideoCloudModel.from_pretrained(str(directory), QUESTION, num_frames=NUM_FRAMES)
        probabilities = model.predict(clips)
        first_words = [answer.split()[0] for answer in model.generate_answers(clips, max_new_tokens=1)]
        assert first_words == ["Yes" if p > 0.5 else "No" for p in probabilities], f"seed {seed}"
        all_first_words += first_words
    assert set(all_first_words) == {"Yes", "No"}


def test_short_clips_are_padded_by_repeating_frames(model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]) -> None:
    short = [clips[0][:1], clips[1][:3], clips[2][:5]]
    probabilities = model.predict(short)
    assert probabilities.shape == (3,)
    assert np.all((probabilities >= 0) & (probabilities <= 1))

    sampled = sample_frames(clips[1][:3], NUM_FRAMES)
    assert sampled.shape[0] == NUM_FRAMES
    source_index = [
        next(i for i, frame in enumerate(clips[1][:3]) if np.array_equal(frame, sampled_frame))
        for sampled_frame in sampled
    ]
    assert source_index == sorted(source_index)
    assert set(source_index) == {0, 1, 2}


def test_frames_of_one_clip_are_resized_to_one_size(clips: list[list[np.ndarray]]) -> None:
    first = clips[0][0]
    height, width = first.shape[:2]
    half = cv2.resize(clips[0][1], (width // 2, height // 2))
    sampled = sample_frames([first, half], 2)
    assert sampled.shape == (2, height, width, 3)
    assert sampled.dtype == np.uint8


def test_bad_inputs_are_rejected(model: LlavaVideoCloudModel, clips: list[list[np.ndarray]]) -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        model.predict([[]])
    with pytest.raises(ValueError, match="uint8"):
        model.predict([[clips[0][0].astype(np.float32)]])
    with pytest.raises(ValueError, match="questions"):
        model.yes_probabilities(clips[:2], [QUESTION])


def test_p_yes_summed_in_float32_never_exceeds_one() -> None:
    # Two "Yes" spellings and three "No" ones whose float32 softmax sum rounds to 1.0000001: the cloud
    # worker died validating such a verdict (P(fall) must be at most 1) and the edge answered alone.
    logits = torch.tensor([[1.300535798072815, -5.2027506828308105, -44.00814437866211, -37.33871078491211, -37.6961]])
    assert logits.softmax(dim=-1)[:, :2].sum(dim=-1).item() > 1.0, "the float32 sum itself overflows"
    p_yes = yes_probability(logits, yes_count=2)
    assert p_yes.dtype == torch.float32
    assert p_yes.item() == 1.0
