"""A tiny, random LLaVA-NeXT-Video checkpoint built offline, for tests and local runs.

It uses the *real* transformers classes (`LlavaNextVideoForConditionalGeneration`,
`LlavaNextVideoProcessor`) with small configs, and is saved with `save_pretrained`
so that `LlavaVideoCloudModel.from_pretrained(directory, ...)` exercises the same
loading path as the real 7B checkpoint. There is no model hub here, so the
tokenizer is a hand-written word-level `tokenizers` tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (  # type: ignore[attr-defined]  # LlavaNextVideoVideoProcessor: exported lazily, not in the type hints
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    PreTrainedTokenizerFast,
)

from cloud_workers.model import NO_TOKEN_VARIANTS, YES_TOKEN_VARIANTS, LlavaVideoCloudModel, answer_token_ids

TINY_IMAGE_SIZE = 56
TINY_PATCH_SIZE = 7
SPATIAL_POOL_STRIDE = 2  # as the real model: 2×2 average pooling of the patch grid per frame
# (56 / 7 = 8)² = 64 patches → pooled by 2 → 16 video tokens per frame (144 in the 7B: 24² / 4).
TINY_TOKENS_PER_FRAME = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE // SPATIAL_POOL_STRIDE) ** 2

# LLaVA-NeXT-Video-7B: CLIP ViT-L/14 at 336 px, Vicuna-7B's vocabulary of 32064 entries.
FULL_SIZE_IMAGE_SIZE = 336
FULL_SIZE_PATCH_SIZE = 14
FULL_SIZE_VOCAB = 32064
FULL_SIZE_NAME = "random-LLaVA-NeXT-Video-7B"

TINY_INITIALIZER_RANGE = 0.5
# The residual-stream channel that set_fall_bias / restrict_to_answers hold constant.
CONSTANT_CHANNEL = 0

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
# Words of the default question, of the chat template and of the yes/no answer; anything
# else becomes <unk>, which is enough for a random model.
WORDS = [
    "USER", "ASSISTANT", ":", "?", ".", ",", "Yes", "No", "yes", "no", "Answer", "or",
    "Is", "is", "the", "a", "person", "falling", "lying", "on", "floor", "fallen", "there",
]  # fmt: skip

# The llava-hf LLaVA-NeXT-Video chat template, reduced to what the pipeline uses:
# "USER: <video>\n{question} ASSISTANT:" (the real tokenizer adds the <s> itself).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like the Llama tokenizer of the real checkpoint: every sequence starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )
    return wrapped


def build_tiny_processor() -> LlavaNextVideoProcessor:
    return build_processor(TINY_IMAGE_SIZE, TINY_PATCH_SIZE, tiny_grid_pinpoints())


def build_processor(image_size: int, patch_size: int, grid_pinpoints: list[list[int]]) -> LlavaNextVideoProcessor:
    """The tiny tokenizer with image and video processors for frames of `image_size` pixels."""
    square = {"height": image_size, "width": image_size}
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size=square, image_grid_pinpoints=grid_pinpoints
    )
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": image_size}, crop_size=square)
    return LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
    )


def tiny_grid_pinpoints() -> list[list[int]]:
    size = TINY_IMAGE_SIZE
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def build_random_full_size_cloud_model(
    question: str, num_frames: int, device: torch.device, dtype: torch.dtype
) -> LlavaVideoCloudModel:
    """LLaVA-NeXT-Video-7B's architecture with random weights, built in memory on `device`: for benchmarks.

    `LlavaNextVideoConfig()` defaults to the 7B (Llama-2-7B text model, CLIP ViT-L/14 at
    336 px, 2×2 pooling: 144 video tokens per frame); only the vocabulary is the tiny
    tokenizer's (the real one cannot be downloaded here), inside the 7B's 32064-row
    embedding. Nothing is written to disk (14 GB in bf16). The answers are meaningless;
    the compute per clip is the real model's.
    """
    grid_pinpoints = cast(list[list[int]], LlavaNextVideoConfig().image_grid_pinpoints)
    processor = build_processor(FULL_SIZE_IMAGE_SIZE, FULL_SIZE_PATCH_SIZE, grid_pinpoints)
    tokenizer = processor.tokenizer
    config = LlavaNextVideoConfig(
        image_token_index=token_id(tokenizer, "<image>"),
        video_token_index=token_id(tokenizer, "<video>"),
    )
    text_config: Any = config.text_config  # a LlamaConfig; typed as any sub-config
    text_config.vocab_size = FULL_SIZE_VOCAB
    text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration._from_config(config, dtype=dtype)
    return LlavaVideoCloudModel(model.eval(), processor, question, num_frames, name=FULL_SIZE_NAME)


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token (`convert_tokens_to_ids` answers a list only when given one)."""
    return cast(int, tokenizer.convert_tokens_to_ids(token))


