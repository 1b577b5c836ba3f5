"""Sampling plans an evaluation compares: AR (raster, one token per step) and SAR at K steps.

A plan here is a *recipe* (order, K, intervals) independent of the grid; ``build`` turns it into
a :class:`sar_scale.sar.SetPlan` for a concrete token grid and batch. Names follow the paper's
``order-K-intervals`` notation with K resolved for the grid (``raster-256-ar`` at 16x16).
"""

from __future__ import annotations

from dataclasses import dataclass

from sar_scale.sar import INTERVALS, ORDERS, SetPlan


@dataclass(frozen=True)
class PlanSpec:
    order: str = "random"
    num_sets: int | None = 16  # None = AR (one token per set)
    intervals: str = "cosine"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"plan order must be one of {ORDERS}, got {self.order!r}")
        if self.num_sets is not None and self.num_sets < 1:
            raise ValueError(f"plan steps must be >= 1, got {self.num_sets}")
        if self.num_sets is not None and self.intervals not in INTERVALS:
            raise ValueError(f"plan intervals must be one of {INTERVALS}, got {self.intervals!r}")

    @property
    def is_ar(self) -> bool:
        return self.num_sets is None

    def name(self, grid: tuple[int, int] | None = None) -> str:
        if self.is_ar:
            n = grid[0] * grid[1] if grid else "N"
            return f"{self.order}-{n}-ar"
        k = min(self.num_sets, grid[0] * grid[1]) if grid else self.num_sets
        return f"{self.order}-{k}-{self.intervals}"

    def build(self, grid: tuple[int, int], batch_size: int, seed: int = 0) -> SetPlan:
        """Per-sample orders for random orders (each image its own permutation), shared otherwise."""
        per_sample = self.order == "random"
        if self.is_ar:
            return SetPlan.build(grid, order=self.order, intervals="ar", seed=seed,
                                 batch_size=batch_size if per_sample else None)
        return SetPlan.build(grid, order=self.order, num_sets=self.num_sets, intervals=self.intervals,
                             seed=seed, batch_size=batch_size if per_sample else None)


def parse_plan(text: str) -> PlanSpec:
    """``raster-ar`` / ``random-16-cosine`` / ``raster-8`` (intervals default cosine)."""
    parts = text.strip().lower().split("-")
    if len(parts) == 2 and parts[1] == "ar":
        return PlanSpec(parts[0], None, "ar")
    if len(parts) == 3 and parts[2] == "ar":
        return PlanSpec(parts[0], None, "ar")
    if len(parts) in (2, 3) and parts[1].isdigit():
        return PlanSpec(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "cosine")
    raise ValueError(f"plan {text!r}: expected ORDER-ar or ORDER-K[-INTERVALS], e.g. raster-ar, random-16-cosine")


def standard_plans(steps: list[int], orders: list[str], intervals: str = "cosine",
                   include_ar: bool = True) -> list[PlanSpec]:
    """AR (raster order) first, then every (order, K) pair: the comparison the paper draws."""
    plans = [PlanSpec("raster", None, "ar")] if include_ar else []
    plans += [PlanSpec(o, k, intervals) for k in steps for o in orders]
    seen: set[PlanSpec] = set()
    return [p for p in plans if not (p in seen or seen.add(p))]
