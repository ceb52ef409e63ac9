"""generate() with a key/value cache on a left-padded batch: each cached step's layers output the
newest positions only (one per decoding step, a chunk of the prompt with chunked prefill) while
the attention mask covers the whole sequence so far; the monitor counts exactly the positions the
model processed that are not padding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor
from tests.reference import gsam_pdet
from tests.tiny_models import tiny_config


@pytest.mark.parametrize(("arch", "chunk"), [("llama", None), ("gptneox", None), ("llama", 3)])
def test_cached_decoding_of_a_left_padded_batch_counts_exactly_the_real_positions(arch: str, chunk: int | None) -> None:
    import transformers as tr

    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model.generation_config.eos_token_id = None  # every sequence decodes all new tokens
    ids = torch.randint(1, 64, (3, 6))
    prompt_mask = torch.ones(3, 6, dtype=torch.int64)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[2, :4] = 0
    ids[prompt_mask == 0] = 0
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None), metrics=["gsam", "n"])
    # Independent record: every output of the monitored blocks, call by call.
    seen: dict[str, list[np.ndarray]] = {name: [] for name in monitor.layer_names}
    handles = [
        t.module.register_forward_hook(
            lambda m, a, out, name=t.name: seen[name].append(
                (out[0] if isinstance(out, tuple) else out).detach().double().numpy()
            )
        )
        for t in monitor.targets
    ]
    new_tokens = 4
    with monitor, warnings.catch_warnings():
        warnings.simplefilter("error")  # no "padding cannot be dropped" warning
        model.generate(
            ids,
            attention_mask=prompt_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            prefill_chunk_size=chunk,  # 3: the second chunk (B, 3) holds padding under a (B, 6) mask
        )
        logged = monitor.log()
    for h in handles:
        h.remove()
    assert monitor.errors == 0
    prefill = 1 if chunk is None else 2
    for name, outs in seen.items():
        # The prompt's forward (B, 6, d) or its chunks, then one (B, 1, d) per cached decoding step.
        assert [o.shape[1] for o in outs] == ([6] if chunk is None else [3, 3]) + [1] * (new_tokens - 1)
        prompt = np.concatenate(outs[:prefill], axis=1)[prompt_mask.bool().numpy()]
        rows = np.concatenate([prompt, *(o.reshape(-1, o.shape[-1]) for o in outs[prefill:])])
        assert len(rows) == 12 + 3 * (new_tokens - 1)
        assert logged[f"n/{name}/eval"] == len(rows)
        assert logged[f"gsam/{name}/eval"] == pytest.approx(gsam_pdet(rows)[0], rel=1e-9)
