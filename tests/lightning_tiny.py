"""A tiny GPT-NeoX LightningModule, fixed-shape token data and an independent activation
recorder, shared by the Lightning callback tests and their DDP script."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

VOCAB, SEQ, BATCH, N_SEQ = 64, 12, 4, 96
LAYERS = ("gpt_neox.layers.0", "gpt_neox.layers.1")


def tiny_gptneox() -> nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    config = tr.GPTNeoXConfig(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tr.GPTNeoXForCausalLM(config)


class TinyLM(pl.LightningModule):
    """Causal LM on random tokens; ``fail_at_step`` makes ``training_step`` raise."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.model = tiny_gptneox()
        self.fail_at_step = fail_at_step

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError(f"training_step: planned failure at global step {self.global_step}")
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(seed: int = 0, n: int = N_SEQ, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)  # (n, T), no padding
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size)


class Recorder:
    """Independent forward hooks that keep every training-phase block output, per step.

    ``rows[layer][step]`` lists the (tokens, d) float64 arrays of the forwards run while the
    trainer's global step was ``step`` (i.e. that belong to optimizer step ``step + 1``).
    """

    def __init__(self, lit: pl.LightningModule, layers: tuple[str, ...] = LAYERS) -> None:
        self.lit = lit
        self.rows: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in layers}
        modules = dict(lit.model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if not (torch.is_grad_enabled() and module.training):
                return
            hidden = output[0] if isinstance(output, tuple) else output
            x = hidden.detach().to(torch.float64).reshape(-1, hidden.shape[-1]).numpy().copy()
            self.rows[name].setdefault(int(self.lit.global_step), []).append(x)

        return hook

    def window(self, layer: str, first_step: int, last_step: int) -> np.ndarray:
        """Rows of optimizer steps ``first_step..last_step`` (1-based, inclusive)."""
        parts = [x for s in range(first_step - 1, last_step) for x in self.rows[layer].get(s, [])]
        return np.concatenate(parts, axis=0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
