"""Randomly initialised models for the GPU check, built from configs with no network: the default model's shape
(SmolLM2-135M), a 1B-class Llama shape (Llama-3.2-1B) and a tiny one for --dry-run, each saved with an offline
word-level tokenizer over its whole vocabulary (token i > 2 is the word `w{i}`), so the engine, Hugging Face and PEFT
all read the same directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # the default model (server/model/default_model.py: SmolLM2-135M-Instruct)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    # a 1B-class Llama (Llama-3.2-1B's sizes; plain RoPE)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    # --dry-run
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
}


def word_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer whose vocabulary is <pad>, <s>, </s>, `w3` .. `w{vocab_size-1}`, split on whitespace (no
    files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]   # ids 0, 1, 2; never a substring of a word
    vocab = {word: i for i, word in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<pad>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build_model_dir(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Writes config, random safetensors weights (std 0.02, in fp32 on CPU) and the tokenizer to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    word_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    """`count` prompts of exactly `length` tokens (words w3 .. w{vocab-1}: no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=gen)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter (tied embeddings once): what a decode step must read at least once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
