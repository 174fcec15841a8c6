"""Tiny random checkpoints of the real ViLT classes, built offline.

They go through the same `save_pretrained` / `from_pretrained` path as the real
`dandelin/vilt-b32-finetuned-vqa`, so tests and demos exercise the real loading code
without a model hub. Their answers are random unless `set_fall_bias` fixes them.
`build_real_size_edge_model` builds the real architecture (default `ViltConfig`, 3,129
answers, 384-pixel processor, BERT-size vocabulary) with random weights, for benchmarks.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import cast

import torch
from transformers import (  # type: ignore[attr-defined]  # BertTokenizerFast: exported lazily, not in the type hints
    BertTokenizerFast,
    ViltConfig,
    ViltForQuestionAnswering,
    ViltImageProcessor,
    ViltProcessor,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Words of plausible fall questions; any other word is spelt with the letter tokens below.
# fmt: off
QUESTION_WORDS = [
    "is", "the", "a", "person", "someone", "anyone", "resident", "patient", "falling", "fallen",
    "fall", "fell", "lying", "lie", "on", "floor", "ground", "or", "and", "in", "of", "this",
    "image", "picture", "room", "has", "did", "does", "who", "are", "there", "down", "collapsed",
    "sitting", "standing", "help", "need", "needs", "here", "it",
]
# fmt: on
ANSWERS = ["yes", "no", "0", "1", "2", "floor", "nothing"]
# Shortest image edge of the tiny processor: a 640x480 frame becomes 96x128 pixels, 3x4 patches.
TINY_SHORTEST_EDGE = 96
FALL_LOGIT_MARGIN = 10.0
# The real checkpoint's answer vocabulary and tokenizer sizes (dandelin/vilt-b32-finetuned-vqa).
REAL_NUM_ANSWERS = 3129
REAL_VOCAB_SIZE = 30522


def _tiny_vocab(size: int | None = None) -> dict[str, int]:
    """The question words and letters; padded with unused tokens up to `size` when given."""
    tokens = SPECIAL_TOKENS + QUESTION_WORDS + list(string.punctuation) + list(string.digits)
    tokens += list(string.ascii_lowercase) + [f"##{letter}" for letter in string.ascii_lowercase + string.digits]
    unique = list(dict.fromkeys(tokens))
    if size is not None:
        unique += [f"[unused{index}]" for index in range(size - len(unique))]
    return {token: index for index, token in enumerate(unique)}


def _answers(count: int) -> list[str]:
    return ANSWERS + [f"answer{index}" for index in range(count - len(ANSWERS))]


def _save(directory: Path, config: ViltConfig, processor: ViltProcessor, seed: int) -> Path:
    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def small_processor(shortest_edge: int) -> ViltProcessor:
    """A `ViltProcessor` with the small question vocabulary, resizing frames to `shortest_edge` pixels."""
    tokenizer = BertTokenizerFast(vocab=_tiny_vocab(), do_lower_case=True)
    image_processor = ViltImageProcessor(size={"shortest_edge": shortest_edge}, size_divisor=32)
    return ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_edge_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random `ViltForQuestionAnswering` and its `ViltProcessor` into `directory`."""
    processor = small_processor(TINY_SHORTEST_EDGE)
    config = ViltConfig(
        vocab_size=processor.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=96,
        patch_size=32,
        max_position_embeddings=40,
        id2label=dict(enumerate(ANSWERS)),
        label2id={answer: index for index, answer in enumerate(ANSWERS)},
    )
    return _save(directory, config, processor, seed)


def real_size_processor() -> ViltProcessor:
    """The real checkpoint's processor configuration (defaults: shortest edge 384, multiples of 32)."""
    tokenizer = BertTokenizerFast(vocab=_tiny_vocab(REAL_VOCAB_SIZE), do_lower_case=True)
    return ViltProcessor(image_processor=ViltImageProcessor(), tokenizer=tokenizer)


def real_size_config(processor: ViltProcessor) -> ViltConfig:
    """ViLT-B/32's architecture (default `ViltConfig`) with the real checkpoint's 3,129 answers."""
    answers = _answers(REAL_NUM_ANSWERS)
    return ViltConfig(
        vocab_size=processor.tokenizer.vocab_size,
        id2label=dict(enumerate(answers)),
        label2id={answer: index for index, answer in enumerate(answers)},
    )


def build_real_size_edge_model(directory: Path, seed: int = 0) -> Path:
    """Save a `ViltForQuestionAnswering` of the real size (default `ViltConfig`) with random weights.

    The processor is the real one's configuration (shortest edge 384, multiples of 32); the
    tokenizer has the real vocabulary size, but its tokens beyond the question words are fillers.
    """
    processor = real_size_processor()
    return _save(directory, real_size_config(processor), processor, seed)


def real_size_edge_model(seed: int = 0) -> tuple[ViltForQuestionAnswering, ViltProcessor]:
    """The same real-size model, built in memory only (nothing written: for benchmarks of the forward alone)."""
    processor = real_size_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(real_size_config(processor))
    return model, processor


def set_fall_bias(directory: Path, fall: bool) -> None:
    """Make the checkpoint in `directory` answer "yes" (fall=True) or "no" to every input, by a wide margin."""
    model = ViltForQuestionAnswering.from_pretrained(directory)
    final_linear = model.classifier[-1]
    label2id = cast(dict[str, int], model.config.label2id)
    with torch.no_grad():
        final_linear.weight.zero_()
        final_linear.bias.zero_()
        final_linear.bias[label2id["yes"]] = FALL_LOGIT_MARGIN if fall else -FALL_LOGIT_MARGIN
        final_linear.bias[label2id["no"]] = -FALL_LOGIT_MARGIN if fall else FALL_LOGIT_MARGIN
    model.save_pretrained(directory)