def build_tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlavaNextVideoConfig:
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so that the random model's answers differ between clips
        # and questions; with 0.02 every clip gets P(fall) ≈ 0.47 and a test could not tell
        # a wrong padding from a right one.
        initializer_range=TINY_INITIALIZER_RANGE,
    )
    vision_config = CLIPVisionConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    return LlavaNextVideoConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=token_id(tokenizer, "<image>"),
        video_token_index=token_id(tokenizer, "<video>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=tiny_grid_pinpoints(),
        spatial_pool_mode="average",
        spatial_pool_stride=SPATIAL_POOL_STRIDE,
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        video_seq_length=TINY_TOKENS_PER_FRAME,
    )


def build_tiny_cloud_model(directory: Path, seed: int = 0) -> Path:
    """Save a random tiny LLaVA-NeXT-Video model and its processor into `directory`."""
    processor = build_tiny_processor()
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(build_tiny_config(processor.tokenizer)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def set_fall_bias(directory: Path, fall: bool) -> None:
    """Rewrite the saved tiny model so that it answers "Yes" (fall) or "No" at every position.

    lm_head has no bias, so the constant comes from a constant residual channel (see
    `_add_constant_channel`); the final norm keeps only that channel, so its output is
    the same positive number everywhere, and lm_head turns it into a large logit for
    the chosen answer tokens only.
    """
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    vocab = _load_vocab(directory)
    chosen_ids = answer_token_ids(vocab, YES_TOKEN_VARIANTS if fall else NO_TOKEN_VARIANTS)
    with torch.no_grad():
        _add_constant_channel(model, constant=1000.0)
        # Keep only the constant channel: the same normed output at every position.
        norm_weight = model.model.language_model.norm.weight
        norm_weight[:CONSTANT_CHANNEL] = 0.0
        norm_weight[CONSTANT_CHANNEL + 1 :] = 0.0
        model.lm_head.weight.zero_()
        # The first variant ("Yes" / "No") gets the largest logit so greedy decoding
        # answers with the capitalised word; the others still count towards P(fall).
        for rank, token_id in enumerate(chosen_ids):
            model.lm_head.weight[token_id, CONSTANT_CHANNEL] = 10.0 - rank * 0.5
    model.save_pretrained(directory)


def restrict_to_answers(directory: Path) -> None:
    """Rewrite the saved tiny model so that it only ever says "Yes" or "No", still at random."""
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    vocab = _load_vocab(directory)
    restrict_model_to_answers(model, yes_id=vocab["Yes"], no_id=vocab["No"])
    model.save_pretrained(directory)


@torch.no_grad()
def restrict_model_to_answers(model: LlavaNextVideoForConditionalGeneration, yes_id: int, no_id: int) -> None:
    """Change the model in place so that it only ever says "Yes" or "No", still at random.

    Every other token (lower-case variants included, so that P(fall) > 0.5 exactly when
    "Yes" is the greedy choice) gets a large negative logit from the constant channel,
    while "Yes" and "No" keep their random, input-dependent logits: which one wins
    depends on the clip, so one-forward and `generate` can be compared on a real decision.
    """
    others = torch.ones(model.lm_head.weight.shape[0], dtype=torch.bool, device=model.lm_head.weight.device)
    others[[yes_id, no_id]] = False
    _add_constant_channel(model, constant=1.0)
    model.lm_head.weight[:, CONSTANT_CHANNEL] = 0.0
    model.lm_head.weight[others, :] = 0.0
    model.lm_head.weight[others, CONSTANT_CHANNEL] = -1000.0


def _add_constant_channel(model: LlavaNextVideoForConditionalGeneration, constant: float) -> None:
    """Make one residual-stream channel equal `constant` at every position of the language model.

    Every token embedding and every projected video token write `constant` there, and no
    decoder layer writes to it, so after the final RMSNorm it is positive everywhere.
    """
    language_model = model.model.language_model
    language_model.norm.weight[CONSTANT_CHANNEL] = 1.0
    language_model.embed_tokens.weight[:, CONSTANT_CHANNEL] = constant
    projector = model.model.multi_modal_projector
    projector.linear_2.weight[CONSTANT_CHANNEL, :] = 0.0
    projector.linear_2.bias[CONSTANT_CHANNEL] = constant
    for layer in language_model.layers:
        layer.self_attn.o_proj.weight[CONSTANT_CHANNEL, :] = 0.0
        layer.mlp.down_proj.weight[CONSTANT_CHANNEL, :] = 0.0


def _load_vocab(directory: Path) -> dict[str, int]:
    return PreTrainedTokenizerFast.from_pretrained(directory).get_vocab()
