"""Which threads run torch's intra-op (OpenMP) work: the engine thread alone.

libgomp keeps a team of worker threads for every thread that ever ran a parallel region, and once it manages
more threads than there are CPUs it stops spin-waiting between regions, so every region then pays a futex
wake-up. A decode step runs about two thousand regions: a second team anywhere in the process (the one the
thread that loaded the model leaves behind) made batch-32 decode steps of the default model 121 ms instead of
89 ms on 2 cores. So the thread that loads the model and every later thread stay single-threaded, and the
engine thread claims the configured number of threads for itself when it starts.
"""

from __future__ import annotations

import os
import threading

import torch


def single_threaded() -> None:
    """Runs this thread's torch ops on one thread, and makes that the default of threads that start later."""
    torch.set_num_threads(1)


def claim_compute_threads(threads: int) -> int:
    """Called on the engine thread: it alone runs torch ops on `threads` cores (0: all). Returns the count.

    `torch.set_num_threads` sets both the calling thread's count and the default that a thread takes on its
    first torch op (this one included: `get_num_threads` makes that happen now); a short-lived thread then
    puts the default back to one so that only this thread has a team.
    """
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    torch.get_num_threads()
    if count > 1:
        resetter = threading.Thread(target=single_threaded, name="deltaserve-threads-default")
        resetter.start()
        resetter.join()
    return count
