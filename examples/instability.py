"""Do geometry alerts warn before the loss spikes? Stable and unstable pretraining runs, measured.

The tiny GPT-NeoX of ``lightning_pretrain_tiny_gpt.py`` (4 blocks, d = 128, its model and data
helpers) learns next-word prediction on the bundled SST-2 train text (67k sentences: it learns,
it does not memorise) on the CPU, in a plain PyTorch loop, under three learning-rate recipes:

* ``stable``: the pretraining example's recipe (AdamW, lr 2e-3, linear warm-up over 10 % of
  the steps, cosine decay to 0.1x);
* ``jump``: the same until ``--jump-step``, then the learning rate multiplied by
  ``--jump-factor`` at once, without warm-up;
* ``ramp``: the same until ``--jump-step``, then the learning rate grows linearly to
  ``--jump-factor`` x over ``--ramp-steps`` steps (an instability that builds up: the case
  where a warning before the loss spike is possible at all);
* ``high``: ``--high-factor`` x the base learning rate from the first step, no warm-up.

``GSAMMonitor(..., alerts="default")`` watches the embedding output, the four blocks and the
final norm (logging every ``--every`` steps), and every log's metrics, alerts and outlier
dimensions are recorded. Runs go ``--workers`` at a time (one torch thread each). Afterwards,
per run:

* the first loss spike: the first step t >= ``--spike-history`` whose training loss is
  non-finite or above ``--spike-factor`` x the median of the ``--spike-history`` steps before it;
* the first loss rise: the first step t whose ``--rise-window``-step running median of the loss
  exceeds ``--rise-factor`` x the lowest running median before t (an instability that makes the
  loss climb for good without one jump: the spike rule misses it);
* the loss event: the earlier of the two;
* the first geometry alert at or after the instability's onset (the jump step; step 0 for
  ``high``), any layer and metric; the lead time is loss-event step - alert step (positive: the
  geometry warned first);
* the alerts of the stable runs (and of the unstable runs before their onset) are false
  alerts: their rate per 1,000 steps.

The recorded series are then replayed through ``AlertEngine`` with other rule settings (band
widths, baseline windows) and through a one-sided CUSUM on the same robust z-scores, to show
what the default's choice rests on. Everything goes into ``summary.json``; ``--plot`` draws
the loss and the alerting metric per layer with the alerts marked.

Run (the numbers of docs/guides/diagnostics.md; about 30 min on 2 busy CPU cores)::

    python examples/instability.py --out runs/instability --plot docs/images/instability.png

``--reassess`` reads ``summary.json`` back and redoes the assessment and the plot without
training (e.g. with other ``--spike-*`` / ``--rise-*`` settings); ``--add-stable`` brings the
stable runs of another experiment's ``summary.json`` into the assessment (an experiment that
trains only unstable runs, ``--conditions ramp``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_pretrain_tiny_gpt import build_vocab, load_text, make_module, pack

from gsam_monitor import CollectOptions, GSAMMonitor
from gsam_monitor.monitor.alerts import DEFAULT_RULES, MAD_TO_SD, AlertEngine, AlertRule

CONDITIONS = ("stable", "jump", "ramp", "high")
WATCHED = ("effective_rank", "anisotropy", "top1_variance_fraction", "outlier_dims", "mean_kurtosis", "nonfinite")


class Recorder:
    """A sink that keeps every log's metrics, alerts and outlier indices in memory."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        self.outliers: list[dict[str, Any]] = []

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self.logs.append({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def write_alerts(self, alerts: list[Mapping[str, Any]], step: int) -> None:
        self.alerts.extend(dict(a) for a in alerts)

    def write_outliers(self, outliers: Mapping[str, list[int]], step: int) -> None:
        self.outliers.append({"step": int(step), **{k: list(v) for k, v in outliers.items()}})

    def close(self) -> None:
        return None


def lr_factor(condition: str, step: int, args: argparse.Namespace) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) under ``condition``."""
    if condition == "high":
        return args.high_factor
    warmup = max(1, args.steps // 10)
    if step < warmup:
        base = (step + 1) / warmup
    else:
        base = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, args.steps - warmup))))
    if condition == "jump" and step >= args.jump_step:
        return base * args.jump_factor
    if condition == "ramp" and step >= args.jump_step:
        return base * (1.0 + (args.jump_factor - 1.0) * min(1.0, (step - args.jump_step + 1) / args.ramp_steps))
    return base


def onset(condition: str, args: argparse.Namespace) -> int | None:
    """The first step of the unstable learning rate (``None`` for stable runs)."""
    return {"stable": None, "jump": args.jump_step, "ramp": args.jump_step, "high": 0}[condition]


def train_run(condition: str, seed: int, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace) -> dict:
    """One run: its losses per step, and every log's metrics, alerts and outliers."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormals in the optimizer state slow every CPU kernel 3-10 fold
    torch.manual_seed(seed)
    model = make_module(vocab_size, args.block, args.lr, warmup=1, max_steps=args.steps).model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(condition, s, args))
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10, NaN rows: recorded instead
        monitor = GSAMMonitor(
            model,
            ["embeddings", "auto", "final_norm"],
            every_n_steps=args.every,
            collection=CollectOptions(steps=None, max_tokens_per_layer=args.tokens, seed=seed),
            sinks=[recorder],
            alerts="default",
        )
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        start = time.perf_counter()
        with monitor:
            for _ in range(args.steps):
                batch = ids[torch.randint(0, len(ids), (args.batch_size,), generator=gen)]  # (B, T)
                loss = model(input_ids=batch, labels=batch).loss
                losses.append(float(loss.detach()))
                if math.isfinite(losses[-1]):
                    loss.backward()  # no gradient clipping: the instability is the point
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                monitor.step()
                if _diverged(losses, args):
                    break
        wall = time.perf_counter() - start
    return {
        "condition": condition,
        "seed": seed,
        "onset": onset(condition, args),
        "steps": len(losses),
        "wall_s": wall,
        "loss": losses,
        "logs": recorder.logs,
        "alerts": recorder.alerts,
        "outliers": recorder.outliers,
        "outlier_identities": {layer: monitor.outliers(layer) for layer in monitor.layer_names},
        "quantization": monitor.quantization_summary(),
    }


