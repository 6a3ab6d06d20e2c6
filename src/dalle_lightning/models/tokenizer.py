"""The caption tokenizer: a pretrained CLIP tokenizer when the user has one, else a byte-level BPE trained
with `tokenizers` on the training captions (no download needed), saved next to checkpoints and exports."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)

# Start and end of text come first, so end-of-text is not id 2: transformers' CLIP text model treats
# eos_token_id == 2 as the legacy OpenAI layout and pools at argmax(input_ids) instead of at the EOS.
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


class CaptionSource(Protocol):
    def captions(self, limit: int) -> Iterable[str]: ...


def train_bpe(captions: Iterable[str], vocab_size: int, context_length: int) -> PreTrainedTokenizerFast:
    """A lowercase byte-level BPE (any Unicode encodes, nothing is unknown) wrapping captions in BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=context_length,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with `save_pretrained` (ours or a pretrained CLIP's), or a hub name."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {str(err).splitlines()[0]}") from err


def load_or_train_tokenizer(
    datamodule: CaptionSource,
    save_dir: str | Path,
    pretrained: str | None = None,
    vocab_size: int = 4096,
    context_length: int = 77,
    max_captions: int = 50_000,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: reused from `save_dir` (a resumed run, or a DDP worker after rank 0 made it),
    else the pretrained one, else a BPE trained on up to `max_captions` training captions; saved to `save_dir`.
    """
    save_dir = Path(save_dir)
    if (save_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(save_dir)
        tokenizer.model_max_length = context_length  # the config decides, not what was saved
        return tokenizer
    if pretrained:
        tokenizer = load_tokenizer(pretrained)
        tokenizer.model_max_length = min(tokenizer.model_max_length, context_length)
    else:
        texts = list(datamodule.captions(max_captions))
        if not texts:
            raise UserError("no usable caption in the training shards: cannot train a tokenizer")
        log.info("training a %d-token BPE on %d captions", vocab_size, len(texts))
        tokenizer = train_bpe(texts, vocab_size, context_length)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer
