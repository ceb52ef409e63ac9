"""The private and version-specific framework APIs of ``gsam_monitor._compat``, checked against
the installed torch and transformers: a release that moves one fails here by name."""

from __future__ import annotations

import pytest
import torch

from gsam_monitor import _compat


def test_autograd_running_is_true_only_inside_a_backward_pass() -> None:
    seen: list[bool] = []
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    x.register_hook(lambda grad: seen.append(_compat.autograd_running()))
    assert not _compat.autograd_running()
    y.backward()
    assert seen == [True]
    assert not _compat.autograd_running()


def test_compiled_code_is_seen_and_dropped() -> None:
    torch._dynamo.reset()

    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    compiled = torch.compile(twice, backend="eager")
    assert not _compat.has_compiled_code(twice)
    compiled(torch.ones(3))
    assert _compat.has_compiled_code(twice)
    assert _compat.drop_compiled_code() >= 1
    assert not _compat.has_compiled_code(twice)


def test_find_caller_self_reads_the_nearest_owner_and_its_local() -> None:
    class Owner:
        def run(self, token: str) -> tuple:
            return helper()

    def helper() -> tuple:
        return hook()

    def hook() -> tuple:  # a callback: the owner is two frames above its caller
        return _compat.find_caller_self(Owner, 4, "token")

    owner = Owner()
    found, token, has = owner.run("abc")
    assert found is owner and token == "abc" and has
    assert _compat.find_caller_self(Owner, 4, "token") == (None, None, False)

    def deep() -> tuple:
        return _compat.find_caller_self(Owner, 1, "token")

    class Far(Owner):
        def run(self, token: str) -> tuple:
            return helper2()

    def helper2() -> tuple:
        return deep()

    assert Far().run("x") == (None, None, False)  # beyond max_depth


def test_the_trainer_still_has_what_the_callback_reads() -> None:
    transformers = pytest.importorskip("transformers")
    # The frame walk reads resume_from_checkpoint from the Trainer method that runs the loop.
    loop = transformers.Trainer._inner_training_loop
    assert "resume_from_checkpoint" in loop.__code__.co_varnames
    name = _compat.trainer_default_logdir()
    assert isinstance(name, str) and name


def test_the_attention_registry_lookup_is_routed_with_the_kernel_and_restored() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    from tests.tiny_models import tiny_config

    original = transformers.AttentionInterface.__dict__["get_interface"]
    seen: list[tuple] = []

    def route(function, fused, module, *args, **kwargs):
        seen.append((function, fused, type(module), args[0].shape, "scaling" in kwargs))
        return function(module, *args, **kwargs)

    ids = torch.randint(1, 64, (2, 5))
    for impl, kernel, fused in (("sdpa", sdpa_attention_forward, True),
                                ("eager", modeling_llama.eager_attention_forward, False)):
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(tiny_config("llama"), attn_implementation=impl).eval()
        with torch.no_grad():
            plain = model(input_ids=ids).last_hidden_state
            restore = _compat.route_attention_functions(route)
            try:
                routed = model(input_ids=ids).last_hidden_state
            finally:
                restore()
        assert transformers.AttentionInterface.__dict__["get_interface"] is original
        assert torch.equal(plain, routed)
        # Each layer's call: the kernel the model would have run, its module, q (B, H, T, D), scaling.
        assert seen == [(kernel, fused, modeling_llama.LlamaAttention, (2, 2, 5, 8), True)] * 2
        seen.clear()
    assert _compat.calls_attention_registry(modeling_llama.LlamaAttention)
    assert not _compat.calls_attention_registry(torch.nn.MultiheadAttention)
