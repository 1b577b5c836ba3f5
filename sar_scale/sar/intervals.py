"""Output intervals: how the ordered sequence of N tokens is cut into K sets.

* ``ar``: one token per set (K = N), classic autoregression.
* ``equal``: K sets of (almost) equal size.
* ``cosine``: few tokens first, more later (MAR / RandAR schedule: after step t,
  ``N * (1 - cos(pi/2 * (t+1)/K))`` tokens are known).
* ``random``: K-1 distinct random cut points.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Intervals = Literal["ar", "equal", "cosine", "random"]
INTERVALS: tuple[str, ...] = get_args(Intervals)


def set_sizes(n: int, num_sets: int, intervals: str, seed: int = 0,
              generator: torch.Generator | None = None) -> list[int]:
    """Sizes of the K sets (each >= 1, summing to ``n``)."""
    if n <= 0:
        raise ValueError(f"number of tokens must be positive, got {n}")
    if intervals == "ar":
        return [1] * n
    if intervals not in INTERVALS:
        raise ValueError(f"intervals must be one of {INTERVALS}, got {intervals!r}")
    k = int(num_sets)
    if not 1 <= k <= n:
        raise ValueError(f"num_sets must be in [1, {n}] for {n} tokens, got {k}")
    if intervals == "equal":
        base, rem = divmod(n, k)
        # the remainder goes to the last sets: early sets (least context) stay smallest
        return [base + (1 if i >= k - rem else 0) for i in range(k)]
    if intervals == "cosine":
        # cumulative known tokens after each step; force strictly increasing so every set is non-empty
        cum = [0]
        for t in range(k):
            target = round(n * (1.0 - math.cos(math.pi / 2 * (t + 1) / k)))
            lo = cum[-1] + 1
            hi = n - (k - t - 1)
            cum.append(min(max(target, lo), hi))
        cum[-1] = n
        return [cum[i + 1] - cum[i] for i in range(k)]
    # random cut points
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n]
    return [bounds[i + 1] - bounds[i] for i in range(k)]
