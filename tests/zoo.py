"""Tiny random-init Hugging Face models for tests, one builder per architecture (registry)."""
from __future__ import annotations

import os
from typing import Callable

import torch

ZOO: dict[str, Callable[[str], "torch.nn.Module"]] = {}
VOCAB = 96


def tiny(name: str):
    def decorate(fn):
        ZOO[name] = fn
        return fn

    return decorate


def _llama_like(config_cls, **extra):
    def build(attn_implementation: str):
        cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn_implementation, **extra)
        return cfg

    return build


@tiny("llama")
def llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_llama_like(LlamaConfig)(attn_implementation))


@tiny("qwen2")
def qwen2(attn_implementation):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(_llama_like(Qwen2Config)(attn_implementation))


@tiny("mistral")
def mistral(attn_implementation):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(_llama_like(MistralConfig, sliding_window=None)(attn_implementation))


@tiny("phi3")
def phi3(attn_implementation):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(_llama_like(Phi3Config, pad_token_id=0)(attn_implementation))


@tiny("gpt2")
def gpt2(attn_implementation):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     attn_implementation=attn_implementation)
    return GPT2LMHeadModel(cfg)


@tiny("gpt_neox")
def gpt_neox(attn_implementation):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, attn_implementation=attn_implementation)
    return GPTNeoXForCausalLM(cfg)


# The model tests run on the CPU in CI; on a GPU machine KVPASS_TEST_DEVICE=cuda runs the same tests
# through the CUDA lowering (the Triton decode kernel).
DEVICE = os.environ.get("KVPASS_TEST_DEVICE", "cpu")


def build(name: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ZOO[name](attn_implementation).eval().to(DEVICE)
    # Token ids outside the tiny vocabulary would warn; no EOS so every run generates all its tokens.
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, None
    return model


def prompt(batch: int, length: int = 9, left_padding: bool = False, seed: int = 1):
    """input_ids [batch, length] and attention_mask; with left padding, row i has i * 2 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if left_padding:
        for row in range(batch):
            pad = min(2 * row, length - 1)
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


class SyncChecked:
    """``forward`` with each decode call (one new token) after the first ``warm`` (compilation, warm-up) run
    under ``torch.cuda.set_sync_debug_mode("error")`` when the tests run on CUDA: a host synchronisation in a
    compiled decode step raises (issue #24: a decode step is device work only; generate's own loop, which
    synchronises to stop, stays outside). ``checked`` counts the steps run so; on the CPU it stays 0."""

    def __init__(self, forward, warm: int = 2):
        self.__wrapped__ = forward  # inspect.signature (generate reads forward's) follows it
        self.warm, self.decode_calls, self.checked = warm, 0, 0

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if DEVICE != "cuda" or ids is None or ids.shape[-1] != 1:
            return self.__wrapped__(*args, **kwargs)
        self.decode_calls += 1
        if self.decode_calls <= self.warm:
            return self.__wrapped__(*args, **kwargs)
        self.checked += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self.__wrapped__(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def assert_checked(self) -> None:
        """On CUDA, that decode steps did run under the check."""
        assert DEVICE != "cuda" or self.checked > 0, (self.decode_calls, self.checked)