def _train_job(job: tuple) -> dict:
    return train_run(*job)


def _diverged(losses: Sequence[float], args: argparse.Namespace) -> bool:
    """Stop ``--after-spike`` steps after the first loss spike (nothing more to learn there)."""
    spike = first_spike(losses, args.spike_factor, args.spike_history)
    return spike is not None and len(losses) - 1 >= spike + args.after_spike


def first_spike(losses: Sequence[float], factor: float, history: int) -> int | None:
    """The first step t >= history whose loss is non-finite or > factor x median(losses[t-history:t])."""
    for t in range(history, len(losses)):
        if not math.isfinite(losses[t]):
            return t
        window = [v for v in losses[t - history : t] if math.isfinite(v)]
        if window and losses[t] > factor * statistics.median(window):
            return t
    return None


def first_rise(losses: Sequence[float], factor: float, window: int) -> int | None:
    """The first step t whose running median of losses[t-window+1..t] is non-finite or exceeds
    factor x the lowest running median before t."""
    best = math.inf
    for t in range(window - 1, len(losses)):
        part = losses[t - window + 1 : t + 1]
        if not all(math.isfinite(v) for v in part):
            return t
        med = statistics.median(part)
        if med > factor * best:
            return t
        best = min(best, med)
    return None


def loss_events(losses: Sequence[float], args: argparse.Namespace) -> tuple[int | None, int | None, int | None]:
    """(first spike, first rise, the earlier of the two) of a run's losses."""
    spike = first_spike(losses, args.spike_factor, args.spike_history)
    rise = first_rise(losses, args.rise_factor, args.rise_window)
    known = [v for v in (spike, rise) if v is not None]
    return spike, rise, min(known) if known else None


def series(run: Mapping[str, Any]) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """Per layer, the logged ``(step, {metric: value})`` of the watched metrics, from the flat logs,
    plus ``new_outlier_dims`` (indices listed for the first time in the run) from the outlier lists."""
    new_dims: dict[tuple[int, str], float] = {}
    seen: dict[str, set[int]] = {}
    for record in run.get("outliers", []):
        for layer, dims in record.items():
            if layer == "step" or layer.endswith("/eval"):
                continue
            known = seen.setdefault(layer, set())
            new_dims[(record["step"], layer)] = float(len(set(dims) - known))
            known.update(dims)
    out: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for log in run["logs"]:
        per_layer: dict[str, dict[str, float]] = {}
        for key, value in log.items():
            metric, _, layer = key.partition("/")
            if metric in WATCHED and layer and not layer.endswith("/eval"):
                per_layer.setdefault(layer, {})[metric] = value
        for layer, values in per_layer.items():
            if (log["step"], layer) in new_dims:
                values["new_outlier_dims"] = new_dims[(log["step"], layer)]
            out.setdefault(layer, []).append((log["step"], values))
    return out


