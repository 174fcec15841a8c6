"""Training the switcher on DMD data (paper A.3), seeded and reproducible.

`edge_workers.switcher.Switcher` (hidden → 512 → 128 → 1, dropout 0.3) with Adam
(lr 1e-4 by default) and `BCEWithLogitsLoss`; the input size is read from the data.
The two models usually agree far more often than not, so the loss weighs the
positive (agreement) class by n_negative / n_positive, and the weight is reported.
Early stopping: the weights of the epoch with the lowest validation loss are kept,
and training stops after `patience` epochs without a better one.

Inputs (`dmd.switcher_inputs`): the hidden vector (the paper's), or with the edge's
confidence, or also the edge's P(fall) on the camera's last `dmd.switcher_history` frames.
Target (`dmd.switcher_target`): agreement (the paper's), or *deferral helps*: where ground
truth is known, a row is a "defer" (0) only when the edge is wrong and the cloud right; where
both are wrong, deferring buys nothing. Rows without ground truth keep the agreement target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.settings import ConfigError, DmdSettings
from dmd_offline.dataset import UNKNOWN, DmdData, agreement_scores, edge_history
from edge_workers.model import torch_threads
from edge_workers.switcher import Switcher, SwitcherInputs, history_length, input_size

WEIGHTS_FILE = "switcher.safetensors"
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class TrainingReport:
    input_dim: int
    seed: int
    train_rows: int
    val_rows: int
    agreement_share_train: float  # class balance of the target
    positive_class_weight: float  # pos_weight of the loss: n_disagree / n_agree
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    val_accuracy: float  # agreement predicted right at score 0.5, on the validation split
    train_losses: list[float]
    val_losses: list[float]
    inputs: SwitcherInputs = "hidden"
    target: str = "agreement"
    history: int = 0


def switcher_targets(data: DmdData, target: str) -> np.ndarray:
    """1 = keep the edge's answer, 0 = defer; see the module docstring."""
    agreement = data.column("label").astype(np.float32)
    if target == "agreement":
        return agreement
    truth = data.column("ground_truth").astype(int)
    known = truth != UNKNOWN
    edge_wrong = data.column("small_prediction").astype(int) != truth
    cloud_right = data.column("large_prediction").astype(int) == truth
    return np.where(known, (~(edge_wrong & cloud_right)).astype(np.float32), agreement)


def switcher_rows(switcher: Switcher, data: DmdData) -> torch.Tensor:
    probabilities = data.column("small_fall_probability").astype(np.float32)
    features = switcher.features(data.hidden, probabilities, edge_history(data, switcher.history))
    return torch.as_tensor(features, dtype=torch.float32)


def class_weight(labels: np.ndarray) -> float:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ConfigError(
            f"the training split has only {'agreements' if negatives == 0 else 'disagreements'} "
            f"({len(labels)} rows): a switcher cannot learn when the models disagree; replay more data"
        )
    return negatives / positives


@dataclass(frozen=True)
class Fit:
    best_epoch: int
    best_val_loss: float
    train_losses: list[float]
    val_losses: list[float]


def fit_early_stopping(
    model: nn.Module,
    train_epoch: Callable[[], float],
    validation_loss: Callable[[], float],
    max_epochs: int,
    patience: int,
) -> Fit:
    """Train epoch by epoch until `patience` epochs bring no better validation loss.

    `train_epoch` runs one epoch and returns its mean loss; `validation_loss` is called in
    eval mode without gradients. The model ends in eval mode with its best epoch's weights.
    """
    best_loss, best_epoch, best_state = float("inf"), 0, None
    train_losses: list[float] = []
    val_losses: list[float] = []
    for epoch in range(1, max_epochs + 1):
        model.train()
        train_losses.append(train_epoch())
        model.eval()
        with torch.no_grad():
            val_loss = validation_loss()
        val_losses.append(val_loss)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    if best_state is None:
        raise ConfigError(f"training diverged: the validation loss was never finite ({val_losses[:3]}…)")
    model.load_state_dict(best_state)
    model.eval()
    return Fit(best_epoch, best_loss, train_losses, val_losses)


