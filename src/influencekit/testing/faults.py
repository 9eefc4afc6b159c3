"""Fault injection: run a worker in a subprocess, SIGKILL it at random points, run it again.

A worker is any command (usually ``[sys.executable, "worker.py", ...]``) that does some long,
resumable work into a store. It calls :func:`checkpoint` once its imports and set-up are done,
right before the work starts; the harness measures kill delays from that moment, so the kills
land in the work, not in ``import torch``.

- :func:`run_once`: one run, optionally SIGKILLed ``kill_after`` seconds after the checkpoint;
- :func:`kill_and_resume`: ``kills`` runs each killed after a random delay (seeded), then one run
  left to finish; the caller compares the store with an uninterrupted run;
- :func:`run_concurrently`: several workers released at the same instant (e.g. two partitions of
  one store), each optionally killed;
- :class:`RowLedger`: after every run, checks that no row once done was lost or changed.

Every function takes ``launcher=``: ``None`` starts each worker as a fresh interpreter
(``subprocess.Popen(argv)``, the most faithful, but ``import torch`` costs seconds per run);
a :class:`Zygote` imports the heavy modules once and forks one process per run from there, so
that many kills fit in a short test (``argv`` must then be ``[python, "-m", module, *args]``).
Either way each run is its own OS process, killed with SIGKILL.

Only POSIX systems (SIGKILL, fork). Nothing here knows about influencekit's stores: fit,
gradient and score stores reuse it with their own workers (see
:mod:`influencekit.testing.workers`). Messages between the harness and a zygote are JSON lines.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_ENV = "INFLUENCEKIT_FAULTS_READY"
GO_ENV = "INFLUENCEKIT_FAULTS_GO"
_POLL = 0.002


def checkpoint() -> None:
    """Call in a worker right before its work starts.

    Tells the harness the worker is ready (the kill clock starts now) and, under
    :func:`run_concurrently`, waits until every worker is ready. A no-op outside the harness.
    """
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).touch()
    go = os.environ.get(GO_ENV)
    if go:
        while not os.path.exists(go):
            time.sleep(_POLL)


@dataclass
class Run:
    """One worker run.

    Attributes:
        returncode: the exit status (``-9`` when killed by SIGKILL).
        killed: the harness killed it while it was still running.
        kill_after: seconds after the checkpoint at which the kill was sent (None: none).
        seconds: from the checkpoint to the end of the process (nan if it never got there).
        output: the end of its stdout and stderr together.
    """

    returncode: int
    killed: bool
    kill_after: float | None
    seconds: float
    output: str = ""


@dataclass
class FaultReport:
    """The runs of :func:`kill_and_resume`, in order (the last one is the resume)."""

    runs: list[Run] = field(default_factory=list)

    @property
    def kills(self) -> int:
        """How many runs were killed while working (a run that finished before its kill was due
        does not count)."""
        return sum(r.killed for r in self.runs)

    @property
    def completed(self) -> bool:
        """The last run finished by itself with status 0."""
        return bool(self.runs) and not self.runs[-1].killed and self.runs[-1].returncode == 0


class _Worker:
    """A started worker process with its own ready file and output file."""

    def __init__(self, argv, env, cwd, folder: Path, tag: str, go: Path | None, launcher=None):
        self.ready = folder / f"{tag}.ready"
        self.log = folder / f"{tag}.log"
        signals = {READY_ENV: str(self.ready), GO_ENV: "" if go is None else str(go)}
        if launcher is not None:
            self.proc = launcher.spawn(list(argv), signals, self.log)
        else:
            full_env = dict(os.environ if env is None else env, **signals)
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(list(argv), env=full_env, cwd=cwd, stdout=out,
                                             stderr=subprocess.STDOUT)
        self.started: float | None = None

    def wait_ready(self, timeout: float) -> bool:
        """True when the worker reached its checkpoint; False if it exited before."""
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"worker {self.proc.args} did not reach its checkpoint in "
                                   f"{timeout} s:\n{self.output()}")
            time.sleep(_POLL)
        self.started = time.monotonic()
        return True

    def kill(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self, limit: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def finish(self, kill_when, timeout: float) -> Run:
        """Wait for the end; SIGKILL the worker as soon as ``kill_when(seconds since its
        checkpoint)`` is true (a number ``t`` means ``seconds >= t``; None: never)."""
        if isinstance(kill_when, (int, float)):
            kill_when = _after(float(kill_when))
        killed, sent = False, None
        deadline = time.monotonic() + timeout
        if self.started is not None and kill_when is not None:
            while self.proc.poll() is None and time.monotonic() < deadline:
                elapsed = time.monotonic() - self.started
                if kill_when(elapsed):
                    sent = elapsed
                    self.kill()
                    killed = self.proc.returncode == -signal.SIGKILL  # not if it just ended
                    break
                time.sleep(_POLL)
        try:
            self.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"worker {self.proc.args} ran over {timeout} s:\n"
                               f"{self.output()}") from None
        seconds = (time.monotonic() - self.started) if self.started is not None else float("nan")
        return Run(self.proc.returncode, killed, sent, seconds, self.output())


def _after(seconds: float):
    return lambda elapsed: elapsed >= seconds


class KillAtProgress:
    """A kill point inside the work: once ``progress()`` (e.g. the rows done in the store)
    reaches ``target``, wait ``fraction`` of a unit of work more, then kill.

    The unit of work is measured in the run itself (seconds per unit between the first unit
    finished and ``target``), or is ``unit_seconds`` until two units are done. So the kill
    lands at a random point of the unit after ``target``, whatever the speed of the machine.
    """

    def __init__(self, progress, target: int, fraction: float, unit_seconds: float):
        self.progress = progress
        self.target = target
        self.fraction = fraction
        self.unit_seconds = unit_seconds
        self._start: int | None = None
        self._first: tuple[float, int] | None = None  # (seconds, progress) at the first unit
        self._due: float | None = None

    def __call__(self, elapsed: float) -> bool:
        done = self.progress()
        if self._start is None:
            self._start = done
        if self._first is None and done > self._start:
            self._first = (elapsed, done)
        if self._due is None:
            if done < self.target:
                return False
            unit = self.unit_seconds
            if self._first is not None and done > self._first[1]:
                unit = (elapsed - self._first[0]) / (done - self._first[1])
            self._due = elapsed + self.fraction * unit
        return elapsed >= self._due


def run_once(argv: Sequence[str], *, kill_after=None, env=None, cwd=None,
             timeout: float = 300.0, launcher=None) -> Run:
    """Run ``argv`` once; SIGKILL it ``kill_after`` seconds after its :func:`checkpoint` (or
    when the predicate ``kill_after(seconds)`` first holds, e.g. a :class:`KillAtProgress`)."""
    with tempfile.TemporaryDirectory(prefix="ik-faults-") as tmp:
        worker = _Worker(argv, env, cwd, Path(tmp), "worker", None, launcher)
        worker.wait_ready(timeout)
        return worker.finish(kill_after, timeout)


def kill_and_resume(argv: Sequence[str], *, kills: int, seed: int, max_delay=None,
                    progress=None, total: int | None = None, unit_seconds: float = 0.1,
                    env=None, cwd=None, timeout: float = 300.0, after_each=None,
                    launcher=None) -> FaultReport:
    """Run ``argv`` ``kills`` times, each SIGKILLed at a random point, then once more to
    completion (``random.Random(seed)`` draws the points).

    Kill points, one of:

    - ``max_delay``: a delay drawn uniformly from ``[0, max_delay]`` s after the checkpoint (a
      number, or a function called before each run);
    - ``progress`` and ``total``: ``progress()`` counts the units of work done (e.g. rows in
      the store, out of ``total``); each run is killed inside a unit drawn uniformly among those
      left, at a uniform fraction of it (:class:`KillAtProgress`; ``unit_seconds`` is the
      guess used before the run has finished a unit, halved whenever a run ended before its
      kill). Robust to the speed of the machine: the kills land in the work.

    ``after_each(run)`` (optional) is called after every run, e.g. a :class:`RowLedger` that
    checks that no row already done was lost.
    """
    if (max_delay is None) == (progress is None) or (progress is not None and total is None):
        raise ValueError("pass either max_delay, or progress and total")
    rng = random.Random(seed)
    report = FaultReport()
    for _ in range(kills):
        if progress is not None:
            done = progress()
            target = rng.randint(done, max(done, total - 1))
            kill = KillAtProgress(progress, target, rng.random(), unit_seconds)
        else:
            limit = max_delay() if callable(max_delay) else max_delay
            kill = rng.uniform(0.0, limit)
        report.runs.append(run_once(argv, kill_after=kill, env=env, cwd=cwd, timeout=timeout,
                                    launcher=launcher))
        if progress is not None and not report.runs[-1].killed:
            unit_seconds /= 2  # the guess was too long: the run ended before its kill
        if after_each is not None:
            after_each(report.runs[-1])
    report.runs.append(run_once(argv, env=env, cwd=cwd, timeout=timeout, launcher=launcher))
    if after_each is not None:
        after_each(report.runs[-1])
    return report


def run_concurrently(argvs: Sequence[Sequence[str]], *,
                     kill_after: Sequence[float | None] | None = None, env=None, cwd=None,
                     timeout: float = 300.0, launcher=None) -> list[Run]:
    """Start every command, release them together once all reached their checkpoint, and wait
    for all; ``kill_after[i]`` (seconds after the release) SIGKILLs worker i."""
    kill_after = list(kill_after) if kill_after is not None else [None] * len(argvs)
    with tempfile.TemporaryDirectory(prefix="ik-faults-") as tmp:
        go = Path(tmp) / "go"
        workers = [_Worker(argv, env, cwd, Path(tmp), f"worker{i}", go, launcher)
                   for i, argv in enumerate(argvs)]
        for worker in workers:
            worker.wait_ready(timeout)
        go.touch()
        released = time.monotonic()
        for worker in workers:
            if worker.started is not None:
                worker.started = released
        order = sorted(range(len(workers)),
                       key=lambda i: float("inf") if kill_after[i] is None else kill_after[i])
        runs: dict[int, Run] = {}
        for i in order:
            runs[i] = workers[i].finish(kill_after[i], timeout)
        return [runs[i] for i in range(len(workers))]


class RowLedger:
    """Watches a row store across runs: no row once done may be lost, changed or wrong.

    ``read()`` returns ``(done [rows] bool, values [rows, ...])`` of the store now, or ``None``
    when there is no store yet; it may raise (the store was left unreadable: counted in
    ``unreadable``). ``reference`` (optional, ``[rows, ...]``) is the uninterrupted run's array:
    a done row must equal its reference row bit for bit. Pass the ledger as ``after_each`` to
    :func:`kill_and_resume`, or call it after any run.

    Attributes:
        lost: ``(run number, row)`` for every row that was done and later was not, or changed.
        wrong: ``(run number, row)`` for every done row that differs from ``reference``.
        unreadable: ``(run number, error)`` for every read that raised.
        done_after: the number of done rows after each run.
    """

    def __init__(self, read, reference=None):
        self.read = read
        self.reference = reference
        self.lost: list[tuple[int, int]] = []
        self.wrong: list[tuple[int, int]] = []
        self.unreadable: list[tuple[int, str]] = []
        self.done_after: list[int] = []
        self._seen: dict[int, bytes] = {}

    def __call__(self, run: Run | None = None) -> None:
        number = len(self.done_after)
        try:
            state = self.read()
        except Exception as exc:  # the point is to count these, whatever they are
            self.unreadable.append((number, f"{type(exc).__name__}: {exc}"))
            self.done_after.append(-1)
            return
        if state is None:
            self.done_after.append(0)
            return
        done, values = state
        for row, before in list(self._seen.items()):
            if not done[row] or values[row].tobytes() != before:
                self.lost.append((number, row))
                del self._seen[row]
        for row in map(int, (i for i, d in enumerate(done) if d)):
            self._seen[row] = values[row].tobytes()
            if self.reference is not None and values[row].tobytes() != \
                    self.reference[row].tobytes():
                self.wrong.append((number, row))
        self.done_after.append(int(sum(bool(d) for d in done)))

    @property
    def clean(self) -> bool:
        """Nothing lost, wrong or unreadable so far."""
        return not (self.lost or self.wrong or self.unreadable)


class Zygote:
    """A Python process that imports ``preload`` once, then forks one worker per run.

    Use as a context manager (or :meth:`start` / :meth:`close`) and pass it as ``launcher=``.
    ``env`` and ``cwd`` are the zygote's (its workers inherit them). A worker's ``argv`` is
    ``[python, "-m", module, *args]``; the forked process runs the module as ``__main__`` with
    ``sys.argv = [module, *args]`` and exits with its status (1 on an exception, with the
    traceback in its output).
    """

    def __init__(self, preload=("torch", "torch._dynamo", "influencekit"), env=None, cwd=None):
        self.preload = tuple(preload)
        self.env = env
        self.cwd = cwd
        self._proc = None

    def start(self, timeout: float = 300.0) -> Zygote:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "influencekit.testing.faults", "--zygote", *self.preload],
            env=self.env, cwd=self.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._events: dict[int, int] = {}
        self._spawned: list[int] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None, timeout=timeout):
                self.close()
                raise TimeoutError(f"the zygote did not finish importing {self.preload} in "
                                   f"{timeout} s")
        if not self._ready:
            raise RuntimeError(f"the zygote failed to import {self.preload}")
        return self

    _ready: bool | None = None

    def _read_events(self):
        for line in self._proc.stdout:
            message = json.loads(line)
            with self._cond:
                if "ready" in message:
                    self._ready = bool(message["ready"])
                elif "spawned" in message:
                    self._spawned.append(int(message["spawned"]))
                elif "exited" in message:
                    self._events[int(message["exited"])] = int(message["returncode"])
                self._cond.notify_all()
        with self._cond:
            if self._ready is None:
                self._ready = False
            self._cond.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> _Forked:
        if len(argv) < 3 or argv[1] != "-m":
            raise ValueError(f"a Zygote runs modules: argv must be [python, '-m', module, ...], "
                             f"got {argv}")
        with self._cond:
            count = len(self._spawned)
            self._proc.stdin.write((json.dumps({"argv": argv[2:], "env": env,
                                                "log": str(log)}) + "\n").encode())
            self._proc.stdin.flush()
            self._cond.wait_for(lambda: len(self._spawned) > count)
            return _Forked(self, self._spawned[count], argv)

    def _wait(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._events, timeout=timeout)
            return self._events.get(pid)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Zygote:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Forked:
    """The part of ``subprocess.Popen``'s interface the harness uses, for a forked worker."""

    def __init__(self, zygote: Zygote, pid: int, argv):
        self.zygote = zygote
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote._wait(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote._wait(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def _zygote_main(preload) -> None:
    """The zygote's loop: read JSON job lines on stdin, fork, report pids and exit codes."""
    out = sys.stdout.buffer

    def send(message):
        out.write((json.dumps(message) + "\n").encode())
        out.flush()

    try:
        for module in preload:
            importlib.import_module(module)
    except BaseException:
        traceback.print_exc()
        send({"ready": False})
        return
    send({"ready": True})
    stdin, pending, children, closed = sys.stdin.fileno(), b"", set(), False
    while not closed or children:
        if not closed and select.select([stdin], [], [], 0.005)[0]:
            chunk = os.read(stdin, 1 << 16)
            closed = not chunk
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = _fork_worker(json.loads(line), out)
                children.add(pid)
                send({"spawned": pid})
        elif closed:
            time.sleep(0.005)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            send({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _fork_worker(job: dict, out) -> int:
    out.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        for key, value in job["env"].items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        module, *args = job["argv"]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--zygote":
        _zygote_main(sys.argv[2:])
        sys.stdout.flush()
        os._exit(0)  # skip the interpreter's teardown of torch (seconds)
