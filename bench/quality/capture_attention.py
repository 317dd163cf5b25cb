"""Record real decode-attention inputs from the pretrained model (SmolLM2-135M), for tests and benchmarks.

    python bench/quality/capture_attention.py            # -> bench/inputs/smollm2_attention.pt (about 5 MB)

Runs the embedded model (``kvpass.models.load_model("smollm2")``, CPU, fp32) once over a long prompt
(``TOKENS`` tokens of standard-library prose from ``bench/quality/corpus.py``, with the chat template's
system header as the model sees it in use) and records, for ``LAYERS``, what attention receives:
the queries of the last ``QUERIES`` positions q [1, Hq, QUERIES, D] (after RoPE; the last row is the
next decode step's query, the others are decode queries over a prefix), and keys and values
[1, Hkv, L, D] (after RoPE, before GQA expansion), saved as fp16. Query i of the ``QUERIES`` sits at
position L - QUERIES + i and attends to keys 0..L - QUERIES + i (causal).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bench.paths import SMOLLM2_ATTENTION  # noqa: E402

TOKENS = 2048  # 3 layers x 2 x 2048 x 3 heads x 64 x 2 bytes = 4.7 MB: small enough to carry in the repo
LAYERS = (3, 15, 27)  # early, middle, late of SmolLM2-135M's 30
QUERIES = 16
OUT = str(SMOLLM2_ATTENTION)


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    from bench.quality.corpus import paragraphs

    text = "\n\n".join(paragraphs())
    messages = [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    if len(ids) < tokens:
        raise ValueError(f"corpus gives {len(ids)} tokens, need {tokens}")
    return torch.tensor([list(ids)[:tokens]])


def capture(tokens: int = TOKENS, layers=LAYERS, queries: int = QUERIES) -> dict:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvpass.models import load_model

    model, tokenizer = load_model("smollm2")
    recorded = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            recorded[module.layer_idx] = dict(q=query[:, :, -queries:].to(torch.float16).clone(),
                                              k=key.to(torch.float16).clone(), v=value.to(torch.float16).clone(),
                                              scale=float(kwargs.get("scaling") or module.scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvpass_capture", recording_attention)
    model.set_attn_implementation("kvpass_capture")
    ids = prompt_ids(tokenizer, tokens)
    with torch.no_grad():
        model(ids, use_cache=False)
    return {"model": "smollm2-135m-instruct", "tokens": tokens, "queries": queries,
            "layers": {str(i): recorded[i] for i in layers}}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="prompt length")
    parser.add_argument("--out", default=OUT, help="output .pt path")
    args = parser.parse_args(argv)
    data = capture(tokens=args.tokens)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(data, args.out)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
