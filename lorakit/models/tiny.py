"""Tiny random Llama models and a byte-level tokenizer, made in code, for fast tests and benchmarks.

They exercise the same code paths as a real model (Llama architecture, safetensors folder, chat template)
in milliseconds. Sizes are multiples of 128 so every quantization group size lorakit supports divides them.
"""

from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def make_byte_tokenizer():
    """A deterministic byte-level BPE tokenizer without merges: every UTF-8 byte is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(
    path: str | os.PathLike[str] | None = None,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    initializer_range: float = 0.02,
):
    """Build a random LlamaForCausalLM (+ tokenizer); save it as an HF folder when ``path`` is given.

    Returns the model when ``path`` is None, else the folder path. ``initializer_range`` (the weights' std) above
    the default 0.02 gives a model whose next-token distribution is peaked rather than nearly uniform, so that
    rounding its weights visibly changes what it predicts.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_byte_tokenizer()
    vocab = ((len(tok) + 63) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.eval()
    if path is None:
        return model
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
