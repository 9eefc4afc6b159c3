"""Reliability campaign (issue 13): corrupt every stored file, kill every writer.

Corruptions: real stores are made through the public API (an inverse store for Exact and one for
EKFAC on a small MLP, a subset-retraining results store), then every stored file of each is
corrupted in turn (truncate to 0, half and all-but-one bytes; flip one bit at ``--positions``
places spread evenly over the file; append one zero byte and 64 random bytes; delete; swap with
the same file of a twin store of the same kind) and loaded again the way a user would
(``ik.storage.load_inverse`` with the model, ``ik.response.subset_retraining`` with the same
arguments, ``ik.storage.ResultsArray.read``). Each load is counted as:

- refused: an ``InfluenceKitError`` (``named``: its message names the corrupted file);
- same: it loaded, with the same content (config, fit info and ``solve`` of fixed gradients;
  the results array and its done-mask), e.g. a bit flip that turns ``1e-3`` into ``1E-3``;
- silent: it loaded with DIFFERENT content (goal: 0);
- other: any other exception (goal: 0).

Corrupted stores also include fit stores (``EKFAC.fit`` / ``Exact.fit`` with ``store=``,
resumed), projected gradient stores (``GradientStore.load`` and ``build_gradient_store``
resumed) and the CLI's run store (everything ``influencekit report`` reads, and the config the
CLI reads back).

Faults (``--faults SEEDS``): the subset-retraining worker
(``python -m influencekit.testing.workers``) is SIGKILLed at random points ``--kills`` times per
seed and resumed, and two workers write the even and odd rows of one store at once (one of
them killed at a random point, then both resumed); every run is checked for lost, changed or
wrong rows and the final array against an uninterrupted run, bit for bit; the same for the
score worker (kills, two ranks of one store, two partitions then merged), the fit-store worker
(EK-FAC) and the gradient-store worker (kill and resume: the gradient store has no
partitions).

Bad inputs (``--bad-inputs``): every case of :mod:`influencekit.testing.bad_inputs` is tried
as a user would and its outcome printed as a table (the error class, whether it is the expected
one with every expected fragment and example position, and the message).

Stationarity overhead (``--fit-overhead``): the time of ``inverse.fit(..., stationarity=False)``
and of the check it skips, best of 5 each, on an MLP, same run.

    PYTHONPATH=src python benchmarks/reliability.py [--positions 40] [--json]
    PYTHONPATH=src python benchmarks/reliability.py --no-corruptions --faults 5 [--kills 10]
        [--fresh 1]
    PYTHONPATH=src python benchmarks/reliability.py --no-corruptions --bad-inputs
    PYTHONPATH=src python benchmarks/reliability.py --no-corruptions --fit-overhead
    PYTHONPATH=src python benchmarks/reliability.py --all   # everything in RELIABILITY.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import InfluenceKitError
from influencekit.testing import bad_inputs, faults, workers

KINDS = ("truncate", "bitflip", "append", "delete", "swap")


@dataclass
class StoreCase:
    """A pristine store, a twin of the same kind (for swaps), and how a user loads it."""

    name: str
    folder: Path
    twin: Path
    files: tuple[str, ...]
    load: Callable[[Path], object]
    same: Callable[[object, object], bool]


# -- the stores -----------------------------------------------------------------------------------
def _mlp_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return ik.Target(model, ik.ClassificationTask()), (x, y)


def _inverse_case(root: Path, method, target, train) -> StoreCase:
    name = method.__name__
    curvature = ik.Curvature(target, train, kind="ggn")
    ik.storage.save_inverse(root / name, method(damping=1e-3).fit(curvature))
    # the twin differs only by damping: its fitted tensors are the same numbers
    ik.storage.save_inverse(root / f"{name}-twin", method(damping=3e-3).fit(curvature))
    # (both fits warn that the MLP is not at a minimiser: irrelevant to the stores)
    grads = torch.randn(3, target.num_params, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))

    def load(folder):
        inverse = ik.storage.load_inverse(folder, target)
        return inverse.get_config(), inverse.fit_info_, inverse.solve(grads)

    def same(a, b):
        return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])

    return StoreCase(f"inverse {name}", root / name, root / f"{name}-twin",
                     ("manifest.json", "tensors.safetensors"), load, same)


def _results_cases(root: Path) -> list[StoreCase]:
    target, train, query, masks, retrainer = workers.subset_problem(6)
    twin_masks = np.random.default_rng(1).random(masks.shape) < 0.5
    for folder, m in ((root / "subsets", masks), (root / "subsets-twin", twin_masks)):
        ik.response.subset_retraining(target, train, m, query, retrainer, store=folder)

    def resume(folder):
        return ik.response.subset_retraining(target, train, masks, query, retrainer,
                                             store=folder)

    def read(folder):
        array = ik.storage.ResultsArray.read(folder)
        return array.done(), array.values()

    files = ("meta.json", "values.npy", "checksums.npy")
    return [
        StoreCase("subset_retraining (resume)", root / "subsets", root / "subsets-twin", files,
                  resume, lambda a, b: a.tobytes() == b.tobytes()),
        StoreCase("ResultsArray.read", root / "subsets", root / "subsets-twin", files, read,
                  lambda a, b: np.array_equal(a[0], b[0]) and a[1].tobytes() == b[1].tobytes()),
    ]


def _score_cases(root: Path) -> list[StoreCase]:
    """A complete score store written by stream_scores (the fault worker's problem), its twin
    (the same problem scored with other damping), and partial stores of two partitions."""
    problem = workers.score_problem(48)
    influence, train, query = problem
    twin = (ik.Influence(influence.target, influence.inverse.clone(damping=3e-2).fit(
        ik.Curvature(influence.target, train), stationarity=False)), train, query)
    for folder, prob in ((root / "scores", problem), (root / "scores-twin", twin)):
        workers.stream_scores(folder, n_train=48, problem=prob)
        for i in (0, 1):
            workers.stream_scores(root / f"{folder.name}-part{i}", n_train=48,
                                  partition=f"{i}/2", problem=prob)

    def read(folder):
        store = ik.storage.ScoreStore.load(folder)
        return store.done(), store.scores().numpy(), store.manifest

    def resume(folder):
        result = ik.stream_scores(influence, query, train, k=3, store=folder, block_size=6,
                                  runtime=ik.Runtime(progress=False))
        top = result.top_k
        return (top.helpful_indices, top.helpful_scores, top.harmful_scores,
                result.store.scores().numpy(), result.blocks_computed)

    def merge(folder):
        with tempfile.TemporaryDirectory() as out:
            merged = ik.storage.merge_score_stores([folder, root / "scores-part1"],
                                                   Path(out) / "merged")
            return merged.scores().numpy(), merged.manifest

    def same_arrays(a, b):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))

    files = ("manifest.json", "scores.npy", "checksums.npy")
    return [
        StoreCase("ScoreStore.load().scores()", root / "scores", root / "scores-twin", files,
                  read, same_arrays),
        StoreCase("stream_scores (resume, top-k)", root / "scores", root / "scores-twin", files,
                  resume, same_arrays),
        StoreCase("merge_score_stores (partition 0/2)", root / "scores-part0",
                  root / "scores-twin-part0", files, merge, same_arrays),
    ]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape \
            and a.tobytes() == b.tobytes()
    return a == b


def _fit_store_cases(root: Path) -> list[StoreCase]:
    """EK-FAC and Exact fits with a FitStore (chunks of one batch), resumed: a resumed fit reads
    every stored chunk and must give the same inverse, bit for bit. The twins are the same fits
    of the same model on other data (the same shapes, other statistics)."""
    cases = []
    for method, passes in (("EKFAC", ("factors", "corrections")), ("Exact", ("dense",))):
        def fit(folder, seed=0, method=method):
            target, train = workers.fit_problem(40, seed=seed)
            if seed:  # the twin: the model of seed 0 on the data of another seed
                target = workers.fit_problem(40)[0]
            if method == "Exact":  # the last layer's 100 parameters: a quick dense solve
                target = ik.Target(target.model, ik.ClassificationTask(), params=["4"])
            runtime = ik.Runtime(batch_size=workers.FIT_BATCH, progress=False)
            return getattr(ik, method)(damping=1e-2).fit(
                ik.Curvature(target, train, kind="ggn"), runtime, stationarity=False,
                store=ik.storage.FitStore(folder, chunk_size=workers.FIT_BATCH))

        folder, twin = root / f"fit-{method}", root / f"fit-{method}-twin"
        fit(folder)
        fit(twin, seed=1)
        files = tuple(f"{name}/{file}" for name in passes
                      for file in ("meta.json", "values.npy", "checksums.npy"))
        cases.append(StoreCase(f"{method}.fit(store=) (resume)", folder, twin, files,
                               lambda folder, fit=fit: fit(folder).state_dict(),
                               lambda a, b: sorted(a) == sorted(b)
                               and all(_equal(a[k], b[k]) for k in a)))
    return cases


def _gradient_cases(root: Path) -> list[StoreCase]:
    """A projected gradient store (float32 rows), loaded with ``GradientStore.load`` (every row
    read and verified) and resumed with ``build_gradient_store``; the twin projects with
    another seed (the same shapes, other rows)."""
    def build(folder, seed=0):
        return workers.build_gradients(folder, n_train=24, seed=seed)

    folder, twin = root / "gradients", root / "gradients-twin"
    build(folder)
    build(twin, seed=1)

    def load(folder):
        store = ik.storage.GradientStore.load(folder)
        return store.config, torch.cat([rows for _, rows in store.iter_blocks(10)])

    def resume(folder):
        store = build(folder)
        return store.config, store.rows(0, store.n_train)

    def same(a, b):
        return a[0] == b[0] and _equal(a[1], b[1])

    files = tuple(f"gradients/{file}" for file in ("meta.json", "values.npy", "checksums.npy"))
    return [StoreCase("GradientStore.load (every row)", folder, twin, files, load, same),
            StoreCase("build_gradient_store (resume)", folder, twin, files, resume, same)]


RUN_STORE_FILES = ("config.json", "run.json", "trust.json", "figures/figures.json",
                   "figures/extra.png", "scores/manifest.json", "scores/tensors.safetensors")


def write_run_store(folder: Path, seed: int = 0) -> None:
    """A run store as `fit`, `score`, `eval --trust` and the demo leave it (config, run record,
    scores, trust report, one extra figure), with made-up numbers; ``seed`` varies them."""
    from influencekit.diagnostics import Finding, TrustReport
    from influencekit.report import RunStore

    gen = torch.Generator().manual_seed(seed)
    store = RunStore(folder)
    store.write_config({"method": {"name": "Exact", "damping": 10.0 ** -(seed + 2)},
                        "data": {"name": "digits", "n_train": 40}, "runtime": {"dtype": "float64"}})
    scores = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    order = scores.argsort(dim=1, descending=True)
    store.write("scores", {"scores": scores, "helpful_index": order[:, :5],
                           "helpful_score": scores.gather(1, order[:, :5])},
                {"n_query": 3, "n_train": 40, "k": 5, "query_ids": ["q0", "q1", "q2"]})
    store.write_trust(TrustReport([Finding("convexity", "negative curvature mass",
                                           0.01 * (seed + 1), "pass", "pass <= 0.05")],
                                  {"seed": seed}))
    png = b"\x89PNG\r\n\x1a\n" + torch.randint(0, 256, (200,), generator=gen,
                                                     dtype=torch.uint8).numpy().tobytes()
    store.figure_path("extra.png").write_bytes(png)
    store.add_figure("extra.png", "An extra figure", f"made up (seed {seed})")
    store.record_command("score", {"fit": 0.5 + seed, "score": 0.25}, {"n_train": 40})


def load_run_store(folder: Path):
    """Everything `influencekit report` reads of a run store, and the CLI's config."""
    from influencekit.cli.config import load_config
    from influencekit.report import RunStore

    store = RunStore(folder)
    record = store.run_record()
    record.pop("versions")
    tensors, manifest = store.read("scores")
    return (store.config(), load_config(folder), record, tensors, manifest,
            store.trust().to_json(), store.figures())


def _run_store_cases(root: Path) -> list[StoreCase]:
    folder, twin = root / "run", root / "run-twin"
    write_run_store(folder)
    write_run_store(twin, seed=1)

    def same(a, b):
        return (a[:3] == b[:3] and sorted(a[3]) == sorted(b[3])
                and all(_equal(a[3][k], b[3][k]) for k in a[3]) and a[4:] == b[4:])

    return [StoreCase("RunStore (as the report reads it)", folder, twin, RUN_STORE_FILES,
                      load_run_store, same)]


def build_cases(root: Path) -> list[StoreCase]:
    target, train = _mlp_problem()
    return [_inverse_case(root, ik.Exact, target, train),
            _inverse_case(root, ik.EKFAC, target, train), *_results_cases(root),
            *_score_cases(root), *_fit_store_cases(root), *_gradient_cases(root),
            *_run_store_cases(root)]


# -- the corruptions ------------------------------------------------------------------------------
def corruptions(size: int, positions: int, rng: np.random.Generator):
    """``(kind, label, change)`` where ``change(path, twin_path)`` corrupts the file in place."""
    def truncate(length):
        return lambda path, twin: path.write_bytes(path.read_bytes()[:length])

    def flip(bit):
        def change(path, twin):
            data = bytearray(path.read_bytes())
            data[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))
        return change

    def append(extra):
        return lambda path, twin: path.write_bytes(path.read_bytes() + extra)

    for length in sorted({0, size // 2, size - 1}):
        yield "truncate", f"to {length} bytes", truncate(length)
    for bit in np.unique(np.linspace(0, size * 8 - 1, positions).astype(np.int64)):
        yield "bitflip", f"bit {int(bit)}", flip(int(bit))
    yield "append", "1 zero byte", append(b"\x00")
    yield "append", "64 random bytes", append(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    yield "delete", "deleted", lambda path, twin: path.unlink()
    yield "swap", "twin's file", lambda path, twin: shutil.copyfile(twin, path)


def _outcome(case: StoreCase, folder: Path, reference, file: str) -> tuple[str, str]:
    try:
        content = case.load(folder)
    except InfluenceKitError as exc:
        return ("refused" if file in str(exc) else "refused, file not named"), str(exc)
    except Exception as exc:  # counted, never hidden: the goal is none of these
        return "other", f"{type(exc).__name__}: {exc}"
    return ("same" if case.same(content, reference) else "silent"), ""


def run_corruptions(positions: int = 40, root: Path | None = None) -> list[dict]:
    """One row per (store, file, kind) with the counts of the module docstring."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="ik-reliability-")) if own else Path(root)
    try:
        with warnings.catch_warnings():  # the fits warn that the MLP is not at a minimiser
            warnings.simplefilter("ignore")
            cases = build_cases(root / "stores")
        rng = np.random.default_rng(0)
        rows = []
        for case in cases:
            reference = case.load(case.folder)
            for file in case.files:
                size = (case.folder / file).stat().st_size
                counts: dict[tuple, dict] = {}
                for kind, label, change in corruptions(size, positions, rng):
                    scratch = root / "scratch"
                    shutil.rmtree(scratch, ignore_errors=True)
                    shutil.copytree(case.folder, scratch)
                    change(scratch / file, case.twin / file)
                    outcome, message = _outcome(case, scratch, reference, file)
                    row = counts.setdefault(kind, {
                        "store": case.name, "file": file, "kind": kind, "trials": 0,
                        "refused": 0, "named": 0, "same": 0, "silent": 0, "other": 0,
                        "examples": []})
                    row["trials"] += 1
                    if outcome.startswith("refused"):
                        row["refused"] += 1
                        row["named"] += outcome == "refused"
                    else:
                        row[outcome] += 1
                    if outcome in ("silent", "other", "refused, file not named") \
                            and len(row["examples"]) < 3:
                        row["examples"].append(f"{label}: {outcome} {message[:160]}")
                rows.extend(counts.values())
        return rows
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


# -- the faults -----------------------------------------------------------------------------------
def _ledger(store: Path, reference) -> faults.RowLedger:
    def read():
        if not (store / "meta.json").exists():
            return None
        array = ik.storage.ResultsArray.read(store)
        return array.done(), array.values()
    return faults.RowLedger(read, reference)


def run_faults(seeds: int = 5, kills: int = 10, n_subsets: int = 24,
               fresh: int = 0) -> list[dict]:
    """Kill-and-resume per seed, and killed partitions; one row per scenario and seed.
    ``fresh``: seeds of kill-and-resume where every run is a new interpreter (no zygote)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ik-faults-") as tmp, \
            faults.Zygote(env=env) as zygote:
        tmp = Path(tmp)
        plain = faults.run_once(workers.command("subset_retraining", tmp / "uninterrupted",
                                                "--subsets", n_subsets), launcher=zygote)
        if plain.returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed:\n{plain.output}")
        reference = ik.storage.ResultsArray.read(tmp / "uninterrupted").values()
        for seed in range(seeds + fresh):
            launcher = zygote if seed < seeds else None
            store = tmp / f"kill{seed}"
            ledger = _ledger(store, reference)
            report = faults.kill_and_resume(
                workers.command("subset_retraining", store, "--subsets", n_subsets),
                kills=kills, seed=seed, after_each=ledger, launcher=launcher, env=env,
                progress=lambda store=store: ik.storage.ResultsArray.rows_done(store),
                total=n_subsets, unit_seconds=plain.seconds / n_subsets)
            scenario = "kill and resume" + ("" if launcher else " (fresh interpreters)")
            rows.append(_fault_row(scenario, seed, report.runs, ledger, store, reference))
        rng = np.random.default_rng(0)
        for seed in range(seeds):
            store = tmp / f"partitions{seed}"
            ledger = _ledger(store, reference)
            argvs = [workers.command("subset_retraining", store, "--rows", which,
                                     "--subsets", n_subsets) for which in ("even", "odd")]
            runs = faults.run_concurrently(
                argvs, kill_after=[float(rng.uniform(0, plain.seconds / 2)), None],
                launcher=zygote)
            ledger()
            runs += faults.run_concurrently(argvs, launcher=zygote)
            ledger()
            rows.append(_fault_row("two partitions at once, one killed", seed, runs, ledger,
                                   store, reference))
    return rows


def _fault_row(scenario, seed, runs, ledger, store, reference) -> dict:
    try:
        final = ik.storage.ResultsArray.read(store)
        identical = final.complete and final.values().tobytes() == reference.tobytes()
    except InfluenceKitError:
        identical = False
    return {"scenario": scenario, "seed": seed, "runs": len(runs),
            "kills": sum(r.killed for r in runs),
            "crashed": sum(r.returncode not in (0, -9) for r in runs),
            "rows_lost": len(ledger.lost), "rows_wrong": len(ledger.wrong),
            "unreadable_after_a_run": len(ledger.unreadable), "final_identical": identical}


def run_score_faults(seeds: int = 5, kills: int = 10, n_train: int = 240) -> list[dict]:
    """The stream_scores worker: kill-and-resume per seed; two ranks of one store at once (one
    killed, then both resumed); two partitions at once, then merged."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ik-faults-") as tmp, \
            faults.Zygote(env=env) as zygote:
        tmp = Path(tmp)
        plain = faults.run_once(workers.command("stream_scores", tmp / "uninterrupted",
                                                "--train", n_train), launcher=zygote)
        if plain.returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed:\n{plain.output}")
        reference = workers.score_store_state(tmp / "uninterrupted")[1]
        n_blocks = len(reference)
        for seed in range(seeds):
            store = tmp / f"kill{seed}"
            ledger = faults.RowLedger(lambda store=store: workers.score_store_state(store),
                                      reference)
            report = faults.kill_and_resume(
                workers.command("stream_scores", store, "--train", n_train), kills=kills,
                seed=seed, after_each=ledger, launcher=zygote, env=env,
                progress=lambda store=store: ik.storage.ScoreStore.blocks_done(store),
                total=n_blocks, unit_seconds=plain.seconds / n_blocks)
            rows.append(_score_fault_row("score store: kill and resume", seed, report.runs,
                                         ledger, store, reference))
        rng = np.random.default_rng(0)
        for seed in range(seeds):
            store = tmp / f"ranks{seed}"
            ledger = faults.RowLedger(lambda store=store: workers.score_store_state(store),
                                      reference)
            argvs = [workers.command("stream_scores", store, "--train", n_train, "--rank", r,
                                     "--ranks", 2) for r in (0, 1)]
            runs = faults.run_concurrently(
                argvs, kill_after=[float(rng.uniform(0, plain.seconds / 2)), None],
                launcher=zygote)
            ledger()
            runs += faults.run_concurrently(argvs, launcher=zygote)
            ledger()
            rows.append(_score_fault_row("score store: two ranks at once, one killed", seed,
                                         runs, ledger, store, reference))
        for seed in range(seeds):
            parts = [tmp / f"part{seed}-{i}" for i in (0, 1)]
            argvs = [workers.command("stream_scores", part, "--train", n_train, "--partition",
                                     f"{i}/2") for i, part in enumerate(parts)]
            runs = faults.run_concurrently(  # a partition is half the work: kill early
                argvs, kill_after=[float(rng.uniform(0, plain.seconds / 4)), None],
                launcher=zygote)
            runs += faults.run_concurrently(argvs, launcher=zygote)
            merged = tmp / f"merged{seed}"
            ledger = faults.RowLedger(lambda merged=merged: workers.score_store_state(merged),
                                      reference)
            try:
                ik.storage.merge_score_stores(parts, merged)
            except InfluenceKitError as exc:
                ledger.unreadable.append((len(runs), str(exc)))
            ledger()
            rows.append(_score_fault_row("score store: two partitions at once (one killed), "
                                         "resumed, merged", seed, runs, ledger, merged,
                                         reference))
    return rows


def _score_fault_row(scenario, seed, runs, ledger, store, reference) -> dict:
    try:
        done, blocks = workers.score_store_state(store)
        identical = bool(done.all()) and all(a.tobytes() == b.tobytes()
                                             for a, b in zip(blocks, reference, strict=True))
    except (InfluenceKitError, TypeError):
        identical = False
    return {"scenario": scenario, "seed": seed, "runs": len(runs),
            "kills": sum(r.killed for r in runs),
            "crashed": sum(r.returncode not in (0, -9) for r in runs),
            "rows_lost": len(ledger.lost), "rows_wrong": len(ledger.wrong),
            "unreadable_after_a_run": len(ledger.unreadable), "final_identical": identical}


def _arrays_reader(folders, rows: int):
    """A RowLedger ``read`` over results arrays in order (a missing one: rows not done)."""
    def read():
        done, values = [], []
        for folder in folders:
            if not (folder / "meta.json").exists():
                done += [False] * rows
                values += [np.zeros(0)] * rows
                continue
            array = ik.storage.ResultsArray.read(folder)
            done += list(array.done())
            values += list(array.values())
        return np.array(done), values
    return read


def _stage_faults(scenario, name, args, parts, rows, final, seeds, kills, zygote, env, tmp):
    """Kill-and-resume of worker ``name`` per seed; ``parts(folder)``: its results arrays (each
    of ``rows`` rows); ``final(folder)``: what must be bit-identical to the uninterrupted run."""
    plain = faults.run_once(workers.command(name, tmp / "uninterrupted", *args),
                            launcher=zygote)
    if plain.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{plain.output}")
    done, values = _arrays_reader(parts(tmp / "uninterrupted"), rows)()
    reference = np.empty(len(values), dtype=object)  # one entry per row, rows of any length
    reference[:] = values
    expected = final(tmp / "uninterrupted")
    total = len(done)
    out = []
    for seed in range(seeds):
        folder = tmp / f"{name}-kill{seed}"
        ledger = faults.RowLedger(_arrays_reader(parts(folder), rows), reference)
        report = faults.kill_and_resume(
            workers.command(name, folder, *args), kills=kills, seed=seed, after_each=ledger,
            launcher=zygote, env=env, total=total, unit_seconds=plain.seconds / total,
            progress=lambda folder=folder: sum(ik.storage.ResultsArray.rows_done(f)
                                               for f in parts(folder)))
        try:
            identical = report.completed and final(folder) == expected
        except InfluenceKitError:
            identical = False
        runs = report.runs
        out.append({"scenario": scenario, "seed": seed, "runs": len(runs),
                    "kills": sum(r.killed for r in runs),
                    "crashed": sum(r.returncode not in (0, -9) for r in runs),
                    "rows_lost": len(ledger.lost), "rows_wrong": len(ledger.wrong),
                    "unreadable_after_a_run": len(ledger.unreadable),
                    "final_identical": identical})
    return out


def run_fit_and_gradient_faults(seeds: int = 5, kills: int = 10) -> list[dict]:
    """The fit_store worker (EK-FAC of an MLP on 240 examples, 24 chunks per pass, then the
    saved inverse) and the gradient_store worker (240 projected rows), killed and resumed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def inverse_bytes(folder):
        state = ik.storage.load_inverse(folder / "inverse").state_dict()
        return {k: v.numpy().tobytes() for k, v in state.items()}

    def gradient_bytes(folder):
        return ik.storage.ResultsArray.read(folder / "gradients").values().tobytes()

    with tempfile.TemporaryDirectory(prefix="ik-faults-") as tmp, \
            faults.Zygote(env=env) as zygote:
        tmp = Path(tmp)
        rows = _stage_faults(
            "fit store (EK-FAC): kill and resume", "fit_store", ("--examples", 240),
            lambda f: [f / "fit" / "factors", f / "fit" / "corrections"], 24, inverse_bytes,
            seeds, kills, zygote, env, tmp / "fit")
        rows += _stage_faults(
            "gradient store: kill and resume", "gradient_store", ("--examples", 240),
            lambda f: [f / "gradients"], 240, gradient_bytes, seeds, kills, zygote, env,
            tmp / "gradients")
    return rows


# -- bad inputs and the cost of the stationarity check ------------------------------------------
def run_bad_inputs() -> list[dict]:
    """One row per case of the bad-input catalogue."""
    rows = []
    for case in bad_inputs.cases():
        outcome = bad_inputs.try_case(case)
        rows.append({"group": case.group, "input": case.name, "raised": outcome.raised,
                     "expected": case.error.__name__, "ok": outcome.ok,
                     "index": outcome.index, "message": outcome.message})
    return rows


def bad_input_table(rows: list[dict]) -> str:
    lines = ["| bad input | error | as expected | message |", "|" + " --- |" * 4]
    for r in rows:
        message = r["message"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['input']} | `{r['raised']}` | {'yes' if r['ok'] else '**NO**'} | "
                     f"{message} |")
    ok = sum(r["ok"] for r in rows)
    lines.append(f"| **{len(rows)} bad inputs** | | **{ok} as expected** | |")
    return "\n".join(lines)


def run_fit_overhead(repeats: int = 5) -> list[dict]:
    """The time of ``inverse.fit(..., stationarity=False)`` and of the stationarity check alone
    (:func:`influencekit.diagnostics.fit_stationarity`: one gradient pass and one solve), best
    of ``repeats`` each; an MLP 64-128-10 on 2048 examples (EKFAC on all 9610 parameters, Exact
    on the last layer's 1290)."""
    import time

    from influencekit.diagnostics import fit_stationarity

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=gen)
    y = torch.randint(0, 10, (2048,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).eval()
    runtime = ik.Runtime(batch_size=256, progress=False)
    setups = {
        "EKFAC (all layers)": (lambda: ik.EKFAC(damping=1e-3),
                               ik.Target(model, ik.ClassificationTask())),
        "Exact (last layer)": (lambda: ik.Exact(damping=1e-3),
                               ik.Target(model, ik.ClassificationTask(), params=["2"])),
    }

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows = []
    for name, (make, target) in setups.items():
        curvature = ik.Curvature(target, (x, y))
        inverse = make().fit(curvature, runtime, stationarity=False)
        fit = best(lambda make=make, c=curvature: make().fit(c, runtime, stationarity=False))
        check = best(lambda c=curvature, inv=inverse: fit_stationarity(c, inv, runtime))
        rows.append({"method": name, "p": target.num_params, "fit_s": fit, "check_s": check,
                     "ratio": check / fit})
    return rows


def fit_overhead_table(rows: list[dict]) -> str:
    lines = ["| method | p | fit without the check (s) | the check (s) | check / fit |",
             "|" + " --- |" * 5]
    lines += [f"| {r['method']} | {r['p']} | {r['fit_s']:.3f} | {r['check_s']:.3f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------------------
def corruption_table(rows: list[dict]) -> str:
    head = "| store | file | kind | trials | refused | names file | same | silent | other |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['store']} | {r['file']} | {r['kind']} | {r['trials']} | "
                     f"{r['refused']} | {r['named']} | {r['same']} | {r['silent']} | "
                     f"{r['other']} |")
    total = {k: sum(r[k] for r in rows) for k in ("trials", "refused", "named", "same",
                                                     "silent", "other")}
    lines.append(f"| **all** | | | {total['trials']} | {total['refused']} | {total['named']} | "
                 f"{total['same']} | {total['silent']} | {total['other']} |")
    return "\n".join(lines)


def corruption_summary(rows: list[dict]) -> str:
    """One line per (store, file): refused / tried for each kind, then silent and other."""
    order = list(dict.fromkeys((r["store"], r["file"]) for r in rows))
    cells = {(r["store"], r["file"], r["kind"]): r for r in rows}
    head = ("| store (loaded with) | file | truncate | bit flip | append | delete | swap | "
            "silent | other |")
    lines = [head, "|" + " --- |" * 9]
    for store, file in order:
        parts = [cells.get((store, file, kind)) for kind in KINDS]
        shown = [f"{c['refused']}/{c['trials']}" if c else "-" for c in parts]
        silent = sum(c["silent"] for c in parts if c)
        other = sum(c["other"] for c in parts if c)
        lines.append(f"| {store} | {file} | {' | '.join(shown)} | {silent} | {other} |")
    return "\n".join(lines)


def fault_table(rows: list[dict]) -> str:
    keys = ("scenario", "seed", "runs", "kills", "crashed", "rows_lost", "rows_wrong",
            "unreadable_after_a_run", "final_identical")
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=40, help="bit flips per file")
    parser.add_argument("--faults", type=int, default=0, help="seeds of fault injection")
    parser.add_argument("--kills", type=int, default=10, help="kills per seed")
    parser.add_argument("--fresh", type=int, default=0,
                        help="extra seeds whose runs are fresh interpreters (no zygote)")
    parser.add_argument("--no-corruptions", action="store_true")
    parser.add_argument("--bad-inputs", action="store_true", help="the bad-input table")
    parser.add_argument("--fit-overhead", action="store_true",
                        help="time of fit with and without the stationarity check")
    parser.add_argument("--all", action="store_true",
                        help="everything RELIABILITY.md reports: corruptions (40 positions), "
                             "faults (5 seeds x 10 kills, 1 fresh), bad inputs, fit overhead")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()
    if args.all:
        args.faults, args.fresh, args.bad_inputs, args.fit_overhead = 5, 1, True, True
        args.no_corruptions = False
    torch.set_num_threads(1)
    corruption_rows = [] if args.no_corruptions else run_corruptions(args.positions)
    fault_rows = []
    if args.faults or args.fresh:
        fault_rows = (run_faults(args.faults, args.kills, fresh=args.fresh)
                      + run_score_faults(args.faults, args.kills)
                      + run_fit_and_gradient_faults(args.faults, args.kills))
    bad_rows = run_bad_inputs() if args.bad_inputs else []
    overhead_rows = run_fit_overhead() if args.fit_overhead else []
    if args.json:
        for row in corruption_rows + fault_rows + bad_rows + overhead_rows:
            print(json.dumps(row))
        return
    sections = []
    if corruption_rows:
        sections.append(corruption_summary(corruption_rows))
        sections.append(corruption_table(corruption_rows))
        for r in corruption_rows:
            for example in r["examples"]:
                print(f"  {r['store']} / {r['file']} / {r['kind']}: {example}",
                      file=sys.stderr)
    if fault_rows:
        sections.append(fault_table(fault_rows))
    if bad_rows:
        sections.append(bad_input_table(bad_rows))
    if overhead_rows:
        sections.append(fit_overhead_table(overhead_rows))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
