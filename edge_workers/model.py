"""The edge model: images → fall probability + the hidden vector the switcher reads.

`EdgeModel` is the small interface DESIGN.md names, so another small model with the
same I/O can replace ViLT. `ViltEdgeModel` is the paper's edge model: ViLT VQA asked a
yes/no question; its "last hidden layer" is the input of the final Linear of the VQA
classifier head, read with a forward pre-hook (never by re-implementing the head).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import cv2
import numpy as np
import torch
from torch import nn
from transformers import ViltForQuestionAnswering, ViltProcessor

from core.checkpoints import loading
from core.settings import ConfigError, EdgeSettings, Settings

logger = logging.getLogger(__name__)

# ViLT's text position embeddings stop at 40 tokens (config.max_position_embeddings).
MAX_QUESTION_TOKENS = 40
# Frames checked by `auto` CPU options when the facility gives none (see calibration/README.md).
SHIPPED_CALIBRATION_FRAMES = Path(__file__).with_name("calibration")
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class EdgeBatch:
    """The edge model's output for a batch of B frames."""

    fall_probability: np.ndarray  # [B] float32, P(fall)
    hidden: np.ndarray  # [B, D] float32, the switcher's input


@runtime_checkable
class EdgeModel(Protocol):
    """Images (HxWx3 uint8 RGB) → fall probability and hidden vector, one batch at a time."""

    name: str
    hidden_size: int

    def predict(self, images: list[np.ndarray]) -> EdgeBatch: ...


