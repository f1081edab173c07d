"""Tiny random models of every supported architecture, built offline from transformers configs, and a tiny
byte-level BPE tokenizer trained on a few sentences."""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SENTENCES = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Danielle Darrieux's mother tongue is French.",
    "The cat sat on the mat and looked at the dog.",
    "Toko Yasuda plays the guitar in a band from New York.",
    "Autonomous University of Madrid is located in Spain.",
    "Thomas Joannes Stieltjes was a Dutch mathematician.",
    "In 1999 the company moved its headquarters to London.",
    "She wrote three novels, two plays and many short stories. English Italian Rome Berlin",
]


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES * 5, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.padding_side = "right"
    return t


def _configs(vocab: int) -> dict[str, object]:
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gptj": GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=128, **common),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, max_position_embeddings=128, **common),
        "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common),
        "gemma3_text": Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=128, sliding_window=4,
                                        layer_types=["sliding_attention", "sliding_attention",
                                                     "sliding_attention", "full_attention"], **common),
    }


ARCHS = ["gptj", "gpt_neox", "gpt2", "llama", "qwen2", "gemma3_text"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg = _configs(len(tiny_tokenizer()))[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval().requires_grad_(False)
