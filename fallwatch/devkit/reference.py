"""`fallwatch models train-reference`: a reference model pair trained here, on a labelled image folder.

No hub weights reach these machines, so the method is made measurable with a pair
trained on the train split of `falls-fallaction` (the validation split stops the
training early; the test split is never read):

- edge: a compact `ViltForQuestionAnswering` (the production class and loading path)
  trained from scratch to answer the fall question yes/no;
- cloud: `cloud_workers.pose.PoseFallCloudModel`, pretrained BlazePose landmarks and a
  small classifier on pose features: stronger, and of a different family.

Both are seeded; both are saved with `save_pretrained` and load through
`edge_workers.model.load_edge_model` / `cloud_workers.loading.load_cloud_model`, like any other checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as transforms
from torch import nn
from transformers import ViltConfig, ViltForQuestionAnswering, ViltProcessor

from cloud_workers.pose import PoseFallClassifier, PoseFallConfig, pose_features
from core.pose import Pose, PoseEstimator
from core.settings import ConfigError
from dmd_offline.metrics import classification_scores
from dmd_offline.sources import ReplayItem, image_folder_items
from dmd_offline.train import fit_early_stopping, fit_on_tensors
from edge_workers.model import ViltEdgeModel, torch_threads
from fallwatch.devkit.tiny_edge import small_processor

log = logging.getLogger(__name__)

EDGE_DIR = "edge-vilt"
CLOUD_DIR = "cloud-pose"
SWITCHER_DIR = "switchers"
DMD_DIR = "dmd"  # config/reference.yaml's dmd.workdir
SUMMARY_FILE = "training.json"
YES, NO = 0, 1  # the compact model's two answers


@dataclass(frozen=True)
class EdgeTrainingConfig:
    """The compact ViLT and how it learns; the defaults are the reference pair's (issue 8 spike)."""

    hidden_size: int = 256  # 128 learnt the scene instead of the person (val F1 0.71)
    layers: int = 4
    heads: int = 4
    image_size: int = 224
    patch_size: int = 32
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    max_epochs: int = 40
    patience: int = 8
    # weigh each class by its inverse frequency: the train split is two-thirds falls, and an
    # unweighted model leans to "fall" wherever it is unsure (unfamiliar rooms, lighting)
    balance_classes: bool = True


@dataclass(frozen=True)
class CloudTrainingConfig:
    hidden_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 400
    patience: int = 40


@dataclass(frozen=True)
class ModelSummary:
    seconds: float
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    val_f1: float
    val_accuracy: float
    notes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelledImages:
    images: list[np.ndarray]  # HxWx3 uint8 RGB
    labels: np.ndarray  # [N] 1 = fall

    @classmethod
    def of(cls, items: list[ReplayItem]) -> LabelledImages:
        return cls([item.image_rgb for item in items], np.array([item.ground_truth for item in items], dtype=np.int64))


def f1_and_accuracy(labels: np.ndarray, fall_probability: np.ndarray) -> tuple[float, float]:
    scores = classification_scores(labels.astype(int), (fall_probability >= 0.5).astype(int))
    return scores.f1, scores.accuracy


def binary_log_loss(labels: np.ndarray, fall_probability: np.ndarray, balanced: bool = False) -> float:
    """Mean log loss; `balanced` weighs both classes equally, whatever their counts."""
    p = np.clip(fall_probability.astype(np.float64), 1e-7, 1 - 1e-7)
    losses = np.where(labels == 1, -np.log(p), -np.log(1 - p))
    if not balanced:
        return float(losses.mean())
    return float(np.mean([losses[labels == label].mean() for label in (0, 1) if (labels == label).any()]))


def shrink(image: np.ndarray, shortest_edge: int) -> np.ndarray:
    """The image with its shorter side at `shortest_edge` (never enlarged): keeps training data small."""
    height, width = image.shape[:2]
    scale = shortest_edge / min(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def batches(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


# --- edge: compact ViLT -----------------------------------------------------------------------
def compact_vilt(processor: ViltProcessor, config: EdgeTrainingConfig) -> ViltForQuestionAnswering:
    return ViltForQuestionAnswering(
        ViltConfig(
            vocab_size=processor.tokenizer.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            intermediate_size=2 * config.hidden_size,
            image_size=config.image_size,
            patch_size=config.patch_size,
            max_position_embeddings=40,
            id2label={YES: "yes", NO: "no"},
            label2id={"yes": YES, "no": NO},
        )
    )


def augmentation(image_size: int) -> transforms.Compose:
    # Crops, flips, small tilts and colour: the data set mixes web photos, stunt video and fisheye
    # frames, and the model must not learn the camera. No 90° turns: its README says a turned
    # standing person looks like a lying one (upstream copies turned that way were dropped).
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.75, 1.33), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.RandomRotation(15)], p=0.3),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.05),
            transforms.RandomGrayscale(0.1),
        ]
    )


