"""HF transformers as the oracle: greedy tokens and per-step logits on the same weights."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: str, prompt: list[int], num_tokens: int):
    """(tokens, logits [num_tokens, vocab]) of HF greedy decoding, EOS ignored.

    A plain loop over HF's forward with its own KV cache, not ``generate``: generate's
    ``min_new_tokens`` would mask EOS out of the argmax, which ``ignore_eos`` does not do.
    """
    model = hf_model(str(model_dir))
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(num_tokens):
            logits.append(out.logits[0, -1].float())
            tokens.append(int(logits[-1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens, torch.stack(logits)


def hf_logits_along(model_dir: str, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Logits HF gives for each output position when fed the same history (teacher forcing)."""
    model = hf_model(str(model_dir))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(output)]


def top1_margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Ids from 8 up keep clear of the special tokens at the bottom of the vocabulary.
    return [torch.randint(8, vocab, (n,), generator=generator).tolist() for n in lengths]
