"""LayerStats.update throughput against the device's plain matmul on the same shapes.

For each width d and activation dtype, one update of an (n, d) batch is timed against
``torch.mm(X.T, X)`` of the same size, both in the update's product dtype (the fair
comparison: the same GEMM) and in the activations' own dtype (what a user might call "a
matmul"). An accuracy table compares each precision path against fp64 numpy on the same
values.

Usage::

    python benchmarks/update_kernel.py                       # CPU, d in 384 768 2048 4096
    python benchmarks/update_kernel.py --device cuda --rows 4096
    python benchmarks/update_kernel.py --json results/update_kernel.json
    python benchmarks/update_kernel.py --products default float32   # also the fp32 product path
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import numpy as np
import torch
from _common import median_seconds, write_json

from gsam_monitor import LayerStats, metrics

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PRODUCTS = {"default": None, "float32": torch.float32, "float64": torch.float64}


def throughput(
    device: torch.device, dims: list[int], rows: int, dtypes: list[str], reps: int, products: list[str] = ("default",)
) -> list[dict]:
    out = []
    for d in dims:
        n = rows
        for name, higher, prod in ((a, h, p) for a in dtypes for h in (True, False) for p in products):
            x = torch.randn(n, d, device=device).to(DTYPES[name])
            stats = LayerStats(d, device=device, higher_moments=higher, product_dtype=PRODUCTS[prod])
            pd = stats.product_dtype or torch.float32
            t_update = median_seconds(lambda s=stats, x=x: s.update(x), device, reps)
            xp = x.to(pd)
            gram = torch.zeros(d, d, dtype=pd, device=device)
            t_mm_same = median_seconds(lambda g=gram, a=xp: g.addmm_(a.T, a), device, reps)
            native = x if x.dtype in (torch.float32, torch.float64) or device.type == "cuda" else x.float()
            t_mm_native = median_seconds(lambda nat=native: torch.mm(nat.T, nat), device, reps)
            out.append(
                {
                    "d": d,
                    "rows": n,
                    "activations": name,
                    "higher_moments": higher,
                    "product_dtype": str(pd).replace("torch.", ""),
                    "update_ms": t_update * 1e3,
                    "rows_per_s": n / t_update,
                    "mm_same_dtype_ms": t_mm_same * 1e3,
                    "fraction_of_mm_same_dtype": t_mm_same / t_update,
                    "mm_native_ms": t_mm_native * 1e3,
                    "fraction_of_mm_native": t_mm_native / t_update,
                }
            )
            print(
                f"d={d:5d} {name:9s} higher={higher!s:5s} products={out[-1]['product_dtype']:8s} "
                f"update {t_update * 1e3:8.2f} ms  {n / t_update:12,.0f} rows/s  "
                f"x{t_mm_same / t_update:5.2f} of mm({out[-1]['product_dtype']})  "
                f"x{t_mm_native / t_update:5.2f} of mm({name})"
            )
    return out


def accuracy(device: torch.device, d: int = 256, n: int = 4096, batches: int = 8) -> list[dict]:
    """Relative error of covariance and gsam against fp64 numpy, per precision path."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.1 + 3.0
    paths = [
        ("fp64 state, fp64 products", dict(state_dtype=torch.float64, product_dtype=torch.float64)),
        ("fp64 state, fp32 products", dict(state_dtype=torch.float64, product_dtype=torch.float32)),
        ("fp32 state, fp32 products", dict(state_dtype=torch.float32, product_dtype=torch.float32)),
    ]
    out = []
    for act in ("float32", "bfloat16"):
        xt = torch.from_numpy(base).to(DTYPES[act])
        x = xt.double().numpy()
        cov_ref = np.cov(x.T, ddof=0)
        lam = np.linalg.eigvalsh(cov_ref)
        gsam_ref = math.log(n) - 0.5 * d * (1 + math.log(2 * math.pi)) - 0.5 * float(np.sum(np.log(lam)))
        for label, kw in paths:
            s = LayerStats(d, device=device, **kw)
            for part in xt.to(device).chunk(batches):
                s.update(part)
            cov = s.covariance().cpu().numpy()
            g = metrics.compute(s, names=["gsam"])["gsam"]
            out.append(
                {
                    "activations": act,
                    "path": label,
                    "cov_max_rel_err": float(np.abs(cov - cov_ref).max() / np.abs(cov_ref).max()),
                    "gsam_rel_err": abs(g - gsam_ref) / abs(gsam_ref),
                }
            )
            print(f"{act:9s} {label:28s} cov max rel err {out[-1]['cov_max_rel_err']:.2e}  "
                  f"gsam rel err {out[-1]['gsam_rel_err']:.2e}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dims", type=int, nargs="+", default=[384, 768, 2048, 4096])
    p.add_argument("--rows", type=int, default=738, help="rows per update (a MiniLM batch has ~738 tokens)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--products", nargs="+", default=["default"], choices=sorted(PRODUCTS),
                   help="product dtypes to time (default: the device's default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}")
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "throughput": throughput(device, args.dims, args.rows, args.dtypes, args.reps, args.products),
        "accuracy": accuracy(device),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
