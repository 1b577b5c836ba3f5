"""SetPlan: a sequence order plus output intervals - the full description of one SAR recipe.

Notation (``order-K-intervals`` in the paper): ``raster-256-ar`` at a 16x16 grid is classic AR,
``random-16-random`` the transition state SAR-TS, ``random-8-cosine`` is MAR-like.

Shapes: B batch, N = h*w tokens, K sets. The model works in *sequence* space (tokens gathered in
generation order), where the set structure - and therefore every attention mask - is the same for
all samples even when each sample has its own order; only RoPE positions differ per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from pydantic import Field, field_validator

from sar_scale.config import StrictModel
from sar_scale.sar.intervals import INTERVALS, set_sizes
from sar_scale.sar.orders import ORDERS, make_order


@dataclass(frozen=True)
class SetPlan:
    """order ``[B|1, N]`` (raster position of each sequence slot) + set sizes summing to N."""

    grid: tuple[int, int]
    order: torch.Tensor
    set_sizes: tuple[int, ...]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = self.grid[0] * self.grid[1]
        if self.order.dim() != 2 or self.order.shape[1] != n:
            raise ValueError(f"order must be [B, {n}] for grid {self.grid}, got {tuple(self.order.shape)}")
        if sum(self.set_sizes) != n or min(self.set_sizes) < 1:
            raise ValueError(f"set sizes must be >= 1 and sum to {n}, got {list(self.set_sizes)[:8]}...")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, grid: tuple[int, int], order: str = "raster", num_sets: int | None = None,
              intervals: str = "equal", seed: int = 0, batch_size: int | None = None,
              generator: torch.Generator | None = None, stride: int = 2) -> SetPlan:
        """Any (order, K, intervals) combination; ``intervals="ar"`` means K = N."""
        h, w = int(grid[0]), int(grid[1])
        n = h * w
        if intervals == "ar":
            num_sets = n
        if num_sets is None:
            raise ValueError("num_sets is required unless intervals='ar'")
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        order_t = make_order(order, h, w, batch_size=batch_size or 1, seed=seed, generator=g, stride=stride)
        sizes = set_sizes(n, min(int(num_sets), n), intervals, generator=g)
        meta = {"order": order, "num_sets": len(sizes), "intervals": intervals, "seed": seed, "stride": stride}
        return cls((h, w), order_t, tuple(sizes), meta)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_sets(self) -> int:
        return len(self.set_sizes)

    @property
    def batch_size(self) -> int:
        return self.order.shape[0]

    def name(self) -> str:
        return f"{self.meta.get('order', 'custom')}-{self.num_sets}-{self.meta.get('intervals', 'custom')}"

    def to(self, device: torch.device | str) -> SetPlan:
        return replace(self, order=self.order.to(device))

    def expand(self, batch_size: int) -> SetPlan:
        """Broadcast a shared order to ``batch_size`` rows (per-sample orders must already match)."""
        if self.order.shape[0] == batch_size:
            return self
        if self.order.shape[0] != 1:
            raise ValueError(f"plan has {self.order.shape[0]} orders but the batch has {batch_size} samples")
        return replace(self, order=self.order.expand(batch_size, -1))

    # ------------------------------------------------------------------ derived indices
    def set_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Set index of each sequence slot, ``[N]`` (shared by the batch)."""
        sizes = torch.tensor(self.set_sizes, device=device)
        return torch.repeat_interleave(torch.arange(len(self.set_sizes), device=device), sizes)

    def raster_set_ids(self) -> torch.Tensor:
        """Set index of each *raster* position, ``[B, N]`` (differs per sample with random orders)."""
        seq_ids = self.set_ids(self.order.device).expand_as(self.order)
        out = torch.empty_like(self.order)
        return out.scatter_(1, self.order, seq_ids)

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(row, col) of each sequence slot: ``[B, N, 2]`` float, for 2D RoPE."""
        h, w = self.grid
        order = self.order.to(device) if device is not None else self.order
        return torch.stack([order // w, order % w], dim=-1).float()

    # ------------------------------------------------------------------ masks
    def masks(self, space: str = "sequence") -> dict[str, torch.Tensor]:
        """The three generalized causal masks (True = may attend), without condition tokens.

        ``sequence`` space: ``[N, N]`` each, shared by the batch. ``raster`` space: ``[B, N, N]``
        (query raster position x key raster position), the batched form for per-sample orders.
        """
        ids = self.set_ids(self.order.device) if space == "sequence" else self.raster_set_ids()
        if space not in ("sequence", "raster"):
            raise ValueError(f"space must be 'sequence' or 'raster', got {space!r}")
        q, k = ids.unsqueeze(-1), ids.unsqueeze(-2)
        return {
            "encoder": k <= q,  # m_e: a token of set k sees tokens of sets <= k
            "decoder_self": k == q,  # m_ds: mask tokens of set k see the other targets of set k
            "decoder_cross": k < q,  # m_dc: targets of set k see encoder outputs of sets < k
        }

    # ------------------------------------------------------------------ editing
    def with_known(self, known_mask: torch.Tensor) -> tuple[SetPlan, int]:
        """Reorder so the known positions come first (one given set), the rest keep this plan's order.

        ``known_mask``: bool ``[N]`` or ``[B, N]`` in raster order; every sample must know the same
        number of tokens (sets are shared by the batch). Returns (new plan, number of known tokens);
        the remaining tokens are re-split with this plan's K and interval rule.
        """
        n = self.num_tokens
        km = known_mask.to(torch.bool)
        if km.dim() == 1:
            km = km.unsqueeze(0)
        if km.shape[-1] != n:
            raise ValueError(f"known_mask must have {n} entries (grid {self.grid}), got {km.shape[-1]}")
        b = max(km.shape[0], self.order.shape[0])
        km = km.expand(b, n)
        order = self.order.expand(b, n)
        counts = km.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every sample must know the same number of tokens (sets are shared)")
        n_known = int(counts[0])
        if n_known == 0:
            return self.expand(b), 0
        if n_known >= n:
            raise ValueError("known_mask covers the whole image: nothing to generate")
        known_in_seq = torch.gather(km, 1, order)
        # stable sort: known slots first, each group keeps the plan's order
        idx = torch.sort((~known_in_seq).to(torch.int8), dim=1, stable=True).indices
        new_order = torch.gather(order, 1, idx)
        rest = n - n_known
        k = min(self.num_sets, rest)
        intervals = self.meta.get("intervals", "equal")
        sizes = set_sizes(rest, k, intervals, seed=int(self.meta.get("seed", 0)))
        meta = {**self.meta, "known": n_known}
        return SetPlan(self.grid, new_order, (n_known, *sizes), meta), n_known


class PlanDistribution(StrictModel):
    """Distribution of SAR recipes drawn per training batch.

    Examples: AR ``{orders: {raster: 1}, intervals: {ar: 1}}``; SAR-TS random-16-random
    ``{orders: {random: 1}, num_sets: [16], intervals: {random: 1}}``; a mixture trains one model
    for several inference plans.
    """

    orders: dict[str, float] = Field(default_factory=lambda: {"random": 1.0},
                                     description="order name -> sampling weight")
    num_sets: list[int] = Field(default_factory=lambda: [16],
                                description="choices of K (uniform); clipped to N; ignored by 'ar'")
    intervals: dict[str, float] = Field(default_factory=lambda: {"random": 1.0},
                                        description="interval rule -> sampling weight")
    fixed_order_seed: int = Field(0, description="seed of the 'fixed_random' order (kept for inference)")
    subsample_stride: int = Field(2, ge=1)

    @field_validator("orders", "intervals")
    @classmethod
    def _check_weights(cls, v: dict[str, float], info) -> dict[str, float]:
        allowed = ORDERS if info.field_name == "orders" else INTERVALS
        if not v or any(k not in allowed for k in v) or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"{info.field_name} must map names in {allowed} to non-negative weights, got {v}")
        return v

    @field_validator("num_sets")
    @classmethod
    def _check_num_sets(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"num_sets must be a non-empty list of integers >= 1, got {v}")
        return v


class PlanSampler:
    """Draws one SetPlan per batch; pass a generator seeded from (seed, step) for exact resume."""

    def __init__(self, dist: PlanDistribution):
        self.dist = dist
        self._orders = list(dist.orders)
        self._ow = torch.tensor([dist.orders[k] for k in self._orders], dtype=torch.float)
        self._ints = list(dist.intervals)
        self._iw = torch.tensor([dist.intervals[k] for k in self._ints], dtype=torch.float)

    def draw(self, grid: tuple[int, int], batch_size: int, generator: torch.Generator) -> SetPlan:
        order = self._orders[int(torch.multinomial(self._ow, 1, generator=generator))]
        intervals = self._ints[int(torch.multinomial(self._iw, 1, generator=generator))]
        k = self.dist.num_sets[int(torch.randint(len(self.dist.num_sets), (1,), generator=generator))]
        seed = self.dist.fixed_order_seed if order == "fixed_random" else 0
        return SetPlan.build(grid, order=order, num_sets=k, intervals=intervals, seed=seed,
                             batch_size=batch_size, generator=generator, stride=self.dist.subsample_stride)
