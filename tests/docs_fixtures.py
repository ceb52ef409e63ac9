"""Stand-ins for the user's own objects in the documentation's code blocks.

A block that uses ``model``, ``loader`` or ``batches`` as the user's own is preceded in its page by
a hidden ``<!-- test-setup ... -->`` comment that builds them from here (``tests/test_docs.py``):
small, seeded, offline, so that every block runs in the suite as it is printed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def hidden_batches(d: int = 384, n: int = 3, labels: bool = False, seed: int = 0) -> list[tuple]:
    """``n`` batches of hidden states ``(B, T, d)`` with a padding mask ``(B, T)`` (and a label
    per batch when ``labels``), as a model's layer would give them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        hidden = torch.randn(8, 64, d, generator=g)
        mask = torch.ones(8, 64, dtype=torch.bool)
        mask[:, 48:] = False  # padding at the end of every sequence
        out.append((hidden, mask, i % 2) if labels else (hidden, mask))
    return out


def tiny_causal_lm(steps: int = 4, vocab: int = 64) -> tuple[torch.nn.Module, list[dict], torch.optim.Optimizer]:
    """A tiny GPT-NeoX causal LM (2 blocks, d = 16), ``steps`` batches of token ids with their
    labels and attention mask, and its optimizer."""
    import transformers as tr

    from tests.tiny_models import tiny_config

    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tiny_config("gptneox"))
    g = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:2, 9:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return model, [batch() for _ in range(steps)], torch.optim.AdamW(model.parameters(), lr=1e-3)


def iterate(batches: list) -> Iterator:
    yield from batches
