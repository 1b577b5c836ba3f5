"""Few-step SAR sampling with a KV cache, classifier-free guidance, and editing.

Per step k: the decoder predicts set k from the cache (condition + sets < k), tokens are drawn,
and - if more sets follow - the encoder appends set k's K/V to the cache. Without the cache
(MAR-style) every step re-encodes everything known. CFG doubles the batch ([cond; uncond]).
Editing: known tokens form a first, given set that is encoded once and never predicted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sar_scale.sar.condition import Condition
from sar_scale.sar.plan import SetPlan


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering on the last dim (masked entries become -inf)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_l, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_l.softmax(-1)
        # drop a token when the mass *before* it already exceeds top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_l)
    return logits


def sample_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature <= 0:
        return logits_BTV.argmax(-1)
    probs = filter_logits(logits_BTV.float() / temperature, top_k, top_p).softmax(-1)
    flat = torch.multinomial(probs.flatten(0, -2), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def cfg_scale_at(cfg_scale: float, schedule: str, known: int, total: int) -> float:
    """Guidance for the next set: constant, or MAR's linear ramp 1 + (s-1) * known/total."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * known / total
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


@torch.no_grad()
def sample(model, cond: Condition, plan: SetPlan, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, kv_cache: bool = True,
           generator: torch.Generator | None = None, known_tokens: torch.Tensor | None = None,
           known_mask: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """Generate token grids ``[B, N]`` (raster order) following ``plan``.

    ``known_tokens``/``known_mask`` (``[B, N]`` / ``[B, N]`` or ``[N]`` bool) keep given tokens
    (inpainting / outpainting); every sample must know the same number of tokens.
    ``progress``: optional callable(step, num_steps) for progress bars.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    b = cond.batch_size
    cond = cond.to(device)
    plan = plan.expand(b).to(device)
    n_known = 0
    if known_mask is not None:
        if known_tokens is None:
            raise ValueError("known_mask needs known_tokens")
        plan, n_known = plan.with_known(known_mask.to(device))
    order = plan.order
    pos = plan.positions(device)
    set_ids = plan.set_ids(device)
    use_cfg = cfg_scale != 1.0
    full_cond = cond.cat(cond.null_like()) if use_cfg else cond
    dup = (lambda t: torch.cat([t, t])) if use_cfg else (lambda t: t)  # noqa: E731
    n = plan.num_tokens
    seq = torch.zeros(b, n, dtype=torch.long, device=device)
    sizes = list(plan.set_sizes)
    start = 0
    if n_known:
        seq[:, :n_known] = torch.gather(known_tokens.to(device).long().expand(b, n), 1, order[:, :n_known])
        sizes = sizes[1:]
        start = n_known
    cache = model.init_cache(full_cond, plan.grid) if kv_cache else None
    if kv_cache and n_known:
        model.extend_cache(cache, dup(seq[:, :n_known]), dup(pos[:, :n_known]))
    for step, size in enumerate(sizes):
        sl = slice(start, start + size)
        if kv_cache:
            logits = model.decode_next(cache, dup(pos[:, sl]))
        else:
            logits = model.forward_seq(full_cond, dup(seq[:, :start]), dup(pos[:, :start]), set_ids[:start],
                                       dup(pos[:, sl]), set_ids[sl], plan.grid)
        logits = logits.float()
        if use_cfg:
            cond_l, uncond_l = logits.chunk(2)
            s = cfg_scale_at(cfg_scale, cfg_schedule, start, n)
            logits = uncond_l + s * (cond_l - uncond_l)
        seq[:, sl] = sample_from_logits(logits, temperature, top_k, top_p, generator)
        if kv_cache and step < len(sizes) - 1:
            model.extend_cache(cache, dup(seq[:, sl]), dup(pos[:, sl]))
        start += size
        if progress is not None:
            progress(step + 1, len(sizes))
    model.train(was_training)
    return torch.empty_like(seq).scatter_(1, order, seq)


def set_ar_loss(logits_BNV: torch.Tensor, tokens_BN: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position (the first set is predicted from the condition)."""
    return F.cross_entropy(logits_BNV.float().flatten(0, 1), tokens_BN.flatten())
