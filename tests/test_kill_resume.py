"""A score store written by a process that is killed with SIGKILL at random points (repeated),
then resumed, ends bit-identical to an uninterrupted run (scores, done-mask, manifest, top-k).

The writers are forked by one server process (tests/scale_store_writer.py --serve) so that each
run does not pay for importing torch again; every writer is its own process, killed by pid.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from influencekit.storage import ScoreStore

HERE = Path(__file__).parent
TOTAL_BLOCKS = 200  # 1200 training examples in blocks of 6, one block of queries


class WriterServer:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "scale_store_writer.py"), "--serve"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.live: set[int] = set()  # writers started and not yet reaped
        self._expect("ready")

    def _expect(self, word: str) -> str:
        line = self.proc.stdout.readline().strip()
        assert line.startswith(word), f"writer server said {line!r}"
        return line[len(word):].strip()

    def start(self, folder: Path) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        self.proc.stdin.write(f"run {folder}\n")
        self.proc.stdin.flush()
        pid = int(self._expect("pid"))
        self.live.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        self.proc.stdin.write(f"wait {pid}\n")
        self.proc.stdin.flush()
        status = int(self._expect("status"))
        self.live.discard(pid)
        return status

    def close(self):
        for pid in list(self.live):  # a writer left running by a failed test
            os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture
def server():
    s = WriterServer()
    yield s
    s.close()


def _done_blocks(folder: Path) -> int:
    return ScoreStore.blocks_done(folder / "store")


def _kill(server: WriterServer, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    status = server.wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _kill_after(server, pid, folder: Path, at_least: int, rng: random.Random) -> None:
    """SIGKILL the writer a random moment after ``at_least`` blocks are done."""
    deadline = time.monotonic() + 120
    while _done_blocks(folder) < at_least:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.005))
    _kill(server, pid)


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, server):
    rng = random.Random(11)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = server.start(reference)  # runs beside the killed writers

    # a kill right after start (during the store's creation or its first blocks) ...
    pid = server.start(killed)
    time.sleep(rng.uniform(0, 0.05))
    _kill(server, pid)
    progress = [_done_blocks(killed)]
    # ... then kills at random points further on, each after at least one more block
    for target in sorted(rng.sample(range(20, TOTAL_BLOCKS - 20), 3)):
        pid = server.start(killed)
        _kill_after(server, pid, killed, max(target, progress[-1] + 1), rng)
        progress.append(_done_blocks(killed))
    assert all(0 < d < TOTAL_BLOCKS for d in progress[1:]), progress
    assert progress == sorted(progress), progress
    assert not (killed / "top_k.safetensors").exists()
    assert server.wait(server.start(killed)) == 0  # resume to the end
    assert server.wait(uninterrupted) == 0

    ref_scores = np.load(reference / "store" / "scores.npy")
    got_scores = np.load(killed / "store" / "scores.npy")
    assert ref_scores.dtype == got_scores.dtype == np.float32
    assert ref_scores.tobytes() == got_scores.tobytes()
    stores = [ScoreStore.load(f / "store", writable=False) for f in (reference, killed)]
    assert stores[1].complete and stores[1].verify() == []
    assert stores[1].manifest == stores[0].manifest  # the same run (store ids differ)
    ref_top, got_top = (load_file(str(f / "top_k.safetensors")) for f in (reference, killed))
    assert all(ref_top[k].numpy().tobytes() == got_top[k].numpy().tobytes() for k in ref_top)