def replay(run: Mapping[str, Any], rules: Sequence[AlertRule] | str) -> list[dict[str, Any]]:
    """The alerts ``AlertEngine(rules)`` raises on the run's logged series."""
    engine = AlertEngine(list(DEFAULT_RULES if rules == "default" else rules))
    by_step: dict[int, list[tuple[str, dict[str, float]]]] = {}
    for layer, points in series(run).items():
        for step, values in points:
            by_step.setdefault(step, []).append((layer, values))
    for step in sorted(by_step):
        for layer, values in by_step[step]:
            engine.observe(step, layer, "train", values)
    return engine.alerts


def cusum(run: Mapping[str, Any], h: float, slack: float = 0.5, window: int = 10) -> list[dict[str, Any]]:
    """A one-sided CUSUM (Page 1954) on each default rule's robust z-score, for comparison:
    z_t = (x_t - median) / max(1.4826 MAD, the rule's floors / threshold) over the last ``window``
    logs, S_t = max(0, S_{t-1} + z_t - slack) on the rule's side, alert when S_t > h, then S = 0
    and a cool-down of ``window`` logs; quiet for the first ``window`` logs."""
    alerts = []
    rules = {r.metric: r for r in DEFAULT_RULES if r.method == "band" and r.metric in WATCHED}
    for layer, points in series(run).items():
        for metric, rule in rules.items():
            history: list[float] = []
            s, quiet = 0.0, 0
            for step, values in points:
                x = values.get(metric)
                if x is None or not math.isfinite(x):
                    continue
                if len(history) >= window:
                    base = sorted(history[-window:])
                    med = statistics.median(base)
                    mad = statistics.median(abs(v - med) for v in base)
                    floor = max(rule.min_relative * abs(med), rule.min_absolute) / rule.threshold
                    z = (x - med) / max(MAD_TO_SD * mad, floor, 1e-12)
                    z = -z if rule.direction == "down" else z
                    s = max(0.0, s + z - slack)
                    if quiet > 0:
                        quiet -= 1
                    elif s > h:
                        alerts.append({"step": step, "layer": layer, "metric": metric, "kind": rule.name})
                        s, quiet = 0.0, window
                history.append(x)
    return alerts


def assess(runs: Sequence[Mapping[str, Any]], alerts_of, args: argparse.Namespace) -> dict[str, Any]:
    """Per unstable run: first spike, first alert at/after onset, lead; false alerts per 1,000 steps."""
    rows, leads = [], []
    false_alerts, false_steps = 0, 0
    pre_onset_alerts, pre_onset_steps = 0, 0
    for run in runs:
        alerts = sorted(alerts_of(run), key=lambda a: a["step"])
        start = run["onset"]
        if start is None:
            false_alerts += len(alerts)
            false_steps += run["steps"]
            continue
        pre_onset_alerts += sum(1 for a in alerts if a["step"] < start)
        pre_onset_steps += start
        spike, rise, event = loss_events(run["loss"], args)
        after = [a for a in alerts if a["step"] >= start]
        first = after[0] if after else None
        lead = None if event is None or first is None else event - first["step"]
        if lead is not None:
            leads.append(lead)
        rows.append({
            "condition": run["condition"], "seed": run["seed"], "onset": start, "spike_step": spike,
            "rise_step": rise, "loss_event_step": event,
            "alert_step": None if first is None else first["step"],
            "alert": None if first is None else f"{first['kind']} ({first['layer']})",
            "lead": lead,
        })
    per_k = 1000.0 * false_alerts / false_steps if false_steps else math.nan
    return {
        "runs": rows,
        "leads": leads,
        "lead_median": statistics.median(leads) if leads else None,
        "lead_min": min(leads) if leads else None,
        "lead_max": max(leads) if leads else None,
        "alerted_before_spike": sum(1 for v in leads if v > 0),
        "alerted_at_spike_log": sum(1 for v in leads if 0 >= v > -args.every),
        "unstable_runs": len(rows),
        "spiked": sum(1 for r in rows if r["spike_step"] is not None),
        "loss_events": sum(1 for r in rows if r["loss_event_step"] is not None),
        "alerted_after_onset": sum(1 for r in rows if r["alert_step"] is not None),
        "stable_loss_events": sum(
            1 for r in runs if r["onset"] is None and loss_events(r["loss"], args)[2] is not None
        ),
        "false_alerts": false_alerts,
        "stable_steps": false_steps,
        "false_alerts_per_1k_steps": per_k,
        "pre_onset_alerts": pre_onset_alerts,
        "pre_onset_steps": pre_onset_steps,
    }


