"""Thread pools sized to the CPUs a Ray actor or worker was given."""

from __future__ import annotations


def use_threads(count: int) -> None:
    """Run torch and OpenCV on `count` threads. OpenCV's pool ignores OMP_NUM_THREADS (which Ray sets) and
    spans every core of the node, so actors sharing a node would slow each other down."""
    import cv2
    import torch

    torch.set_num_threads(count)
    cv2.setNumThreads(count)


def threads_for(cpus: float) -> int:
    """Threads for a logical CPU share: at least one, the whole CPUs otherwise."""
    return max(1, int(cpus))
