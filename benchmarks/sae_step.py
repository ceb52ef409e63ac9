"""Seconds per training step of the concept analysis' TopK SAE, and of ``sae-lens``'s when installed.

Both train a TopK SAE (d = 384, 3,072 features, k = 32: the default of ``--analyses concepts``
on MiniLM) with Adam on the same synthetic sparse activations, batch 1,024, and are timed
alternately in one process (median of ``--reps`` runs of ``--steps`` steps each), so that both
see the same machine load. ``sae-lens`` is not a dependency of this project: install it in a
separate environment (it pulls ``transformer-lens``, ``datasets``, ``pandas`` and more) and run
this script there with the repository on ``PYTHONPATH``.

Usage::

    python benchmarks/sae_step.py [--steps 20] [--reps 3] [--json results/sae_step.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import write_json

from gsam_monitor.analysis.concepts import SAETrainer, TopKSAE

D, M, K, BATCH = 384, 3072, 32, 1024


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(M, D, generator=gen), dim=1)
    out = []
    for _ in range(n):
        codes = torch.zeros(BATCH, M)
        codes.scatter_(1, torch.randint(0, M, (BATCH, 16), generator=gen), torch.rand(BATCH, 16, generator=gen) * 3)
        out.append(codes @ dictionary + 0.05 * torch.randn(BATCH, D, generator=gen) + 5.0)
    return out


def time_ours(batches: list[torch.Tensor]) -> float:
    trainer = SAETrainer(TopKSAE(D, M, K), batch_size=BATCH, buffer_rows=BATCH)
    trainer.sae.init_from(batches[0])
    trainer.step(batches[0])  # warm-up
    started = time.perf_counter()
    for x in batches:
        trainer.step(x)
    return (time.perf_counter() - started) / len(batches)


def time_sae_lens(batches: list[torch.Tensor]) -> float:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype="float32", device="cpu"))
    config = SAETrainerConfig(total_training_samples=BATCH * (len(batches) + 1), train_batch_size_samples=BATCH,
                              lr=1e-3, lr_end=1e-3, n_batches_for_norm_estimate=1)
    trainer = LensTrainer(config, sae, iter(batches))
    trainer.step(batches[0])  # warm-up
    started = time.perf_counter()
    for x in batches:
        trainer.step(x)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batches = _batches(args.steps)
    with_lens = importlib.util.find_spec("sae_lens") is not None
    ours, lens = [], []
    for _ in range(args.reps):
        ours.append(time_ours(batches))
        if with_lens:
            lens.append(time_sae_lens(batches))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}",
        "shape": {"d": D, "n_features": M, "k": K, "batch": BATCH},
        "ours_s_per_step": statistics.median(ours),
        "sae_lens_s_per_step": statistics.median(lens) if lens else None,
    }
    print(f"# {result['machine']}; TopK SAE d={D}, m={M}, k={K}, batch {BATCH}")
    print(f"gsam_monitor TopKSAE  {result['ours_s_per_step']:.3f} s/step")
    if lens:
        print(f"sae-lens TopK         {result['sae_lens_s_per_step']:.3f} s/step "
              f"({result['sae_lens_s_per_step'] / result['ours_s_per_step']:.2f}x)")
    else:
        print("sae-lens not installed: skipped")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
