"""Token NLL on held-out shards: the likelihood view of a SAR model, per plan.

SAR factorises p(x) differently for every (order, K, intervals) recipe, so the same model has a
different likelihood under each plan; comparing them shows which recipes the model actually
learned (a model trained on random-order random-interval plans should be close across K, and AR
raster should be lowest when trained on it). The loss is exactly the training loss
(``set_ar_loss`` over the model's logits), averaged over every token of up to ``max_samples``
held-out samples, read through the training reader (whole shards, one ranged GET each).

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

from sar_scale.data.loader import DatasetIndex, Piece, PieceReader, collate
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


class EvalBatches:
    """Held-out batches, one aspect bucket each: ``batches[i]`` -> the training reader's batch dict.
    Reads each shard whole (one GET), keeping the last one in memory."""

    def __init__(self, reader: PieceReader, batches: list[list[tuple[int, int]]]):
        self.reader, self.batches = reader, batches
        self._held: tuple[Piece, Any] | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def _piece(self, shard: int) -> tuple[Piece, Any]:
        if self._held is None or self._held[0].shard != shard:
            piece = Piece(shard, 0, self.reader.shards[shard].samples)
            self._held = (piece, self.reader.fetch(piece))
        return self._held

    def __getitem__(self, i: int) -> dict[str, Any]:
        samples = []
        for shard, row in self.batches[i]:
            piece, got = self._piece(shard)
            samples.append(self.reader.decode(shard, row, got, piece))
        return collate(samples, self.reader.shards[self.batches[i][0][0]].grid, self.reader.cond)

    def typical_grid(self) -> tuple[int, int]:
        counts: dict[tuple[int, int], int] = {}
        for b in self.batches:
            g = self.reader.shards[b[0][0]].grid
            counts[g] = counts.get(g, 0) + len(b)
        return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def eval_batches(url: str, resolution: int, batch_size: int, max_samples: int | None, seed: int = 0,
                 cond: str = "text_encoder", vocab_size: int | None = None,
                 max_text_len: int | None = None) -> tuple[EvalBatches, int]:
    """Batches over held-out samples grouped by bucket (fixed, seeded subset when capped)."""
    index = DatasetIndex(url)
    refs = index.shards(resolution)
    ids = np.array([(i, r) for i, ref in enumerate(refs) for r in range(ref.samples)], np.int64).reshape(-1, 2)
    if max_samples is not None and max_samples < len(ids):
        pick = np.sort(np.random.default_rng(seed).choice(len(ids), max_samples, replace=False))
        ids = ids[pick]
    batches: list[list[tuple[int, int]]] = []
    for hw in sorted({ref.grid for ref in refs}):
        group = [(int(a), int(b)) for a, b in ids if refs[a].grid == hw]
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    reader = PieceReader(url, refs, resolution, cond, vocab_size=vocab_size, max_text_len=max_text_len,
                         storage=index.storage)
    return EvalBatches(reader, batches), len(ids)


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


def _typical_grid(reader: EvalBatches) -> tuple[int, int]:
    return reader.typical_grid()


def format_nll_table(results: list[NLLResult], resolution: int) -> str:
    w = max([len(r.plan) for r in results] + [4])
    lines = [f"token NLL on held-out shards @ {resolution}px ({results[0].samples} samples, "
             f"{results[0].tokens} tokens per plan)",
             f"{'plan'.ljust(w)}  {'nats/tok':>9}  {'bits/tok':>9}  {'ppl':>9}"]
    lines += [f"{r.plan.ljust(w)}  {r.nll:>9.4f}  {r.bits_per_token:>9.4f}  {r.perplexity:>9.2f}" for r in results]
    return "\n".join(lines)
