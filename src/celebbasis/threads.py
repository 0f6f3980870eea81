"""How many CPU threads torch should use for a model: chosen here, applied only by the front ends.

Torch splits each operation over its intra-op threads, and they wait for each other at its end. On a
small model every operation is short, so when another process takes a core away, the threads spend
their time waiting for the one that was descheduled: ``celebbasis add --toy --steps 20`` took 113 s
at torch's default 2 threads beside one busy process and 7.9 s at one thread (2 cores;
``benchmarks/bench_threads.py`` measures it). A model big enough to gain from more threads keeps
torch's default.

The library never changes process-wide settings. ``celebbasis.cli`` (which the web UI and the
scripts run through) applies ``threads_for`` with ``torch_threads``; ``--threads N`` overrides it,
and so does an ``OMP_NUM_THREADS`` set by the user. Nothing here imports torch at module level: the
command line imports this before it has checked its inputs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

# A model's work per UNet call, as UNet parameters x latent pixels (toy world: 4.7M x 16^2 = 1.2e9;
# benchmarks' sd-small: 37.5M x 32^2 = 3.8e10; SD 1.5: 860M x 64^2 = 3.5e12). Below this, operations are
# too short for a second thread to pay for its waiting: measured in benchmarks/bench_threads.py.
SMALL_MODEL_WORK = 1e11


def model_work(pipe) -> float:
    """UNet parameters x latent pixels at the model's native size: how long each operation of a step is."""
    unet = pipe.unet
    side = int(unet.config.sample_size)
    return float(sum(p.numel() for p in unet.parameters())) * side * side


def threads_for(pipe) -> int | None:
    """The thread count for ``pipe``: 1 for a small model on the CPU, ``None`` (torch's default) otherwise."""
    if pipe.unet.device.type != "cpu":
        return None  # the GPU does the work; the CPU threads only feed it
    return 1 if model_work(pipe) < SMALL_MODEL_WORK else None


def user_set_threads() -> bool:
    """Whether the user chose torch's threads through the environment (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``)."""
    return any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


@contextmanager
def torch_threads(n: int | None = None):
    """Torch's intra-op thread count inside the block (``set(n)`` may change it), put back afterwards.

    Yields a function ``set(n)``: ``n`` threads from now until the block ends (``None``: as found).
    For front ends only: it changes the whole process.

    Example:
        >>> with torch_threads(1) as set_threads:
        ...     pipe = load_pipeline(toy=True)
        ...     set_threads(threads_for(pipe))
    """
    import torch

    found = torch.get_num_threads()

    def set_threads(count: int | None) -> None:
        torch.set_num_threads(found if count is None else count)

    set_threads(n)
    try:
        yield set_threads
    finally:
        torch.set_num_threads(found)
