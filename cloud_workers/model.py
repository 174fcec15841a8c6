"""The cloud model: short clips → P(fall), from a video-language model in one forward pass.

`CloudModel` is the small interface the cloud workers and the offline DMD module use;
`LlavaVideoCloudModel` implements it with LLaVA-NeXT-Video (the paper's large model).
The yes/no answer is read from the next-token logits of the "Yes"/"No" tokens after
the prompt, not from generated text (one forward pass, a real probability, no parsing).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import cv2
import numpy as np
import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

# Spellings of the answer as a single vocabulary entry: SentencePiece marks a leading
# space with "▁", byte-level BPE with "Ġ", some vocabularies keep a literal space.
YES_TOKEN_VARIANTS = ["Yes", "yes", "YES", "▁Yes", "▁yes", "▁YES", "ĠYes", "Ġyes", "ĠYES", " Yes", " yes"]
NO_TOKEN_VARIANTS = ["No", "no", "NO", "▁No", "▁no", "▁NO", "ĠNo", "Ġno", "ĠNO", " No", " no"]

ANSWER_INSTRUCTION = "Answer Yes or No."

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Clip = list[np.ndarray]
PreparedT = TypeVar("PreparedT")
ModelInputs = dict[str, torch.Tensor]


class CloudModel(Protocol[PreparedT]):
    """Clips → fall probability. Each clip is a list of HxWx3 uint8 RGB frames, oldest first.

    `predict` is `prepare` then `predict_prepared`: the worker runs `prepare` (CPU work) for the
    next batch while this batch is in the model, so the two must be safe to run at once on
    different batches.
    """

    name: str
    device: torch.device  # where inputs go (the first device of a model spread by a device map)
    gpu_indices: list[int]  # the GPUs holding its weights (empty on CPU): their energy counts

    def prepare(self, clips: list[Clip]) -> PreparedT:
        """The CPU work before the model (sampling, resizing, tokenizing) of a non-empty batch."""
        ...

    def predict_prepared(self, prepared: PreparedT) -> np.ndarray:
        """P(fall) per clip of a prepared batch, float32, shape [len(clips)]."""
        ...

    def predict(self, clips: list[Clip]) -> np.ndarray:
        """P(fall) per clip, float32, shape [len(clips)]."""
        ...


class VideoTokenMismatchError(RuntimeError):
    """The processed inputs do not carry the video the way the model expects."""


def answer_token_ids(vocab: dict[str, int], variants: list[str]) -> list[int]:
    """Ids of the variants that exist as single tokens, without duplicates, in variant order."""
    ids: list[int] = []
    for variant in variants:
        token_id = vocab.get(variant)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def yes_probability(answer_logits: torch.Tensor, yes_count: int) -> torch.Tensor:
    """P(Yes) per row of [B, yes ids + no ids] logits: the summed softmax of the first `yes_count`, float32.

    A float32 sum of several softmax terms can round to just above 1 (1.0000001); clamped here, where
    it is computed, so no verdict downstream is refused for it.
    """
    answer_probabilities = answer_logits.float().softmax(dim=-1)
    return answer_probabilities[:, :yes_count].sum(dim=-1).clamp(0.0, 1.0)


def sample_frames(clip: Clip, num_frames: int) -> np.ndarray:
    """Exactly `num_frames` frames of one clip, uniformly spaced in time, as [T, H, W, 3] uint8.

    A clip shorter than `num_frames` repeats frames (the spacing rounds to the same
    index): the model's video prompt has a fixed number of frames, every clip of a
    batch must have the same number to be stacked into one tensor, and repeating keeps
    the temporal order and the real motion instead of inventing blank frames.
    All frames are resized to the first frame's size (a camera may change resolution
    mid-clip; the video processor needs one size per clip).
    """
    if not clip:
        raise ValueError("a clip needs at least one frame")
    indices = np.linspace(0, len(clip) - 1, num_frames).round().astype(int)
    height, width = clip[0].shape[:2]
    frames = []
    for index in indices:
        frame = clip[index]
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")
        if frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        frames.append(frame)
    return np.stack(frames)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and is fast on GPUs; CPUs here have no bf16 units (9× slower).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


class LlavaVideoCloudModel:
    """LLaVA-NeXT-Video asked a yes/no question about each clip; P(fall) = P(Yes)."""

    def __init__(
        self,
        model: LlavaNextVideoForConditionalGeneration,
        processor: LlavaNextVideoProcessor,
        question: str,
        num_frames: int,
        name: str,
    ) -> None:
        if num_frames < 1:
            raise ValueError("num_frames must be at least 1")
        self.model = model.eval()
        self.processor = processor
        # Decoder-only model: pad on the left so the last position of every row is the
        # last prompt token, whose logits predict the answer.
        self.processor.tokenizer.padding_side = "left"
        self.question = question
        self.num_frames = num_frames
        self.name = name
        self.device = model.device
        self.gpu_indices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        vocab = processor.tokenizer.get_vocab()
        self.yes_token_ids = answer_token_ids(vocab, YES_TOKEN_VARIANTS)
        self.no_token_ids = answer_token_ids(vocab, NO_TOKEN_VARIANTS)
        if not self.yes_token_ids or not self.no_token_ids:
            raise ValueError(
                f"the tokenizer of {name} has no single-token 'Yes' or 'No' answer "
                f"(looked for {YES_TOKEN_VARIANTS} and {NO_TOKEN_VARIANTS}); "
                "P(fall) cannot be read from the next-token logits"
            )
        self.video_token_id = model.config.video_token_id
        self.tokens_per_frame = video_tokens_per_frame(model.config)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_dir: str,
        question: str,
        num_frames: int = 8,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        device_map: str | None = None,
    ) -> LlavaVideoCloudModel:
        """Load a checkpoint (hub id or local directory) and its processor.

        `device_map` (e.g. "auto") lets accelerate spread the weights over every GPU, for a
        model larger than one card; then `device` is not used.
        """
        if device_map is not None:
            torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = LlavaNextVideoForConditionalGeneration.from_pretrained(
                model_id_or_dir,
                revision=revision or "main",
                dtype=resolve_dtype(dtype, torch_device),
                device_map=device_map,
            )
        else:
            torch_device = resolve_device(device)
            model = LlavaNextVideoForConditionalGeneration.from_pretrained(
                model_id_or_dir, revision=revision or "main", dtype=resolve_dtype(dtype, torch_device)
            )
            torch.nn.Module.to(model, torch_device)
        processor = LlavaNextVideoProcessor.from_pretrained(model_id_or_dir, revision=revision or "main")
        return cls(model, processor, question, num_frames, name=model_id_or_dir)

    def prompt(self, question: str) -> str:
        conversation = [
            {
                "role": "user",
                "content": [{"type": "video"}, {"type": "text", "text": f"{question} {ANSWER_INSTRUCTION}"}],
            }
        ]
        # content parts are a list of dicts; transformers' hint allows only strings
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)  # type: ignore[arg-type]

    def prepare(self, clips: list[Clip]) -> ModelInputs:
        """The processed inputs of clips asked this model's question, on the CPU."""
        return self.model_inputs(clips, [self.question] * len(clips))

    def predict_prepared(self, prepared: ModelInputs) -> np.ndarray:
        return self.yes_probabilities_of(prepared)

    def predict(self, clips: list[Clip]) -> np.ndarray:
        """P(fall) per clip: every clip asked this model's question."""
        return self.yes_probabilities(clips, [self.question] * len(clips))

    def yes_probabilities(self, clips: list[Clip], questions: list[str]) -> np.ndarray:
        """P(Yes) for each clip asked its own question, all in one batched forward pass."""
        if len(clips) != len(questions):
            raise ValueError(f"{len(clips)} clips but {len(questions)} questions")
        if not clips:
            return np.zeros(0, dtype=np.float32)
        return self.yes_probabilities_of(self.model_inputs(clips, questions))

    @torch.inference_mode()
    def yes_probabilities_of(self, inputs: ModelInputs) -> np.ndarray:
        """P(Yes) per row of prepared inputs (`model_inputs`), from one forward pass.

        P(Yes) = the summed softmax probability of the "Yes" token ids divided by that
        of the "Yes" and "No" ids together, at the position after the prompt.
        """
        inputs = self.on_device(inputs)
        # Positions count real tokens only, so a left-padded row sees the same positions
        # as it would alone (`generate` derives them the same way from the attention mask).
        position_ids = (inputs["attention_mask"].cumsum(dim=-1) - 1).clamp(min=0)
        # Only the last position's logits are read, and no token follows: no key/value cache
        # (for the 7B at batch 16 that would be gigabytes of GPU memory written for nothing).
        logits = self.model(**inputs, position_ids=position_ids, logits_to_keep=1, use_cache=False).logits
        logits = logits[:, -1, :].float()
        answer_logits = logits[:, self.yes_token_ids + self.no_token_ids]
        return yes_probability(answer_logits, len(self.yes_token_ids)).cpu().numpy()

    def generate_answers(self, clips: list[Clip], max_new_tokens: int = 3) -> list[str]:
        """Greedy free-text answers; only for comparing against the one-forward reading."""
        if not clips:
            return []
        return self.generate_answers_of(self.model_inputs(clips, [self.question] * len(clips)), max_new_tokens)

    @torch.inference_mode()
    def generate_answers_of(self, inputs: ModelInputs, max_new_tokens: int = 3, min_new_tokens: int = 0) -> list[str]:
        """Greedy answers of prepared inputs; `min_new_tokens` keeps the end-of-sequence token from stopping early."""
        inputs = self.on_device(inputs)
        generated = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [answer.strip() for answer in answers]

    def model_inputs(self, clips: list[Clip], questions: list[str]) -> ModelInputs:
        """The processed, checked model inputs of clips and their questions, on the CPU."""
        videos = [self.resized_video(sample_frames(clip, self.num_frames)) for clip in clips]
        prompts = [self.prompt(question) for question in questions]
        inputs = self.processor(text=prompts, videos=videos, padding=True, return_tensors="pt")
        self.check_video_inputs(inputs, len(clips))
        return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values_videos")}

    def on_device(self, inputs: ModelInputs) -> ModelInputs:
        """Inputs on the model's device, the pixels in its dtype (no copy where they already are)."""
        return {
            "input_ids": inputs["input_ids"].to(self.device),
            "attention_mask": inputs["attention_mask"].to(self.device),
            "pixel_values_videos": inputs["pixel_values_videos"].to(self.device, self.model.dtype),
        }

    def resized_video(self, video: np.ndarray) -> torch.Tensor:
        """One sampled clip [T, H, W, 3] as [T, 3, h, w] uint8, resized exactly as the processor resizes it.

        The processor itself first copies the camera-sized frames of the whole batch into one
        channels-first tensor and resizes that in float32 (for 8 clips of 8 frames of 640×480,
        ~240 MB): with the tiny model, most of the time of a batch, ~5× this path's. Its own
        `resize`, called clip by clip on a channels-last view of the frames (no copy), gives the
        same values (tested equal to the processor's output); the processor then finds the frames
        at its size already, skips its resize, and only crops and normalizes small frames.
        """
        frames = torch.from_numpy(video).permute(0, 3, 1, 2)
        processor = self.processor.video_processor
        if not processor.do_resize:  # a checkpoint that feeds frames at their own size
            return frames
        return processor.resize(frames, size=processor.size, resample=processor.resample)

    def check_video_inputs(self, inputs: dict[str, torch.Tensor], num_clips: int) -> None:
        """Fail loudly if the video would be dropped: the model would answer from text alone.

        A mismatched processor (e.g. `LlavaNextProcessor` given `videos=`) returns no
        `pixel_values_videos` and leaves a single `<video>` token, and the model then
        answers without seeing the clip.
        """
        if "pixel_values_videos" not in inputs:
            raise VideoTokenMismatchError(
                f"the processor of {self.name} returned no pixel_values_videos "
                f"(keys: {sorted(inputs.keys())}); the model would answer without seeing the video"
            )
        frames = inputs["pixel_values_videos"].shape[1]
        if inputs["pixel_values_videos"].shape[0] != num_clips or frames != self.num_frames:
            raise VideoTokenMismatchError(
                f"pixel_values_videos has shape {tuple(inputs['pixel_values_videos'].shape)}, "
                f"expected {num_clips} clips of {self.num_frames} frames"
            )
        expected = self.tokens_per_frame * self.num_frames
        video_tokens_per_row = (inputs["input_ids"] == self.video_token_id).sum(dim=-1).tolist()
        if any(count != expected for count in video_tokens_per_row):
            raise VideoTokenMismatchError(
                f"video tokens per prompt {video_tokens_per_row}, expected {expected} "
                f"({self.tokens_per_frame} per frame × {self.num_frames} frames); "
                "the processor and the model config disagree"
            )


def video_tokens_per_frame(config: LlavaNextVideoConfig) -> int:
    """Video tokens one frame becomes: the vision patch grid, average-pooled by the spatial stride.

    For LLaVA-NeXT-Video-7B: 336 / 14 = 24 patches a side, pooled by 2 → 12² = 144.
    """
    vision: Any = config.vision_config  # a CLIPVisionConfig; typed as any sub-config
    patches_per_side = vision.image_size // vision.patch_size
    return (patches_per_side // config.spatial_pool_stride) ** 2
