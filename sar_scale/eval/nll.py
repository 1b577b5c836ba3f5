"""Token NLL on held-out shards: the likelihood view of a SAR model, per plan.

SAR factorises p(x) differently for every (order, K, intervals) recipe, so the same model has a
different likelihood under each plan; comparing them shows which recipes the model actually
learned (a model trained on random-order random-interval plans should be close across K, and AR
raster should be lowest when trained on it). The loss is exactly the training loss
(``set_ar_loss`` over the model's logits), averaged over every token of up to ``max_samples``
held-out samples, read through the training reader's byte-range index (one range read each).

Shape legend: B samples, N tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sar_scale.data.loader import BatchReader, ShardIndex
from sar_scale.sar import Condition, Recipe, set_ar_loss

logger = logging.getLogger(__name__)

CondFn = Callable[[dict[str, Any]], Condition]


@dataclass
class NLLResult:
    plan: str
    nll: float  # nats per token
    bits_per_token: float
    perplexity: float
    tokens: int
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eval_batches(url: str, resolution: int, batch_size: int, max_samples: int | None, seed: int = 0,
                 cond: str = "text_encoder", vocab_size: int | None = None,
                 max_text_len: int | None = None) -> tuple[BatchReader, int]:
    """A reader over held-out samples grouped by bucket (fixed, seeded subset when capped)."""
    index = ShardIndex(url)
    table = index.table(resolution)
    ids = np.arange(len(table))
    if max_samples is not None and max_samples < len(ids):
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_samples, replace=False))
    schedule: list[np.ndarray] = []
    for hw in sorted({tuple(g) for g in table.grid[ids].tolist()}):
        group = ids[(table.grid[ids, 0] == hw[0]) & (table.grid[ids, 1] == hw[1])]
        schedule += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    reader = BatchReader(url, table, schedule, rank=0, world=1, cond=cond, vocab_size=vocab_size,
                         max_text_len=max_text_len)
    return reader, len(ids)


@torch.no_grad()
def token_nll(model: torch.nn.Module, url: str, resolution: int, plans: list[Recipe], cond_fn: CondFn,
              batch_size: int = 16, max_samples: int | None = 256, seed: int = 0, cond: str = "text_encoder",
              progress: bool = True) -> list[NLLResult]:
    """Mean per-token NLL of held-out shards under each plan (one forward per batch per plan)."""
    model.eval()
    device = next(model.parameters()).device
    reader, n = eval_batches(url, resolution, batch_size, max_samples, seed, cond,
                             vocab_size=model.config.vocab_size, max_text_len=model.config.max_text_len)
    totals = {p: [0.0, 0] for p in plans}
    gen_seed = seed
    for i in tqdm(range(len(reader)), desc=f"NLL @ {resolution}px", unit="batch", disable=not progress):
        batch = reader[i]
        tokens_BN = batch["tokens"].to(device)
        c = cond_fn(batch).to(device)
        b = tokens_BN.shape[0]
        for p in plans:
            gen_seed += 1
            plan = p.build(batch["grid"], b, seed=gen_seed).to(device)
            logits_BNV = model(tokens_BN, c, plan)
            loss = set_ar_loss(logits_BNV, tokens_BN)
            totals[p][0] += float(loss) * tokens_BN.numel()
            totals[p][1] += tokens_BN.numel()
    out = []
    for p, (s, t) in totals.items():
        nll = s / t
        out.append(NLLResult(p.name(_typical_grid(reader)), round(nll, 5), round(nll / math.log(2), 5),
                             round(math.exp(nll), 3), t, n))
        logger.info("NLL %s: %.4f nats/token (%.3f bits) over %d tokens", out[-1].plan, nll, nll / math.log(2), t)
    return out


def _typical_grid(reader: BatchReader) -> tuple[int, int]:
    grids, counts = np.unique(reader.table.grid, axis=0, return_counts=True)
    h, w = grids[int(np.argmax(counts))]
    return int(h), int(w)


def format_nll_table(results: list[NLLResult], resolution: int) -> str:
    w = max([len(r.plan) for r in results] + [4])
    lines = [f"token NLL on held-out shards @ {resolution}px ({results[0].samples} samples, "
             f"{results[0].tokens} tokens per plan)",
             f"{'plan'.ljust(w)}  {'nats/tok':>9}  {'bits/tok':>9}  {'ppl':>9}"]
    lines += [f"{r.plan.ljust(w)}  {r.nll:>9.4f}  {r.bits_per_token:>9.4f}  {r.perplexity:>9.2f}" for r in results]
    return "\n".join(lines)
