"""Fine-tuning the edge model on a facility's frames, mixed with the data it learnt from.

Targets are 1 (fall) / 0 per frame: a caregiver's label where there is one, the cloud's answer
otherwise (`dmd_offline.adapt`). The model is trained through its serving pre-processing
(`ViltEdgeModel.preprocess`) and yes/no answers, so what it learns is what it is asked live.
`dmd.adapt.trainable` says what learns: the whole (compact) model, the VQA answer head, or the head
and the last N transformer layers of a large one; everything else is frozen. Each epoch draws
`original_share` of its images from the original training data so the model does not forget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import ViltForQuestionAnswering

from core.settings import AdaptSettings, ConfigError
from edge_workers.model import ViltEdgeModel, size_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingImages:
    images: list[np.ndarray]  # HxWx3 uint8 RGB
    targets: np.ndarray  # [N] 1 = fall


def trainable_parameters(model: ViltForQuestionAnswering, trainable: str) -> list[nn.Parameter]:
    """Freeze all but `trainable` (all, head, last:N) and return what learns."""
    if trainable == "all":
        chosen = list(model.parameters())
    else:
        modules: list[nn.Module] = [model.classifier]
        if trainable.startswith("last:"):
            layers = model.vilt.encoder.layer
            count = int(trainable.split(":")[1])
            if count > len(layers):
                raise ConfigError(f"dmd.adapt.trainable {trainable}: the edge model has only {len(layers)} layers")
            modules += [*layers[-count:], model.vilt.layernorm, model.vilt.pooler]
        chosen = [parameter for module in modules for parameter in module.parameters()]
    keep = {id(parameter) for parameter in chosen}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return chosen


def epoch_order(facility: int, original: int, share: float, rng: np.random.Generator) -> list[tuple[str, int]]:
    """One epoch's images: every facility image and enough original ones to make `share` of the epoch."""
    drawn = 0 if original == 0 or share == 0 else min(original, round(facility * share / (1 - share)))
    picks = [("facility", i) for i in range(facility)]
    picks += [("original", int(i)) for i in rng.choice(original, size=drawn, replace=False)]
    return [picks[i] for i in rng.permutation(len(picks))]


def finetune(
    edge: ViltEdgeModel,
    facility: TrainingImages,
    original: TrainingImages | None,
    settings: AdaptSettings,
    seed: int,
) -> ViltEdgeModel:
    """Train `edge` in place on the facility's frames (and original ones); returns it in eval mode."""
    if not len(facility.targets):
        raise ConfigError("no frame with a cloud answer or a caregiver label to adapt on in this window")
    model = edge.model
    parameters = trainable_parameters(model, settings.trainable)
    optimiser = torch.optim.AdamW(parameters, lr=settings.learning_rate)
    yes_no = edge.yes_no_ids
    sources = {"facility": facility, "original": original or TrainingImages([], np.zeros(0, dtype=np.int64))}
    targets = np.concatenate([facility.targets, sources["original"].targets]).astype(np.int64)
    # both answers weigh the same whatever their counts: a room's traffic is mostly "no fall"
    counts = np.bincount(1 - targets, minlength=2).clip(min=1)
    class_weights = torch.tensor(len(targets) / (2 * counts), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(settings.epochs):
            order = epoch_order(len(facility.targets), len(sources["original"].targets), settings.original_share, rng)
            total = 0.0
            for start in range(0, len(order), settings.batch_size):
                picks = order[start : start + settings.batch_size]
                images = [flip_at_random(sources[kind].images[i], rng) for kind, i in picks]
                answers = torch.tensor([0 if sources[kind].targets[i] == 1 else 1 for kind, i in picks])
                # one forward per image size, as `predict` serves them: resized to one, some would be squashed
                groups = size_groups(images)
                logits = torch.cat([model(**edge.preprocess([images[i] for i in group])).logits for group in groups])
                grouped = torch.tensor([i for group in groups for i in group])
                loss = nn.functional.cross_entropy(logits[:, yes_no], answers[grouped], weight=class_weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(picks)
            log.info("adapt epoch %d: loss %.3f over %d images", epoch + 1, total / len(order), len(order))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return edge


def flip_at_random(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mirrored person falls the same way; nothing stronger, the frames are the room's own."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < 0.5 else image


def save_edge(edge: ViltEdgeModel, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    edge.model.save_pretrained(directory)
    edge.processor.save_pretrained(directory)
    return directory