class EdgeTrainer:
    """Trains on augmented square crops; validates through `ViltEdgeModel.predict`, the serving path."""

    def __init__(self, question: str, config: EdgeTrainingConfig) -> None:
        self.config = config
        self.processor = small_processor(config.image_size)
        self.model = compact_vilt(self.processor, config)
        self.edge = ViltEdgeModel(self.model, self.processor, question, name="reference-edge")
        self.model.train()
        text = self.processor.tokenizer(question, return_tensors="pt")
        self.text = {name: text[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
        image_processor = self.processor.image_processor
        self.pixel_scale = float(image_processor.rescale_factor)
        self.pixel_mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.augment = augmentation(config.image_size)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Yes/no logits of a batch of uint8 [B, 3, S, S] crops, normalised as the processor does."""
        size = pixels.shape[0]
        normalised = (pixels.float() * self.pixel_scale - self.pixel_mean) / self.pixel_std
        inputs = {name: value.expand(size, -1) for name, value in self.text.items()}
        pixel_mask = torch.ones(size, pixels.shape[2], pixels.shape[3], dtype=torch.long)
        return self.model(**inputs, pixel_values=normalised, pixel_mask=pixel_mask).logits[:, [YES, NO]]

    def val_probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        # ViLT draws its patch order at random; a fixed seed keeps validation comparable across epochs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            parts = batches(len(images), 32)
            return np.concatenate([self.edge.predict(images[part]).fall_probability for part in parts])

    def train(self, train: LabelledImages, val: LabelledImages, seed: int) -> ModelSummary:
        config = self.config
        crops = [torch.from_numpy(shrink(image, config.image_size * 8 // 7)).permute(2, 0, 1) for image in train.images]
        val_images = [shrink(image, config.image_size * 8 // 7) for image in val.images]
        targets = torch.from_numpy(np.where(train.labels == 1, YES, NO))
        counts = torch.bincount(targets, minlength=2).clamp(min=1).float()
        class_weights = len(targets) / (2 * counts) if config.balance_classes else torch.ones(2)
        optimiser = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        steps_per_epoch = -(-len(crops) // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, config.learning_rate, total_steps=config.max_epochs * steps_per_epoch, pct_start=0.1
        )
        shuffle = torch.Generator().manual_seed(seed)

        def train_epoch() -> float:
            total = 0.0
            order = torch.randperm(len(crops), generator=shuffle)
            for part in batches(len(order), config.batch_size):
                batch = order[part]
                pixels = torch.stack([self.augment(crops[i]) for i in batch.tolist()])
                loss = nn.functional.cross_entropy(self.logits(pixels), targets[batch], weight=class_weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(batch)
            log.info("edge epoch: train loss %.3f", total / len(crops))
            return total / len(crops)

        def validation_loss() -> float:
            loss = binary_log_loss(val.labels, self.val_probabilities(val_images), config.balance_classes)
            log.info("edge epoch: validation loss %.3f", loss)
            return loss

        started = time.monotonic()
        fit = fit_early_stopping(self.model, train_epoch, validation_loss, config.max_epochs, config.patience)
        f1, accuracy = f1_and_accuracy(val.labels, self.val_probabilities(val_images))
        return ModelSummary(
            time.monotonic() - started, len(fit.train_losses), fit.best_epoch, fit.best_val_loss, f1, accuracy
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)


# --- cloud: pose classifier -------------------------------------------------------------------
def estimate_poses(estimator: PoseEstimator, images: list[np.ndarray]) -> list[Pose | None]:
    return [estimator(image) for image in images]


def train_pose_classifier(
    train: LabelledImages, val: LabelledImages, config: CloudTrainingConfig, seed: int
) -> tuple[PoseFallClassifier, ModelSummary]:
    estimator = PoseEstimator()
    started = time.monotonic()
    try:
        train_poses, val_poses = estimate_poses(estimator, train.images), estimate_poses(estimator, val.images)
    finally:
        estimator.close()
    pose_seconds = time.monotonic() - started
    found = [i for i, pose in enumerate(train_poses) if pose is not None]
    if not found or not any(pose is not None for pose in val_poses):
        raise ConfigError("BlazePose found no person in the training or validation images: nothing to learn from")
    # a mirrored person falls the same way: each training pose counts twice
    found_poses = [pose for pose in train_poses if pose is not None]
    features = np.stack(
        [pose_features(pose) for pose in found_poses] + [pose_features(pose.mirrored()) for pose in found_poses]
    )
    labels = np.concatenate([train.labels[found], train.labels[found]]).astype(np.float32)
    missed = np.array([pose is None for pose in train_poses])
    # P(fall | nobody found), with one pseudo-count each way: people lying down are the ones BlazePose misses
    no_pose_probability = float((train.labels[missed].sum() + 1) / (missed.sum() + 2))
    val_found = [i for i, pose in enumerate(val_poses) if pose is not None]
    val_x = torch.from_numpy(np.stack([pose_features(pose) for pose in val_poses if pose is not None]))
    val_y = torch.from_numpy(val.labels[val_found].astype(np.float32))
    train_x, train_y = torch.from_numpy(features), torch.from_numpy(labels)

    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = PoseFallClassifier(
            PoseFallConfig(hidden_size=config.hidden_size, no_pose_probability=no_pose_probability)
        )
        classifier.feature_mean.copy_(train_x.mean(dim=0))
        classifier.feature_std.copy_(train_x.std(dim=0) + 1e-6)
        loss_fn = nn.BCEWithLogitsLoss()
        optimiser = torch.optim.Adam(classifier.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        fit = fit_on_tensors(
            classifier,
            optimiser,
            loss_fn,
            (train_x, train_y),
            (val_x, val_y),
            config.batch_size,
            seed,
            config.max_epochs,
            config.patience,
        )
    with torch.inference_mode():
        found_probabilities = torch.sigmoid(classifier(val_x)).numpy()
    val_probabilities = np.full(len(val_poses), no_pose_probability, dtype=np.float32)
    val_probabilities[val_found] = found_probabilities
    f1, accuracy = f1_and_accuracy(val.labels, val_probabilities)
    summary = ModelSummary(
        time.monotonic() - started,
        len(fit.train_losses),
        fit.best_epoch,
        fit.best_val_loss,
        f1,
        accuracy,
        notes={
            "pose_seconds": pose_seconds,
            "no_pose_share_train": float(missed.mean()),
            "no_pose_probability": no_pose_probability,
        },
    )
    return classifier, summary


# --- the pair ---------------------------------------------------------------------------------
@dataclass
class ReferenceSummary:
    dataset: str
    seed: int
    train_images: int
    val_images: int
    edge_dir: str
    cloud_dir: str
    edge: ModelSummary
    cloud: ModelSummary
    seconds: float


def load_splits(folder: Path, limit_per_split: int | None) -> tuple[LabelledImages, LabelledImages]:
    """The train and validation images; the test split is left for the evaluation, unread."""
    items = list(image_folder_items(folder, limit_per_split, splits=("train", "val")))
    train = [item for item in items if item.split == "train"]
    val = [item for item in items if item.split == "val"]
    if not train or not val:
        raise ConfigError(f"{folder}/labels.csv needs rows of both the train and the val split")
    return LabelledImages.of(train), LabelledImages.of(val)


def train_reference_pair(
    folder: Path,
    output: Path,
    question: str,
    seed: int = 0,
    limit_per_split: int | None = None,
    edge_config: EdgeTrainingConfig = EdgeTrainingConfig(),
    cloud_config: CloudTrainingConfig = CloudTrainingConfig(),
) -> ReferenceSummary:
    """Train both models; write `edge-vilt/`, `cloud-pose/` and `training.json` under `output`."""
    started = time.monotonic()
    train, val = load_splits(folder, limit_per_split)
    for stale in (output / SWITCHER_DIR, output / DMD_DIR):
        if stale.exists():
            # DMD data and switchers of the previous pair: a switcher reads the edge model's hidden
            # vectors, and a retrained edge model keeps its name and size but not their meaning
            log.warning("removing %s: it belongs to the pair being replaced", stale)
            shutil.rmtree(stale)
    log.info("training the reference pair on %d train / %d val images", len(train.images), len(val.images))

    edge_dir, cloud_dir = (output / EDGE_DIR).resolve(), (output / CLOUD_DIR).resolve()
    classifier, cloud = train_pose_classifier(train, val, cloud_config, seed)
    classifier.save_pretrained(cloud_dir)
    log.info("cloud (pose) model: val F1 %.3f, %.0f s", cloud.val_f1, cloud.seconds)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer = EdgeTrainer(question, edge_config)
        edge = trainer.train(train, val, seed)
    trainer.save(edge_dir)
    log.info("edge (compact ViLT) model: val F1 %.3f, %.0f s", edge.val_f1, edge.seconds)

    summary = ReferenceSummary(
        str(folder),
        seed,
        len(train.images),
        len(val.images),
        str(edge_dir),
        str(cloud_dir),
        edge,
        cloud,
        time.monotonic() - started,
    )
    (output / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2))
    return summary