def variants() -> dict[str, Any]:
    """The alert settings compared: ``DEFAULT_RULES`` replayed on the recorded series first (the
    same as the live monitor's alerts when the run used the same rules), the live alerts, then
    other band widths and windows, and CUSUM."""
    def band(threshold: float, window: int) -> list[AlertRule]:
        return [AlertRule(**{**r.__dict__, "threshold": threshold, "window": window, "cooldown": window})
                if r.method == "band" else r for r in DEFAULT_RULES]

    out: dict[str, Any] = {
        "default rules (replayed)": lambda run: replay(run, "default"),
        "the run's live alerts": lambda run: [a for a in run["alerts"] if a["phase"] == "train"],
    }
    for threshold, window in ((4.0, 10), (8.0, 10), (6.0, 20), (4.0, 20)):
        out[f"band, {threshold:g} MAD, k={window}"] = lambda run, t=threshold, w=window: replay(run, band(t, w))
    for h in (5.0, 10.0):
        out[f"CUSUM, h={h:g}, slack 0.5, k=10"] = lambda run, h=h: cusum(run, h)
    return out


def plot(runs: Sequence[Mapping[str, Any]], path: Path, args: argparse.Namespace) -> Path:
    """Loss and the first-alerting metric per layer for one stable and one unstable run of seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [r for r in runs if r["seed"] == runs[0]["seed"]]
    fig, axes = plt.subplots(2, len(picks), figsize=(5.2 * len(picks), 6.4), squeeze=False, sharex="col")
    for col, run in enumerate(picks):
        loss_ax, metric_ax = axes[0][col], axes[1][col]
        loss_ax.plot(range(len(run["loss"])), run["loss"], color="black", lw=0.8)
        loss_ax.set_title(f"{run['condition']} (seed {run['seed']})")
        loss_ax.set_ylabel("training loss")
        spike, rise, _ = loss_events(run["loss"], args)
        if run["onset"]:
            for ax in (loss_ax, metric_ax):
                ax.axvline(run["onset"], color="tab:blue", ls=":", lw=1)
        if spike is not None:
            loss_ax.axvline(spike, color="tab:red", ls="--", lw=1, label=f"first loss spike ({spike})")
        if rise is not None:
            loss_ax.axvline(rise, color="tab:orange", ls="--", lw=1, label=f"first loss rise ({rise})")
        alerts = run["alerts"]
        later = [a for a in alerts if run["onset"] is None or a["step"] >= run["onset"]]
        metric = (later or alerts or [{"metric": "effective_rank"}])[0]["metric"]
        for layer, points in series(run).items():
            xs = [s for s, v in points if metric in v]
            metric_ax.plot(xs, [v[metric] for _, v in points if metric in v], lw=1, label=layer)
        for a in alerts:  # this metric's alerts at their value; the other metrics' as ticks at the bottom
            if a["metric"] == metric:
                metric_ax.plot(a["step"], a["value"], marker="v", color="tab:red", ms=7, ls="none")
            else:
                metric_ax.axvline(a["step"], ymax=0.06, color="tab:red", lw=1)
        metric_ax.set_ylabel(metric)
        metric_ax.set_xlabel("optimizer step")
        if spike is not None or rise is not None:
            loss_ax.legend(fontsize=7, loc="upper left")
    axes[1][0].legend(fontsize=6, loc="best")
    fig.suptitle("Loss, and the first alerting metric per layer (red triangles: its alerts; red ticks: other metrics' "
                 "alerts; dotted: LR onset; dashed: loss events)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/instability", help="folder for summary.json")
    parser.add_argument("--plot", default=None, help="PNG of loss and alerting metrics")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per condition")
    parser.add_argument("--conditions", default="stable,ramp", help="comma-separated: " + ", ".join(CONDITIONS))
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per run")
    parser.add_argument("--jump-step", type=int, default=80, help="onset of the jump/ramp")
    parser.add_argument("--jump-factor", type=float, default=100.0, help="LR multiplier reached (jump: at once)")
    parser.add_argument("--ramp-steps", type=int, default=60, help="ramp: steps to reach --jump-factor")
    parser.add_argument("--high-factor", type=float, default=30.0, help="LR multiplier of the 'high' runs")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=4, help="monitor logging interval (steps)")
    parser.add_argument("--tokens", type=int, default=512, help="sampled tokens per layer and step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--corpus", default="sst2_train", help="bundled corpus (see the pretraining example)")
    parser.add_argument("--spike-factor", type=float, default=1.5)
    parser.add_argument("--spike-history", type=int, default=20, help="steps in the loss spike's running median")
    parser.add_argument("--rise-factor", type=float, default=1.2)
    parser.add_argument("--rise-window", type=int, default=5, help="steps in the loss rise's running median")
    parser.add_argument("--reassess", action="store_true", help="read --out/summary.json back; no training")
    parser.add_argument("--add-stable", default=None,
                        help="another run's summary.json whose stable runs join the assessment and plot")
    parser.add_argument("--after-spike", type=int, default=30, help="steps to go on after the first loss spike")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steadier when shared)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes; 1: in this process)")
    args = parser.parse_args(argv)
    conditions = [c for c in args.conditions.split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        parser.error(f"--conditions: unknown {bad}; choose from {', '.join(CONDITIONS)}")

    out = Path(args.out)
    if args.reassess:
        stored = json.loads((out / "summary.json").read_text())
        return report(stored["runs"], args, out, stored.get("wall_s", math.nan))
    torch.set_num_threads(args.threads)
    text = load_text(args.corpus)
    vocab = build_vocab(text, args.vocab)
    ids = pack(text, vocab, args.block)  # (n_blocks, T)
    jobs = [(condition, seed, ids, len(vocab) + 2, args) for seed in range(args.seeds) for condition in conditions]
    runs = []
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        for run in pool.imap(_train_job, jobs) if pool is not None else map(_train_job, jobs):
            runs.append(run)
            spike = first_spike(run["loss"], args.spike_factor, args.spike_history)
            print(f"{run['condition']:6s} seed {run['seed']}: {run['steps']} steps in {run['wall_s']:.0f} s, "
                  f"first spike {spike}, {len(run['alerts'])} alerts, first at "
                  f"{[a['step'] for a in run['alerts']][:1]}", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return report(runs, args, out, sum(r["wall_s"] for r in runs))


def report(runs: list[dict], args: argparse.Namespace, out: Path, wall_s: float) -> dict[str, Any]:
    """Assess the runs (and ``--add-stable``'s stable runs) under every alert setting, write
    summary.json (this experiment's own runs), print it, plot."""
    own = runs
    if args.add_stable:
        added = json.loads(Path(args.add_stable).read_text())["runs"]
        runs = [r for r in added if r["condition"] == "stable"] + list(own)
    results = {name: assess(runs, fn, args) for name, fn in variants().items()}
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "reassess"},
        "wall_s": wall_s,
        "assessment": results,
        "runs": own,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True, default=str))
    default = next(iter(results.values()))
    print(json.dumps({k: v for k, v in default.items() if k != "runs"}, indent=1))
    for row in default["runs"]:
        print(row)
    for name, res in results.items():
        print(f"{name:32s} lead median {res['lead_median']}, range [{res['lead_min']}, {res['lead_max']}], "
              f"before the loss event {res['alerted_before_spike']}/{res['loss_events']}, "
              f"false alerts/1k stable steps {res['false_alerts_per_1k_steps']:.2f}, "
              f"pre-onset {res['pre_onset_alerts']}")
    if args.plot:
        plot(runs, Path(args.plot), args)
        print(f"plot: {args.plot}")
    return summary


if __name__ == "__main__":
    main()
