"""The demo's byte-level tokenizer: one token per byte, plus the chat special tokens.

It is an ordinary ``tokenizers`` BPE with no merges over the byte-level alphabet, so any text encodes
(no unknown token) and decodes back exactly, and it is saved as ordinary tokenizer files that
``AutoTokenizer.from_pretrained`` loads without remote code.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS)
MODEL_MAX_LENGTH = 512


def chat_template() -> str:
    """The Jinja chat template shipped with the demo (``demo/chat_template.jinja``)."""
    # Located from this file rather than through the `demo` package: under pytest, the tests/demo
    # directory can shadow the package as a namespace package of the same name.
    return (Path(__file__).with_name("chat_template.jinja")).read_text(encoding="utf-8").strip()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer with the chat template, left padding and pad/eos tokens set."""
    # Specials take the first ids so that pad is 0 and eos is 1 whatever the byte alphabet is.
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=chat_template(),
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
    )
