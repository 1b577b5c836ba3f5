"""Sequence orders over an h x w token grid.

An order is a permutation of the N = h*w raster positions: ``order[i]`` is the raster position of
the i-th token in the generation sequence. Orders are either shared by the batch (``[N]``) or drawn
per sample (``[B, N]``, only "random").
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Order = Literal["raster", "random", "fixed_random", "spiral", "zigzag", "subsample"]
ORDERS: tuple[str, ...] = get_args(Order)


def raster_order(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w)


def zigzag_order(h: int, w: int) -> torch.Tensor:
    """Boustrophedon: even rows left->right, odd rows right->left (neighbours stay adjacent)."""
    grid = torch.arange(h * w).view(h, w).clone()
    grid[1::2] = grid[1::2].flip(-1)
    return grid.flatten()


def spiral_order(h: int, w: int) -> torch.Tensor:
    """Clockwise spiral from the top-left corner inwards (the border first, the centre last)."""
    out: list[int] = []
    top, bottom, left, right = 0, h - 1, 0, w - 1
    while top <= bottom and left <= right:
        out += [top * w + x for x in range(left, right + 1)]
        out += [y * w + right for y in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * w + x for x in range(right - 1, left - 1, -1)]
        if left < right:
            out += [y * w + left for y in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return torch.tensor(out, dtype=torch.long)


def subsample_order(h: int, w: int, stride: int = 2) -> torch.Tensor:
    """Coarse to fine: every ``stride``-th token on both axes first, then the other phases.

    Phase (0, 0) covers the image sparsely; later phases fill in between (like a pyramid).
    """
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    phase = (ys % stride) * stride + (xs % stride)
    raster = torch.arange(h * w)
    # stable sort by phase keeps raster order inside each phase
    return raster[torch.sort(phase.flatten(), stable=True).indices]


def random_order(h: int, w: int, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent random permutation per sample: ``[B, N]``."""
    n = h * w
    keys = torch.rand(batch_size, n, generator=generator)
    return keys.argsort(dim=1)


def fixed_random_order(h: int, w: int, seed: int) -> torch.Tensor:
    """One random permutation, fixed by ``seed`` (store the seed in the config to reuse it)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(h * w, generator=g)


def make_order(name: str, h: int, w: int, batch_size: int = 1, seed: int = 0,
               generator: torch.Generator | None = None, stride: int = 2) -> torch.Tensor:
    """Build an order by name; returns ``[B, N]`` for "random", ``[1, N]`` otherwise."""
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive, got {(h, w)}")
    if name == "random":
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        return random_order(h, w, batch_size, generator)
    if name == "raster":
        order = raster_order(h, w)
    elif name == "fixed_random":
        order = fixed_random_order(h, w, seed)
    elif name == "spiral":
        order = spiral_order(h, w)
    elif name == "zigzag":
        order = zigzag_order(h, w)
    elif name == "subsample":
        order = subsample_order(h, w, stride)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {name!r}")
    return order.unsqueeze(0)