def minibatch_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    shuffle: torch.Generator,
) -> float:
    """One shuffled pass over in-memory tensors; the mean training loss."""
    permutation = torch.randperm(len(inputs), generator=shuffle)
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        batch = permutation[start : start + batch_size]
        optimiser.zero_grad()
        loss = loss_fn(model(inputs[batch]), targets[batch])
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch)
    return total / len(inputs)


def fit_on_tensors(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    loss_fn: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    seed: int,
    max_epochs: int,
    patience: int,
) -> Fit:
    """Shuffled minibatch epochs over in-memory (inputs, targets), early stopping on the validation loss."""
    shuffle = torch.Generator().manual_seed(seed)
    return fit_early_stopping(
        model,
        lambda: minibatch_epoch(model, optimiser, loss_fn, *train, batch_size, shuffle),
        lambda: float(loss_fn(model(val[0]), val[1])),
        max_epochs,
        patience,
    )


def train_switcher(train: DmdData, val: DmdData, settings: DmdSettings) -> tuple[Switcher, TrainingReport]:
    if not val.rows:
        raise ConfigError("the validation split is empty: early stopping needs one (dmd.val_share, or split=val)")
    train_labels = switcher_targets(train, settings.switcher_target)
    train_y = torch.as_tensor(train_labels)
    val_y = torch.as_tensor(switcher_targets(val, settings.switcher_target))
    weight = class_weight(train_labels)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))

    # fork_rng: the caller's random stream stays as it was; the same seed gives the same switcher.
    # One thread: a small MLP on small batches gains nothing from more, and on a busy machine the
    # threads wait on each other (measured 6x slower with 2 threads on 2 shared cores).
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        inputs = settings.switcher_inputs
        history = history_length(inputs, settings.switcher_history)
        switcher = Switcher(input_size(inputs, train.hidden.shape[1], history), inputs, history)
        train_x, val_x = switcher_rows(switcher, train), switcher_rows(switcher, val)
        optimiser = torch.optim.Adam(switcher.parameters(), lr=settings.learning_rate)
        fit = fit_on_tensors(
            switcher,
            optimiser,
            loss_fn,
            (train_x, train_y),
            (val_x, val_y),
            settings.train_batch_size,
            settings.seed,
            settings.max_epochs,
            settings.patience,
        )
    val_scores = agreement_scores(switcher, val)
    report = TrainingReport(
        input_dim=switcher.input_dim,
        seed=settings.seed,
        train_rows=len(train.rows),
        val_rows=len(val.rows),
        agreement_share_train=float(train_y.mean()),
        positive_class_weight=weight,
        epochs_run=len(fit.train_losses),
        best_epoch=fit.best_epoch,
        best_val_loss=fit.best_val_loss,
        val_accuracy=float(np.mean((val_scores >= 0.5) == val_y.numpy().astype(bool))),
        train_losses=fit.train_losses,
        val_losses=fit.val_losses,
        inputs=inputs,
        target=settings.switcher_target,
        history=history,
    )
    return switcher, report


def save_trained(directory: Path, switcher: Switcher, report: TrainingReport) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: tensor.contiguous() for name, tensor in switcher.state_dict().items()}, str(directory / WEIGHTS_FILE)
    )
    (directory / TRAINING_FILE).write_text(json.dumps(asdict(report), indent=2))


def load_trained(directory: Path) -> tuple[Switcher, TrainingReport]:
    if not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(f"no trained switcher in {directory}: run `fallwatch dmd train` first")
    report = TrainingReport(**json.loads((directory / TRAINING_FILE).read_text()))
    switcher = Switcher(report.input_dim, report.inputs, report.history)
    switcher.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    switcher.eval()
    return switcher, report