class ViltEdgeModel:
    """`ViltForQuestionAnswering` asked one yes/no question; P(fall) = softmax(yes, no)[yes].

    One `predict` at a time per instance: the hook hands the hidden vector over through `self`.
    """

    def __init__(
        self,
        model: ViltForQuestionAnswering,
        processor: ViltProcessor,
        question: str,
        name: str,
        revision: str | None = None,
        device: str = "cpu",
        bf16_autocast: bool = False,
    ) -> None:
        label2id = cast(dict[str, int], model.config.label2id or {})
        missing = [answer for answer in ("yes", "no") if answer not in label2id]
        if missing:
            raise ValueError(
                f"edge model {name!r} has no answer label(s) {missing} in config.label2id; "
                "a VQA checkpoint with 'yes' and 'no' answers is required"
            )
        self.model = model
        nn.Module.to(model, device).eval()
        self.processor = processor
        self.question = question
        self.name = name
        self.revision = revision
        self.device = torch.device(device)
        # Matmuls in bf16, the rest in fp32: faster on CPUs with bf16 units (avx512_bf16, AMX), slower without.
        self.bf16_autocast = bf16_autocast
        self.yes_no_ids = [int(label2id["yes"]), int(label2id["no"])]
        max_tokens = min(MAX_QUESTION_TOKENS, model.config.max_position_embeddings)
        question_tokens = len(processor.tokenizer(question)["input_ids"])
        if question_tokens > max_tokens:
            # Truncation keeps inference running, but a cut question may ask something else.
            logger.warning(
                "question has %d tokens, ViLT reads only the first %d: shorten it", question_tokens, max_tokens
            )
        self.max_question_tokens = max_tokens

        final_linear = self.model.classifier[-1]
        self.hidden_size: int = final_linear.in_features
        # the CPU options in use and, for `auto` ones, what the calibration check found (load_edge_model)
        self.cpu_options: list[CpuOptionCheck] = []
        self._captured_hidden: torch.Tensor | None = None
        # Registered once, on the module that is in the model now (quantisation replaces modules,
        # so this must run after it): the input of the last Linear is the paper's hidden layer.
        final_linear.register_forward_pre_hook(self._capture_hidden)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_dir: str,
        question: str,
        revision: str | None = None,
        device: str = "cpu",
        quantize_int8: bool = False,
        bf16_autocast: bool = False,
    ) -> ViltEdgeModel:
        """Load a hub id or a local checkpoint directory (model and processor)."""
        model = ViltForQuestionAnswering.from_pretrained(model_id_or_dir, revision=revision or "main")
        processor = ViltProcessor.from_pretrained(model_id_or_dir, revision=revision or "main")
        if quantize_int8:
            if device != "cpu":
                raise ValueError("dynamic int8 quantisation runs on the CPU only")
            model = quantized_int8(model)
        return cls(
            model,
            processor,
            question,
            name=model_id_or_dir,
            revision=revision,
            device=device,
            bf16_autocast=bf16_autocast,
        )

    def with_int8(self) -> ViltEdgeModel:
        """A copy of this model with dynamic int8 Linear layers (this one is left as it is)."""
        copied = ViltEdgeModel(
            quantized_int8(copy.deepcopy(self.model)),
            self.processor,
            self.question,
            name=self.name,
            revision=self.revision,
            bf16_autocast=self.bf16_autocast,
        )
        copied.cpu_options = list(self.cpu_options)
        return copied

    def _capture_hidden(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._captured_hidden = args[0]

    def preprocess(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of HxWx3 uint8 RGB frames of one size (`predict` groups a batch by size);
        other sizes are resized to the first frame's, which squashes them (for timing and calibration)."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        height, width = images[0].shape[:2]
        # ViLT pads a batch of mixed sizes with randomly sampled patches, so one frame's answer
        # would depend on its neighbours: bring every frame to the first one's size instead.
        same_size = [
            image
            if image.shape[:2] == (height, width)
            else cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            for image in images
        ]
        encoding = self.processor(
            images=same_size,
            text=[self.question] * len(same_size),
            return_tensors="pt",
            truncation=True,
            max_length=self.max_question_tokens,
            input_data_format="channels_last",
            # On CPU the processor works image by image unless told to group same-size images into one
            # tensor; grouped gives the same values bit for bit (tested), measured ~20 % faster.
            disable_grouping=False,
        )
        return {key: value.to(self.device) for key, value in encoding.items()}

    def predict(self, images: list[np.ndarray]) -> EdgeBatch:
        """P(fall) and the hidden vector of each frame: one batched forward pass per frame size, so a frame's
        answer is the one it gets alone, whatever the size of the other cameras' frames in its batch."""
        groups = size_groups(images)
        if len(groups) == 1:
            return self.infer(self.preprocess(images))
        fall_probability = np.zeros(len(images), np.float32)
        hidden = np.zeros((len(images), self.hidden_size), np.float32)
        for indices in groups:
            output = self.infer(self.preprocess([images[i] for i in indices]))
            fall_probability[indices], hidden[indices] = output.fall_probability, output.hidden
        return EdgeBatch(fall_probability=fall_probability, hidden=hidden)

    def infer(self, inputs: dict[str, Any]) -> EdgeBatch:
        """Run the model on already preprocessed inputs."""
        with GLOBAL_GENERATOR:
            self._captured_hidden = None
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16_autocast):
                logits = self.model(**inputs).logits
            captured, self._captured_hidden = self._captured_hidden, None
        if captured is None:
            raise RuntimeError("the hidden-layer hook did not fire; was the classifier head replaced?")
        yes_no = logits[:, self.yes_no_ids].float().softmax(dim=-1)
        fall_probability = yes_no[:, 0].cpu().numpy().astype(np.float32)
        hidden = captured.float().cpu().numpy().astype(np.float32)
        return EdgeBatch(fall_probability=fall_probability, hidden=hidden)


# ViLT draws the patches of a frame larger than `max_image_length` patches from torch's global
# generator. A seeded forward (the `auto` checks, run while a new version loads beside the live
# batches) holds this around its seed and forward so no other forward moves the draws in between.
GLOBAL_GENERATOR = threading.RLock()


def size_groups(images: list[np.ndarray]) -> list[list[int]]:
    """The images' indices grouped by height and width, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((image.shape[0], image.shape[1]), []).append(index)
    return list(groups.values())


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch CPU threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def quantized_int8(model: ModuleT) -> ModuleT:
    """Dynamic int8 on the Linear layers (CPU): weights int8, activations per batch; a copy, same class."""
    return cast(ModuleT, torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8))


CpuOption = Literal["quantize_int8", "bf16_autocast"]


@dataclass(frozen=True)
class CpuOptionCheck:
    """A CPU option of the edge model: its setting, whether it is on and, for `auto`, what decided it."""

    option: CpuOption
    setting: bool | Literal["auto"]
    enabled: bool
    frames: int = 0  # calibration frames checked (0: the setting decided alone)
    max_fall_diff: float | None = None  # largest |P(fall) - P(fall) without the option| over them
    decisions_changed: int | None = None  # frames whose fall / no-fall decision the option changed
    tolerance: float | None = None
    source: str = ""

    def describe(self) -> str:
        if self.setting != "auto":
            return f"edge.{self.option}: {'on' if self.enabled else 'off'} (set)"
        return (
            f"edge.{self.option} auto: {'ON' if self.enabled else 'OFF'}; on {self.frames} calibration frames "
            f"({self.source}) max |dP(fall)| {self.max_fall_diff:.4f} (tolerance {self.tolerance}), "
            f"{self.decisions_changed} decision(s) changed"
        )


def calibration_images(folder: Path | None) -> tuple[list[np.ndarray], str]:
    """The calibration frames (RGB) and where they came from: the facility's folder, else the shipped ones."""
    source = folder or SHIPPED_CALIBRATION_FRAMES
    setting = "edge.calibration_frames"
    if not source.is_dir():
        raise ConfigError(f"{setting}: {source} is not a folder")
    paths = sorted(path for path in source.iterdir() if path.suffix.lower() in CALIBRATION_SUFFIXES)
    images = [cv2.imread(str(path), cv2.IMREAD_COLOR_RGB) for path in paths]
    unreadable = [path.name for path, image in zip(paths, images, strict=True) if image is None]
    if unreadable:
        raise ConfigError(f"{setting}: cannot read {', '.join(unreadable)} in {source}")
    if not images:
        raise ConfigError(f"{setting}: {source} holds no JPEG or PNG frames")
    return [image for image in images if image is not None], ("the shipped frames" if folder is None else str(folder))


def calibrate(model: ViltEdgeModel, edge: EdgeSettings) -> ViltEdgeModel:
    """Turn on each `auto` CPU option whose answers on the calibration frames stay fp32's.

    An option is on when no frame's fall / no-fall decision (at edge.decision_threshold) changes and
    P(fall) moves by at most edge.calibration_tolerance on every frame; each option is checked on
    top of the ones before it (int8, then bf16), against the model without any `auto` option.
    """
    images, source = calibration_images(edge.calibration_frames)
    inputs = model.preprocess(images)
    reference = seeded_fall_probability(model, inputs)
    for option in ("quantize_int8", "bf16_autocast"):
        if getattr(edge, option) != "auto":
            continue
        candidate = model.with_int8() if option == "quantize_int8" else model
        if option == "bf16_autocast":
            candidate.bf16_autocast = True
        answers = seeded_fall_probability(candidate, inputs)
        max_diff = float(np.max(np.abs(answers - reference)))
        changed = int(np.sum((answers >= edge.decision_threshold) != (reference >= edge.decision_threshold)))
        enabled = changed == 0 and max_diff <= edge.calibration_tolerance
        if option == "bf16_autocast" and not enabled:
            candidate.bf16_autocast = False
        check = CpuOptionCheck(
            option, "auto", enabled, len(images), max_diff, changed, edge.calibration_tolerance, source
        )
        logger.info(check.describe())
        if enabled:
            model = candidate
        model.cpu_options.append(check)
    return model


def seeded_fall_probability(model: ViltEdgeModel, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """P(fall) with the same random patch sampling every time, so only the option differs between runs."""
    with GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model.infer(inputs).fall_probability


def load_edge_model(settings: Settings, directory: Path | None = None) -> ViltEdgeModel:
    """The configured edge model (or the one in `directory`, a published version's) with its CPU options;
    `auto` ones are checked on calibration frames first."""
    edge = settings.edge
    source = edge.model if directory is None else str(directory)
    with loading("edge", source):
        model = ViltEdgeModel.from_pretrained(
            source,
            edge.question,
            revision=edge.revision if directory is None else None,
            quantize_int8=edge.quantize_int8 is True,
            bf16_autocast=edge.bf16_autocast is True,
        )
    for option in ("quantize_int8", "bf16_autocast"):
        setting = getattr(edge, option)
        if setting != "auto":
            model.cpu_options.append(CpuOptionCheck(option, setting, setting))
    if "auto" in (edge.quantize_int8, edge.bf16_autocast):
        model = calibrate(model, edge)
    return model
