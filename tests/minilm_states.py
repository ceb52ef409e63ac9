"""Token hidden states of every MiniLM layer on the 300 bundled sentences (padding dropped),
for the precision tests and ``benchmarks/accuracy.py --precision``."""

from __future__ import annotations

import numpy as np
import torch


def minilm_hidden_states(batch: int = 100) -> list[np.ndarray]:
    """One (tokens, 384) fp32 array per hidden state (embeddings + 6 layers): 6,456 tokens."""
    from gsam_monitor.eval.corpus import load_corpus
    from tests.tiny_models import minilm

    model, tokenizer = minilm()
    sentences = list(load_corpus("sst2_300_filtered").sentences)
    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tokenizer(sentences[i : i + batch], return_tensors="pt", padding=True)
            hidden = model(**enc, output_hidden_states=True).hidden_states
            keep = enc["attention_mask"].bool()
            per_layer = per_layer or [[] for _ in hidden]
            for store, h in zip(per_layer, hidden, strict=True):
                store.append(h[keep].numpy())
    return [np.concatenate(store) for store in per_layer]
