"""The in-memory word-level tokenizer the TransformerLens benches give their models: one word
``w<id>`` per token id, nothing downloaded."""

from __future__ import annotations

from typing import Any


def word_tokenizer(vocab: int) -> Any:
    """A ``PreTrainedTokenizerFast`` mapping ``"w<i>"`` to id i for i < vocab. The special tokens
    are all "w0" (id 0, the BOS), a word no other word starts with, since the tokenizer splits
    words around special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", bos_token="w0", eos_token="w0", pad_token="w0", add_bos_token=True
    )
    tokenizer.init_kwargs["name_or_path"] = "in-memory"  # TransformerLens reads it; nothing is downloaded
    return tokenizer
