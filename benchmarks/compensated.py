"""Compensated Gram products: do they reach fp64 accuracy at half the fp32 GEMM's speed?

A compensated scheme would be offered as a ``product_dtype`` if it brought GSAM within 1e-6
relative of fp64 at >= 0.5 of the fp32 GEMM's speed (issue 13). Measured here, on the
device given, for the Gram product G = XᵀX of centred rows:

* ``fp32``             one fp32 GEMM (the reference speed).
* ``fp64``             one fp64 GEMM.
* ``fp32 blocks+fp64`` fp32 GEMMs of 256-row blocks, summed in fp64: removes the growth of
                       the error with the rows summed, not the per-block rounding.
* ``ozaki3``           X split per column into three 7-bit slices scaled by the column's
                       max |x| (Ozaki et al., "Error-free transformations of matrix
                       multiplication", 2012): the slice products of 256-row blocks are exact
                       in fp32, summed in fp64; the four GEMMs of slice pairs (i + j <= 4, with
                       XᵀY + YᵀX from one) keep 2^-21 of each column's max.

Accuracy: GSAM (fp64 eigendecomposition of the covariance, rank fixed to the fp64 one)
relative to two-pass fp64 numpy, on a massive-activation dimension, an ill-conditioned
Gaussian (condition number ~6e5) and, with ``--minilm``, a MiniLM layer.

Usage::

    python benchmarks/compensated.py [--device cuda] [--rows 4096] [--dim 1024] [--minilm]
"""

from __future__ import annotations

import argparse
import math
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import median_seconds, write_json

BLOCK = 256


def gram_fp32(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x.T @ x).double()


def gram_fp64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x


def gram_blocks(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for b in x.split(BLOCK):
        g += (b.T @ b).double()
    return g


def _slices(x: torch.Tensor, k: int = 3, bits: int = 7) -> list[torch.Tensor]:
    """x (fp64) = Σ slices + O(2^-(k·bits)) of each column's max, each slice an integer of
    at most 2^bits times a power of two: with bits = 7, a product of two slices is below 2^14
    and 256 of them sum exactly in fp32's 24 bits."""
    scale = torch.exp2(torch.ceil(torch.log2(x.abs().amax(0).clamp_min(1e-300))))
    rest = x / scale
    out = []
    for i in range(1, k + 1):
        step = 2.0 ** (-bits * i)
        s = torch.round(rest / step) * step
        rest = rest - s
        out.append((s * scale).float())
    return out


def gram_ozaki3(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    g = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for b in x.double().split(BLOCK):
        a1, a2, a3 = _slices(b)
        cross = a1.T @ a2  # a1ᵀa2 + a2ᵀa1 from one GEMM
        g += (a1.T @ a1).double() + (cross + cross.T).double() + (a2.T @ a2).double()
        c13 = (a1.T @ a3).double()
        g += c13 + c13.T
    return g


SCHEMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp32": gram_fp32,
    "fp64": gram_fp64,
    "fp32 blocks+fp64": gram_blocks,
    "ozaki3": gram_ozaki3,
}


def datasets(rng: np.random.Generator, minilm: bool) -> dict[str, np.ndarray]:
    n, d = 8192, 256
    massive = rng.standard_normal((n, d))
    massive[rng.random(n) < 0.004, 0] = 3000.0
    illcond = rng.standard_normal((4096, d)) @ rng.standard_normal((d, d)) * 0.1 + 3.0
    out = {"massive activation": massive.astype(np.float32), "ill-conditioned": illcond.astype(np.float32)}
    if minilm:
        from accuracy import minilm_hidden_states

        out["MiniLM layer 3"] = minilm_hidden_states()[3]
    return out


def gsam_of_cov(cov: np.ndarray, n: int, rank: int) -> float:
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1][:rank]
    return math.log(n) - 0.5 * rank * (1 + math.log(2 * math.pi)) - 0.5 * float(np.log(lam).sum())


def accuracy(device: torch.device, sets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, x in sets.items():
        x64 = x.astype(np.float64)
        n = len(x64)
        cov = np.cov(x64.T, ddof=0)
        lam = np.linalg.eigvalsh(cov)
        rank = int((lam > 1e6 * np.finfo(np.float64).eps * lam.max()).sum())
        ref = gsam_of_cov(cov, n, rank)
        # Centred on the fp32-rounded mean, as the update does: the products see x - m.
        xc = torch.from_numpy(x64 - x64.mean(0).astype(np.float32)).to(device)
        s = xc.sum(0).cpu().numpy()
        out[name] = {}
        for scheme, fn in SCHEMES.items():
            g = fn(xc).cpu().numpy()
            c = (g - np.outer(s, s) / n) / n
            c = 0.5 * (c + c.T)
            out[name][scheme] = abs(gsam_of_cov(c, n, rank) - ref) / abs(ref)
    return out


def speed(device: torch.device, rows: int, dim: int, reps: int) -> dict[str, float]:
    x = torch.randn(rows, dim, device=device)
    t = {name: median_seconds(lambda fn=fn: fn(x), device, reps) for name, fn in SCHEMES.items()}
    return {name: t["fp32"] / v for name, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--minilm", action="store_true", help="also a MiniLM layer (loads the model)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"# {platform.machine()}, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    acc = accuracy(device, datasets(np.random.default_rng(0), args.minilm))
    spd = speed(device, args.rows, args.dim, args.reps)
    names = list(SCHEMES)
    print(f"{'GSAM rel. error vs fp64 numpy':30s}" + "".join(f"{n:>18s}" for n in names))
    for data, row in acc.items():
        print(f"{data:30s}" + "".join(f"{row[n]:18.2e}" for n in names))
    print(f"{f'speed / fp32 GEMM ({args.rows}x{args.dim})':30s}" + "".join(f"{spd[n]:18.2f}" for n in names))
    write_json(args.json, {"device": str(device), "accuracy": acc, "speed_vs_fp32": spd})


if __name__ == "__main__":
    main()
