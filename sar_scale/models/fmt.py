"""Fully Masked Transformer (FMT): the encoder-decoder of Set AutoRegressive modeling.

* Encoder: condition tokens + image tokens of sets 1..K-1 in generation order, under the
  set-causal mask m_e (a token of set k sees the condition and sets <= k).
* Decoder: one mask token per target position (it carries only that position, through 2D RoPE);
  targets of set k attend to each other (m_ds) and cross-attend to the condition and encoder
  outputs of sets < k (m_dc). The first set is predicted from the condition alone.

Everything runs in *sequence* space, where the masks depend only on set sizes (shared by the
batch); per-sample orders only change gathers and RoPE positions. Logits are scattered back to
raster order. Shape legend: B batch, N tokens, C condition tokens, M encoded image tokens,
T queries, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint

from sar_scale.models.config import FMTConfig
from sar_scale.models.layers import (
    DecoderBlock,
    EncoderBlock,
    Rope2D,
    frac_positions,
    init_weights,
    sincos_2d,
    write_kv,
)
from sar_scale.sar.condition import Condition
from sar_scale.sar.plan import SetPlan


@dataclass
class KVCache:
    """Per-layer encoder self-attention K/V and decoder cross-attention K/V of everything encoded.

    The buffers ``[B, H, capacity, E]`` are allocated once (zeroed) for the condition plus every image
    token and filled left to right; the first ``length`` keys are written. Appending a set writes its K/V in
    place, so a step costs that set's K/V rather than a copy of everything cached (what growing the
    cache with torch.cat cost: 5-9% of a sampling step at 256-1024 tokens), and the peak memory is the
    final cache, not twice it during a copy.

    ``static``: every step attends over the whole buffer (unwritten keys masked out) and writes by an
    index tensor, so the compiled blocks see the same key length and no Python int at every step (one
    graph for a whole sampling run, CUDA-graph friendly); otherwise steps attend to the filled part
    only (fewer FLOPs in eager mode). Both give the same logits up to float rounding.
    """

    enc: list[tuple[torch.Tensor, torch.Tensor]]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    valid_BS: torch.Tensor  # [B, capacity]: which cached keys are real (text padding is False)
    grid: tuple[int, int]
    length: int = 0
    static: bool = False

    @property
    def capacity(self) -> int:
        return self.valid_BS.shape[1]

    def keys_valid(self) -> torch.Tensor:
        return self.valid_BS[:, : self.length]


def _key_mask(valid_BS: torch.Tensor | None, structural: torch.Tensor | None) -> torch.Tensor | None:
    """Combine a structural [T, S] mask with key padding [B, S] into an SDPA bool mask.

    ``valid_BS`` is None when no key can be padding (class condition): decided from the config, not
    by reading the mask (``bool(valid.all())`` was a host sync per forward and made the mask's shape,
    and so the compiled graph, depend on the data)."""
    if valid_BS is None:
        return structural
    pad = valid_BS[:, None, None, :]
    return pad if structural is None else structural & pad


def _flex_masks(enc_set: torch.Tensor, valid_BS: torch.Tensor, dec_set: torch.Tensor):
    """The three masks as flex-attention BlockMasks (training path; blocks that are fully masked,
    e.g. the upper triangle of the set-causal mask, are skipped by the fused kernel)."""
    b, s = valid_BS.shape
    t = dec_set.shape[0]
    dev = valid_BS.device

    def enc_mod(bi, h, qi, ki):
        return (enc_set[ki] <= enc_set[qi]) & valid_BS[bi, ki]

    def self_mod(bi, h, qi, ki):
        return dec_set[ki] == dec_set[qi]

    def cross_mod(bi, h, qi, ki):
        return (enc_set[ki] < dec_set[qi]) & valid_BS[bi, ki]

    return (create_block_mask(enc_mod, b, None, s, s, device=dev),
            create_block_mask(self_mod, None, None, t, t, device=dev),
            create_block_mask(cross_mod, b, None, t, s, device=dev))


class FullyMaskedTransformer(nn.Module):
    def __init__(self, config: FMTConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.width
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.pos_proj = nn.Linear(4 * (d // 4), d, bias=False)  # absolute 2D position of image tokens/targets
        # Fractional position (where in the picture, whatever the bucket): only when configured, so older
        # checkpoints keep their exact state dict.
        self.frac_proj = nn.Linear(4 * (d // 4), d, bias=False) if cfg.frac_pos else None
        if cfg.cond == "class":
            self.class_emb = nn.Embedding(cfg.num_classes + 1, d)  # last row = null class
        else:
            self.text_norm = nn.RMSNorm(cfg.text_dim, eps=cfg.norm_eps)
            self.text_proj = nn.Linear(cfg.text_dim, d)
            self.cond_start = nn.Parameter(torch.zeros(d))  # always-valid context token
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.rope = Rope2D(cfg)
        self.activation_checkpointing = False
        self.compiled = False  # compile_blocks() was called
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config.init_std, self.config.enc_layers + self.config.dec_layers)
        nn.init.normal_(self.mask_token, std=self.config.init_std)
        if self.config.cond == "text":
            nn.init.normal_(self.cond_start, std=self.config.init_std)
            nn.init.zeros_(self.text_proj.bias)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (memory for compute)."""
        self.activation_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _pos_emb(self, pos_BT2: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        frac = frac_positions(pos_BT2, grid) if self.frac_proj is not None else None  # grid-free already
        if cfg.rope_scaling == "linear" and cfg.rope_train_grid is not None:
            scale = torch.tensor([max(1.0, grid[0] / cfg.rope_train_grid[0]),
                                  max(1.0, grid[1] / cfg.rope_train_grid[1])], device=pos_BT2.device)
            pos_BT2 = pos_BT2 / scale
        emb = self.pos_proj(sincos_2d(pos_BT2, cfg.width).to(dtype))
        if frac is not None:
            emb = emb + self.frac_proj(sincos_2d(frac, cfg.width).to(dtype))
        return emb

    def _targets(self, pos_BT2: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Decoder inputs: the shared mask token plus the target's absolute position."""
        return self.mask_token.to(dtype) + self._pos_emb(pos_BT2, grid, dtype)

    def _image_tokens(self, tokens_BS: torch.Tensor, pos_BS2: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.tok_emb(tokens_BS)
        return x + self._pos_emb(pos_BS2, grid, x.dtype)

    # ------------------------------------------------------------------ condition
    def embed_condition(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens ``[B, C, D]`` and their validity ``[B, C]``."""
        cfg = self.config
        dtype = self.tok_emb.weight.dtype
        if cfg.cond == "class":
            if cond.class_ids is None:
                raise ValueError("this model is class-conditional: pass Condition(class_ids=...)")
            ids = cond.class_ids.long()
            if bool(((ids < -1) | (ids >= cfg.num_classes)).any()):
                raise ValueError(f"class ids must be in [-1, {cfg.num_classes - 1}] (-1 = unconditional)")
            ids = torch.where(ids < 0, torch.full_like(ids, cfg.num_classes), ids)
            x = self.class_emb(ids).unsqueeze(1)
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if cond.text is None:
            raise ValueError("this model is text-conditional: pass Condition(text=..., text_mask=...)")
        if cond.text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text features have width {cond.text.shape[-1]}, the model expects {cfg.text_dim}")
        if cond.text.shape[1] > cfg.max_text_len:
            raise ValueError(f"text has {cond.text.shape[1]} tokens, max_text_len is {cfg.max_text_len}")
        # one condition length per model (padding is masked out): static shapes for the compiled blocks
        cond = cond.padded(cfg.max_text_len)
        t = self.text_proj(self.text_norm(cond.text.to(dtype)))
        start = self.cond_start.to(dtype).expand(t.shape[0], 1, -1)
        valid = torch.cat([torch.ones_like(cond.text_mask[:, :1]), cond.text_mask], dim=1)
        return torch.cat([start, t], dim=1), valid

    # ------------------------------------------------------------------ core
    def _padding(self, valid_BS: torch.Tensor) -> torch.Tensor | None:
        """Key validity for the masks, or None where no key can be padding (class condition)."""
        return valid_BS if self.config.cond == "text" else None

    def compile_blocks(self, fullgraph: bool = True, **compile_kw) -> FullyMaskedTransformer:
        """Compile each encoder/decoder block in place (``nn.Module.compile``, torchtitan's per-block
        scheme: parameter names and state dict keys stay as they are, all blocks of a kind share one
        graph). Shapes are static within a bucket (all N tokens are encoded, text is padded to
        ``max_text_len``; a static KV cache when sampling), so a bucket compiles once (a grid of a new
        token count compiles once more). Flex attention is compiled inside the blocks: fused kernels
        on CUDA, inductor's C++ kernels on the CPU (forward only: torch has no CPU flex backward)."""
        from sar_scale.models.layers import allow_block_recompiles

        allow_block_recompiles()
        for blk in (*self.encoder, *self.decoder):
            blk.compile(fullgraph=fullgraph, **compile_kw)
        self.compiled = True
        return self

    def _run(self, blk: nn.Module, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def forward_seq(self, cond: Condition, enc_tokens_BM: torch.Tensor, enc_pos_BM2: torch.Tensor,
                    enc_set_M: torch.Tensor, dec_pos_BT2: torch.Tensor, dec_set_T: torch.Tensor,
                    grid: tuple[int, int]) -> torch.Tensor:
        """Logits ``[B, T, V]`` for decoder targets, given encoded tokens, all in sequence order.

        Set ids index the sets; the condition is set -1. Used by training (all targets) and by the
        no-cache sampler (recompute over everything known, targets of the next set only).
        """
        c_BCD, c_valid_BC = self.embed_condition(cond)
        b, c = c_valid_BC.shape
        dev = c_BCD.device
        x = torch.cat([c_BCD, self._image_tokens(enc_tokens_BM, enc_pos_BM2.to(dev), grid)], dim=1)
        enc_pos = torch.cat([torch.zeros(b, c, 2, device=dev), enc_pos_BM2.to(dev).float()], dim=1)
        enc_set = torch.cat([torch.full((c,), -1, device=dev, dtype=torch.long), enc_set_M.to(dev)])
        valid = torch.cat([c_valid_BC, torch.ones(enc_tokens_BM.shape, dtype=torch.bool, device=dev)], dim=1)
        rope_e = self.rope.cos_sin(enc_pos, grid, x.dtype)
        dec_set_T = dec_set_T.to(dev)
        if self.config.attn_impl == "flex":
            enc_mask, self_mask, cross_mask = _flex_masks(enc_set, valid, dec_set_T)
        else:
            pad = self._padding(valid)
            enc_mask = _key_mask(pad, enc_set[None, :] <= enc_set[:, None])
            self_mask = dec_set_T[None, :] == dec_set_T[:, None]
            cross_mask = _key_mask(pad, enc_set[None, :] < dec_set_T[:, None])
        for blk in self.encoder:
            x = self._run(blk, x, rope_e, enc_mask)
        enc_out = self.enc_norm(x)

        rope_d = self.rope.cos_sin(dec_pos_BT2.to(dev), grid, x.dtype)
        y = self._targets(dec_pos_BT2.to(dev), grid, x.dtype)
        for blk in self.decoder:
            k, v = blk.cross_attn.project_kv(enc_out, rope_e)
            y = self._run(blk, y, rope_d, self_mask, k, v, cross_mask)
        return self.head(self.dec_norm(y))

    def forward(self, tokens_BN: torch.Tensor, cond: Condition, plan: SetPlan) -> torch.Tensor:
        """Logits ``[B, N, V]`` in raster order; position i is predicted only from sets before its set."""
        b, n = tokens_BN.shape
        if n != plan.num_tokens:
            raise ValueError(f"tokens have {n} positions but the plan's grid {plan.grid} has {plan.num_tokens}")
        plan = plan.expand(b).to(tokens_BN.device)
        order = plan.order
        seq = torch.gather(tokens_BN, 1, order)
        pos = plan.positions(tokens_BN.device)
        set_ids = plan.set_ids(tokens_BN.device)
        # All N tokens are encoded, the last set too although no target reads it (its set id is the
        # largest: the set-causal encoder mask keeps it out of every earlier token's keys and the cross
        # mask out of every target's). Its ~N/K extra tokens buy one encoder length per grid, whatever
        # the plan: one compiled graph (and one flex kernel) per bucket instead of one per last-set size.
        logits_seq = self.forward_seq(cond, seq, pos, set_ids, pos, set_ids, plan.grid)
        logits = torch.empty_like(logits_seq)
        return logits.scatter_(1, order.unsqueeze(-1).expand_as(logits_seq), logits_seq)

    # ------------------------------------------------------------------ incremental inference
    @torch.no_grad()
    def init_cache(self, cond: Condition, grid: tuple[int, int], static: bool | None = None) -> KVCache:
        """Allocate the cache for ``grid`` and encode the condition tokens (the context of the first set).

        ``static`` (default: whether the blocks are compiled): see :class:`KVCache`."""
        c_BCD, valid = self.embed_condition(cond)
        b, c, _ = c_BCD.shape
        cfg, dev = self.config, c_BCD.device
        # the dtype K/V will have: the weights', or autocast's when sampling runs under it
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.head.weight.dtype
        shape = (b, cfg.heads, c + grid[0] * grid[1], cfg.head_dim)

        def buffers(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            # zeroed: a static cache attends over unwritten keys (masked: weight 0, but 0 * NaN is NaN)
            return [(torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype))
                    for _ in range(n)]

        cache = KVCache(enc=buffers(cfg.enc_layers), cross=buffers(cfg.dec_layers),
                        valid_BS=torch.zeros(b, shape[2], dtype=torch.bool, device=dev), grid=grid,
                        static=self.compiled if static is None else static)
        self._extend(cache, c_BCD, torch.zeros(b, c, 2, device=dev), valid)
        return cache

    @torch.no_grad()
    def extend_cache(self, cache: KVCache, tokens_BS: torch.Tensor, pos_BS2: torch.Tensor) -> None:
        """Encode one new set (it sees everything cached and itself) and write its K/V into the cache."""
        valid = torch.ones(tokens_BS.shape, dtype=torch.bool, device=tokens_BS.device)
        self._extend(cache, self._image_tokens(tokens_BS, pos_BS2, cache.grid), pos_BS2, valid)

    def _extend(self, cache: KVCache, x: torch.Tensor, pos_BS2: torch.Tensor, valid_BS: torch.Tensor) -> None:
        start, end = cache.length, cache.length + x.shape[1]
        if end > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} keys (condition + {cache.grid} grid); "
                             f"{end} were asked for")
        rope = self.rope.cos_sin(pos_BS2, cache.grid, x.dtype)
        cache.valid_BS[:, start:end] = valid_BS
        if cache.static:  # whole buffer, unwritten keys masked; written at an index tensor
            where: int | torch.Tensor = torch.arange(start, end, device=x.device)
            mask = _key_mask(cache.valid_BS, None)
        else:
            where = start
            mask = _key_mask(self._padding(cache.valid_BS[:, :end]), None)
        for i, blk in enumerate(self.encoder):
            x = blk(x, rope, mask, (*cache.enc[i], where))
        enc_out = self.enc_norm(x)
        for j, blk in enumerate(self.decoder):
            write_kv(*cache.cross[j], where, *blk.cross_attn.project_kv(enc_out, rope))
        cache.length = end

    @torch.no_grad()
    def decode_next(self, cache: KVCache, pos_BT2: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for the targets of the next set (they see each other and the cache)."""
        dtype = self.tok_emb.weight.dtype
        rope = self.rope.cos_sin(pos_BT2, cache.grid, dtype)
        n = cache.capacity if cache.static else cache.length
        cross_mask = _key_mask(cache.valid_BS if cache.static else self._padding(cache.keys_valid()), None)
        y = self._targets(pos_BT2, cache.grid, dtype)
        for j, blk in enumerate(self.decoder):
            k, v = cache.cross[j]
            y = blk(y, rope, None, k[:, :, :n], v[:, :, :n], cross_mask)
        return self.head(self.dec_norm(y))
