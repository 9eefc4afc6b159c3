"""Write (or resume) a score store and its top-k; driven and SIGKILLed by
tests/test_kill_resume.py.

    python tests/scale_store_writer.py FOLDER    # one run
    python tests/scale_store_writer.py --serve   # a server that forks one writer per request

A run scores 1200 training examples in blocks of 6 into ``FOLDER/store`` (committing every
20 ms, so kills land both between commits and inside them) and writes the top-k to
``FOLDER/top_k.safetensors`` at the end. The server builds the problem once (importing torch and
influencekit takes seconds), prints ``ready``, then reads commands on stdin: ``run FOLDER``
forks a writer and prints ``pid N``; ``wait N`` reaps it and prints ``status S`` (the raw
``waitpid`` status). Killing a forked writer with SIGKILL is what the test does.
"""

import os
import sys
import threading
import traceback
from pathlib import Path

import torch
import tqdm.std
from safetensors.torch import save_file

import influencekit as ik
from scale_problem import build_problem


def write(influence, train, query, folder: Path) -> None:
    result = ik.stream_scores(influence, query, train, k=5, store=folder / "store",
                              block_size=6, runtime=ik.Runtime(progress=False),
                              commit_seconds=0.02)
    top = result.top_k
    tmp = folder / "top_k.safetensors.tmp"
    save_file({"helpful_scores": top.helpful_scores, "helpful_indices": top.helpful_indices,
               "harmful_scores": top.harmful_scores, "harmful_indices": top.harmful_indices},
              str(tmp))
    os.replace(tmp, folder / "top_k.safetensors")


def serve(problem) -> None:
    # fork only a single-threaded process: a thread holding a lock at the fork (tqdm's monitor
    # wakes every 10 s) would leave that lock held forever in the child
    assert threading.active_count() == 1, threading.enumerate()
    print("ready", flush=True)
    for line in sys.stdin:
        command, argument = line.split()
        if command == "run":
            pid = os.fork()
            if pid == 0:  # the writer
                code = 0
                try:
                    write(*problem, Path(argument))
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(argument), 0)
            print(f"status {status}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    tqdm.std.tqdm.monitor_interval = 0  # no monitor thread (see serve)
    problem = build_problem(n_train=1200, n_query=7, n_fit=100)
    if sys.argv[1] == "--serve":
        serve(problem)
    else:
        write(*problem, Path(sys.argv[1]))


if __name__ == "__main__":
    main()
