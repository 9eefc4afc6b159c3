"""``influencekit`` command line: fit | score | merge | plan | eval | report | replay | demo.

Each verb is a :class:`Command` in :data:`COMMANDS` (name, help, an example, its arguments and
the function that runs it); a new verb is one more entry. Verbs that
compute read a TOML config (or a store's ``config.json``), apply ``--set KEY=VALUE`` and the
direct flags, and end with a summary table. Progress goes to stderr (bars in a terminal or a
notebook, one log line per stage elsewhere); ``--quiet`` turns all of it off.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InfluenceKitError

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


@dataclass
class Command:
    """One verb: ``add_arguments(parser)`` then ``run(args) -> exit code``."""

    name: str
    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, example: str, arguments):
    """Register the decorated ``run(args) -> exit code`` as a verb; ``arguments(parser)`` adds
    its flags."""
    def register(run):
        COMMANDS[name] = Command(name, help, example, arguments, run)
        return run
    return register


# -- shared options --------------------------------------------------------------------------------
DIRECT_FLAGS = {  # flag dest -> config key
    "method": "method.name", "damping": "method.damping", "kind": "curvature.kind",
    "device": "runtime.device", "dtype": "runtime.dtype", "batch_size": "runtime.batch_size",
    "top_k": "score.top_k", "max_queries": "data.max_queries",
}


def add_config_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    parser.add_argument("config", nargs=None if config_required else "?",
                        help="TOML/JSON config, or a shipped example name (digits, "
                             "breast_cancer)" + ("" if config_required else
                                                 "; default: the store's config.json"))
    parser.add_argument("--store", help="run store folder (default: the config's `store`)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run of another config in the store")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a config key, e.g. "
                        "--set method.damping=1e-2 (repeatable; values are TOML)")
    group = parser.add_argument_group("shortcuts for common keys")
    group.add_argument("--method", help="method.name (Exact, CG, LiSSA, Arnoldi, KFAC, EKFAC, "
                                        "Diagonal, Identity, block_diagonal, TracIn, TRAK)")
    group.add_argument("--damping", type=float, help="method.damping λ")
    group.add_argument("--kind", help="curvature.kind (hessian, ggn, fisher, empirical_fisher)")
    group.add_argument("--device", help="runtime.device")
    group.add_argument("--dtype", help="runtime.dtype (float32, float64)")
    group.add_argument("--batch-size", type=int, help="runtime.batch_size")
    group.add_argument("--max-queries", type=int, help="data.max_queries")
    add_output_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress, logs or summary")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (stage log lines stay)")


def resolved_config(args, store_path: str | None = None,
                    require_store: bool = True) -> tuple[dict, str]:
    """The resolved config of a verb and its store path (``""`` when none is needed and none
    was given)."""
    from .config import apply_overrides, load_config, parse_override, resolve_config

    source = args.config
    if source is None:
        store_path = store_path or args.store
        if store_path is None:
            raise InfluenceKitError("give a CONFIG, or --store STORE of an existing run")
        source = store_path
    raw = load_config(source)
    overrides = [parse_override(text) for text in args.overrides]
    for dest, key in DIRECT_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append((key, value))
    if any(key == "method.name" for key, _ in overrides):
        raw = _drop_foreign_method_keys(raw, overrides)
    config = resolve_config(apply_overrides(raw, overrides))
    store = args.store or config["store"]
    if not store and require_store:
        raise InfluenceKitError("no store folder: pass --store DIR or set store = \"DIR\" in "
                                "the config")
    return config, store


def _drop_foreign_method_keys(raw: dict, overrides) -> dict:
    """``--method X``: keep only the method keys X accepts (damping carries over)."""
    from .config import canonical_method, resolve_method

    name = next(value for key, value in reversed(overrides) if key == "method.name")
    name = canonical_method(name)
    method = {k: v for k, v in raw.get("method", {}).items() if k != "name"}
    accepted = set(resolve_method({"name": name}, "method"))
    return {**raw, "method": {k: v for k, v in method.items() if k in accepted}}


def progress_of(args) -> bool | None:
    return False if (args.quiet or args.no_progress) else None


def print_summary(title: str, rows, echo=print) -> None:
    """The table each verb ends with: stage, seconds, result."""
    if not rows:
        return
    width = max(len(r[0]) for r in rows + [("total", 0, "")])
    echo(title)
    echo(f"  {'stage'.ljust(width)}  {'time':>8}  result")
    for name, seconds, result in rows:
        echo(f"  {name.ljust(width)}  {seconds:7.2f}s  {result}")
    echo(f"  {'total'.ljust(width)}  {sum(r[1] for r in rows):7.2f}s")


def _echo(args):
    return (lambda *a: None) if args.quiet else print


# -- verbs -----------------------------------------------------------------------------------------
def _fit_arguments(parser):
    add_config_arguments(parser, config_required=True)


@command("fit", "build from a config, fit the inverse, write the store",
         "influencekit fit digits --store runs/digits --set method.damping=1e-2", _fit_arguments)
def run_fit(args) -> int:
    from ..report.store import RunStore
    from .pipeline import fit_run

    config, store = resolved_config(args)
    outcome = fit_run(config, RunStore(store), progress_of(args),
                     overwrite=args.overwrite)
    print_summary(f"influencekit fit -> {store}", outcome.rows, _echo(args))
    return EXIT_OK


def _score_arguments(parser):
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--top-k", type=int, help="score.top_k: keep the k most helpful and "
                        "harmful per query instead of the full matrix")
    parser.add_argument("--self-influence", action="store_true",
                        help="also store the self-influence of every training example")
    parser.add_argument("--partition", metavar="I/N",
                        help="score only the I-th of N contiguous shares of the training "
                             "examples (0-based, e.g. $SLURM_ARRAY_TASK_ID/8) into the partial "
                             "store STORE/partitions/I-of-N (resumable); needs `fit` first; "
                             "`influencekit merge STORE` combines the N partitions")


@command("score", "scores of every training example per query, into the store",
         "influencekit score --store runs/digits --top-k 10\n"
         "  influencekit score --store runs/digits --partition 3/8   # job 3 of an array of 8",
         _score_arguments)
def run_score(args) -> int:
    from ..report.store import RunStore
    from .pipeline import score_partition, score_run

    if args.self_influence:
        args.overrides.append("score.self_influence=true")
    config, store = resolved_config(args)
    if args.partition is not None:
        outcome = score_partition(config, RunStore(store), args.partition, progress_of(args))
        print_summary(f"influencekit score --partition {args.partition} -> {store}",
                      outcome.rows, _echo(args))
        return EXIT_OK
    outcome = score_run(config, RunStore(store), progress_of(args),
                       overwrite=args.overwrite)
    print_summary(f"influencekit score -> {store}", outcome.rows, _echo(args))
    if not args.quiet and outcome.run is not None:
        _print_top(outcome, config, print)
    return EXIT_OK





def _print_top(outcome, config, echo, k: int = 3) -> None:
    from ..report.store import SCORES

    tensors, manifest = outcome.store.read(SCORES)
    run = outcome.run
    echo(f"top {k} per query ({manifest['meaning']})")
    for q, name in enumerate(run.query_ids[:10]):
        head = name
        if run.query_labels is not None:
            head += (f": label {int(run.query_labels[q])}, predicted "
                     f"{int(run.query_predictions[q])}")
        echo(head)
        for kind in ("helpful", "harmful"):
            items = ", ".join(f"{run.train_ids[int(m)]} (s={float(v):+.3g})" for m, v in zip(
                tensors[f"{kind}_index"][q, :k], tensors[f"{kind}_score"][q, :k], strict=True))
            echo(f"  {kind}: {items}")
    if len(run.query_ids) > 10:
        echo(f"... {len(run.query_ids) - 10} more queries in the store and the report")


def _merge_arguments(parser):
    parser.add_argument("store", help="run store folder whose partitions/ hold the partial "
                                      "stores of `score --partition I/N`")
    parser.add_argument("--parts", nargs="+", metavar="DIR",
                        help="partial score stores to merge (default: every folder in "
                             "STORE/partitions)")
    add_output_arguments(parser)


@command("merge", "combine the partial score stores of `score --partition I/N` into the "
                  "store's scores (refuses missing, repeated, incomplete or foreign parts)",
         "for i in 0 1 2 3; do influencekit score --store runs/big --partition $i/4; done\n"
         "  influencekit merge runs/big", _merge_arguments)
def run_merge(args) -> int:
    from ..report.store import RunStore
    from .pipeline import merge_run

    outcome = merge_run(RunStore(args.store), progress_of(args), parts=args.parts)
    print_summary(f"influencekit merge {args.store}", outcome.rows, _echo(args))
    if not args.quiet and outcome.run is not None:
        _print_top(outcome, outcome.run.config, print)
    return EXIT_OK


def _plan_arguments(parser):
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--n-train", type=int,
                        help="training examples of the run to plan (default: the config's)")
    parser.add_argument("--n-query", type=int,
                        help="queries of the run to plan (default: the config's)")
    parser.add_argument("--memory-gb", type=float,
                        help="memory budget in GiB (default: what this machine has free)")
    parser.add_argument("--max-job-hours", type=float,
                        help="suggest partitions so that each job takes at most this long")


@command("plan", "estimate memory and time of each stage of a config's run (a short "
                 "calibration on this machine) and suggest batch size, partitions and dtypes",
         "influencekit plan digits --method EKFAC --n-train 1000000 --n-query 1000 "
         "--max-job-hours 4", _plan_arguments)
def run_plan(args) -> int:
    from .pipeline import plan_run

    config, _ = resolved_config(args, require_store=False)
    outcome, plan = plan_run(
        config, progress_of(args), n_train=args.n_train, n_query=args.n_query,
        memory_budget=None if args.memory_gb is None else int(args.memory_gb * 1024**3),
        max_job_seconds=None if args.max_job_hours is None else args.max_job_hours * 3600,
        batch_size=args.batch_size)
    if not args.quiet:
        print(plan)
    print_summary("influencekit plan", outcome.rows, _echo(args))
    return EXIT_OK


def _eval_arguments(parser):
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--loo", type=int, help="eval.loo: leave-one-out of this many "
                        "training examples (largest |s|)")
    parser.add_argument("--lds", type=int, help="eval.lds_subsets: retrain on this many "
                        "random subsets for the LDS")
    parser.add_argument("--removal", help="eval.removal: comma-separated k, e.g. 5,10,20")
    parser.add_argument("--response", action="store_true", help="eval.response_curve")
    parser.add_argument("--trust", action="store_true",
                        help="eval.trust: run ik.diagnostics.check")


@command("eval", "check the scores against real retraining (LOO, LDS, removal, response, "
                 "trust)", "influencekit eval --store runs/cancer --loo 20 --lds 40 --trust",
         _eval_arguments)
def run_eval(args) -> int:
    from ..report.store import RunStore
    from .pipeline import evaluate_run

    flags = {"loo": "eval.loo", "lds": "eval.lds_subsets"}
    for dest, key in flags.items():
        if getattr(args, dest) is not None:
            args.overrides.append(f"{key}={getattr(args, dest)}")
    if args.removal:
        args.overrides.append(f"eval.removal=[{args.removal}]")
    for dest in ("response", "trust"):
        if getattr(args, dest):
            args.overrides.append(f"eval.{'response_curve' if dest == 'response' else dest}"
                                  "=true")
    config, store = resolved_config(args)
    outcome = evaluate_run(config, RunStore(store), progress_of(args),
                          overwrite=args.overwrite)
    print_summary(f"influencekit eval -> {store}", outcome.rows, _echo(args))
    return EXIT_OK





def _report_arguments(parser):
    parser.add_argument("store", help="run store folder (written by fit/score/eval)")
    parser.add_argument("--out", help="output folder (default STORE/report)")
    parser.add_argument("--top", type=int, help="examples shown per query and kind")
    parser.add_argument("--max-queries", type=int, help="queries shown with their examples")
    add_output_arguments(parser)


@command("report", "render the HTML report of a store (reads only the store)",
         "influencekit report runs/digits --out report_digits --top 8", _report_arguments)
def run_report(args) -> int:
    import time

    from ..report import render_report

    start = time.perf_counter()
    page = render_report(args.store, args.out, top=args.top, max_queries=args.max_queries)
    print_summary(f"influencekit report {args.store}",
                  [("render", time.perf_counter() - start, str(page))], _echo(args))
    return EXIT_OK





def _replay_arguments(parser):
    parser.add_argument("store", help="run store folder with config.json and scores/")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="relative tolerance (default 0: identical)")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance")
    add_output_arguments(parser)


@command("replay", "rerun a store's recorded config and check it gives the same scores",
         "influencekit replay runs/digits            # exit 1 and say where, if they differ",
         _replay_arguments)
def run_replay(args) -> int:
    from ..report.store import RunStore
    from .pipeline import replay_run

    outcome = replay_run(RunStore(args.store), progress_of(args), rtol=args.rtol,
                         atol=args.atol)
    print_summary(f"influencekit replay {args.store}", outcome.rows, _echo(args))
    if not outcome.ok:
        print(f"replay differs: {outcome.message}", file=sys.stderr)
        return EXIT_DIFFERENT
    _echo(args)("replay: same scores as the store"
                + (" (bit for bit)" if args.rtol == args.atol == 0 else
                   f" (rtol {args.rtol:g}, atol {args.atol:g})"))
    return EXIT_OK





def _demo_arguments(parser):
    parser.add_argument("which", nargs="?", default="digits", choices=["digits", "thesis"],
                        help="digits: MLP on scikit-learn digits with a picture report "
                             "(default); thesis: the three-point linear regression with exact "
                             "numbers")
    parser.add_argument("--json", action="store_true", help="thesis: print one JSON object")
    parser.add_argument("--out", default="influence_report", help="digits: report folder")
    parser.add_argument("--damping", type=float, default=1e-3, help="digits: damping λ")
    parser.add_argument("--trust", action="store_true",
                        help="digits: also run the convexity and numeric-stability diagnostics")
    add_output_arguments(parser)


@command("demo", "run a demo on an embedded data set",
         "influencekit demo                 # digits MLP -> influence_report/index.html\n"
         "  influencekit demo thesis --json   # the thesis example's exact numbers",
         _demo_arguments)
def run_demo(args) -> int:
    from ..runtime import Runtime
    from .demo import digits_demo, thesis_demo

    if args.which == "thesis":
        thesis_demo(args.json, echo=_echo(args) if not args.json else print)
    else:
        runtime = Runtime(progress=progress_of(args))
        digits_demo(args.out, damping=args.damping, trust=args.trust, runtime=runtime,
                    echo=_echo(args))
    return EXIT_OK





# -- entry point -----------------------------------------------------------------------------------
EPILOG = """examples:
  influencekit fit digits --store runs/digits        # shipped example config, or a TOML path
  influencekit score --store runs/digits --top-k 10
  influencekit score --store runs/digits --partition 3/8   # one job of an array, then:
  influencekit merge runs/digits
  influencekit plan digits --method EKFAC --n-train 1000000   # memory and time per stage
  influencekit eval --store runs/digits --set eval.loo=20
  influencekit report runs/digits                     # runs/digits/report/index.html
  influencekit replay runs/digits                     # same scores again?

configs: docs/cli.md lists every key; shipped examples: digits, breast_cancer, and
(after `make data-lm`) tiny_gpt (a character GPT on the KJV Bible), smollm2, minilm_tweets."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influencekit", description="Influence functions for PyTorch models: which "
        "training examples made the model do this?", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        verb = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                              epilog="example:\n  " + cmd.example,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(verb)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(quiet: bool) -> None:
    """INFO lines of the ``influencekit`` logger to stderr (WARNING only with ``--quiet``)."""
    logger = logging.getLogger("influencekit")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command].run(args)
    except InfluenceKitError as exc:
        print(f"influencekit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
