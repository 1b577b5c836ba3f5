"""Recipe: a SAR sampling recipe (sequence order, steps K, output intervals) independent of the grid.

The one home of the ``order-K-intervals`` notation (the paper's): ``Recipe.parse("random-16-cosine")``,
``recipe.name(grid)`` (K resolved for the grid: ``raster-256-ar`` at 16x16) and
``recipe.build(grid, batch_size, seed)`` -> :class:`SetPlan`. Evaluation plans, an export's sampling
defaults, the generate/edit options and the trainer's sample grids all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sar_scale.sar.intervals import INTERVALS, Intervals
from sar_scale.sar.orders import ORDERS, Order
from sar_scale.sar.plan import SetPlan


@dataclass(frozen=True)
class Recipe:
    """``num_sets=None`` (or ``intervals="ar"``) is AR: one token per set, K = N."""

    order: Order = "random"
    num_sets: int | None = 16
    intervals: Intervals = "cosine"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.intervals not in INTERVALS:
            raise ValueError(f"intervals must be one of {INTERVALS}, got {self.intervals!r}")
        k = self.num_sets
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
            raise ValueError(f"steps must be >= 1 (an integer), got {k!r}")
        if k is None or self.intervals == "ar":  # one normal form for AR
            object.__setattr__(self, "num_sets", None)
            object.__setattr__(self, "intervals", "ar")
        else:
            object.__setattr__(self, "num_sets", int(k))

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """``raster-ar`` / ``random-16-cosine`` / ``raster-8`` (intervals default cosine); an order
        name may itself hold ``_`` (``fixed_random-8-equal``)."""
        parts = text.strip().lower().split("-")
        if len(parts) in (2, 3) and parts[-1] == "ar" and (len(parts) == 2 or parts[1].isdigit()):
            return cls(parts[0], None, "ar")
        if len(parts) in (2, 3) and parts[1].isdigit():
            return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "cosine")
        raise ValueError(f"recipe {text!r}: expected ORDER-ar or ORDER-K[-INTERVALS], e.g. raster-ar, "
                         "random-16-cosine")

    @property
    def is_ar(self) -> bool:
        return self.num_sets is None

    def steps(self, grid: tuple[int, int]) -> int:
        """K for this grid (AR: N; else num_sets clipped to N)."""
        n = grid[0] * grid[1]
        return n if self.num_sets is None else min(self.num_sets, n)

    def name(self, grid: tuple[int, int] | None = None) -> str:
        k = self.steps(grid) if grid else (self.num_sets or "N")
        return f"{self.order}-{k}-{self.intervals}"

    def build(self, grid: tuple[int, int], batch_size: int | None = None, seed: int = 0,
              fixed_order_seed: int | None = None, stride: int = 2) -> SetPlan:
        """A SetPlan for ``grid``: per-sample orders for ``random`` when ``batch_size`` is given (each
        image its own permutation), shared otherwise. ``fixed_order_seed``: the seed the model was
        trained with for ``fixed_random`` (default ``seed``); ``stride`` of ``subsample``."""
        order_seed = fixed_order_seed if self.order == "fixed_random" and fixed_order_seed is not None else seed
        return SetPlan.build(grid, order=self.order, num_sets=self.steps(grid), intervals=self.intervals,
                             seed=order_seed, batch_size=batch_size if self.order == "random" else None,
                             generator=torch.Generator().manual_seed(int(seed)), stride=stride)


def standard_recipes(steps: list[int], orders: list[str], intervals: str = "cosine",
                     include_ar: bool = True) -> list[Recipe]:
    """AR (raster order) first, then every (order, K) pair: the comparison the paper draws."""
    recipes = [Recipe("raster", None)] if include_ar else []
    recipes += [Recipe(o, k, intervals) for k in steps for o in orders]
    return list(dict.fromkeys(recipes))


__all__ = ["Recipe", "standard_recipes"]
