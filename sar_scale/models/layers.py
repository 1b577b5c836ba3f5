"""Building blocks of the Fully Masked Transformer: 2D RoPE, attention, SwiGLU.

Shape legend: B batch, T query tokens, S key tokens, H heads, E head dim, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sar_scale.models.config import FMTConfig


class Rope2D:
    """2D rotary embedding: half of each head's dims rotate with the row, half with the column.

    Works for any grid. Past the training grid, ``linear`` interpolates positions back into the
    trained range and ``ntk`` enlarges the base so low frequencies stretch (Lumina-Next / RandAR).
    Condition tokens use position (0, 0), i.e. no rotation (as LlamaGen does).
    """

    def __init__(self, cfg: FMTConfig):
        self.head_dim = cfg.head_dim
        self.base = cfg.rope_base
        self.scaling = cfg.rope_scaling
        self.train_grid = cfg.rope_train_grid

    def cos_sin(self, pos_BT2: torch.Tensor, grid: tuple[int, int] | None, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_ax = self.head_dim // 4  # frequencies per axis
        base = self.base
        pos = pos_BT2.float()
        if grid is not None and self.train_grid is not None and self.scaling != "none":
            scale = torch.tensor([max(1.0, grid[0] / self.train_grid[0]), max(1.0, grid[1] / self.train_grid[1])],
                                 device=pos.device)
            if self.scaling == "linear":
                pos = pos / scale
            elif float(scale.max()) > 1.0:  # ntk
                base = base * float(scale.max()) ** (2 * n_ax / max(2 * n_ax - 2, 1))
        freqs = base ** (-torch.arange(n_ax, device=pos.device, dtype=torch.float32) / n_ax)
        ang = torch.cat([pos[..., :1] * freqs, pos[..., 1:] * freqs], dim=-1)  # [B, T, E/2]
        cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)  # [B, 1, T, E/2]
        # laid out for apply_rope's pairs (x0, x1): cos per element, sin signed -s for x0 and +s for x1
        cos2 = cos.repeat_interleave(2, dim=-1)
        sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)
        return cos2.to(dtype), sin2.to(dtype)  # [B, 1, T, E]


def sincos_2d(pos_BT2: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine features of (row, col): ``[B, T, dim]`` (MAE-style, any grid).

    RoPE alone is relative: a decoder query made of the shared mask token, attending to a single
    condition token, would not know where it is. These absolute features (through a learned
    projection) tell every target its position.
    """
    n = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(n, device=pos_BT2.device, dtype=torch.float32) / n))
    y = pos_BT2[..., :1].float() * omega
    x = pos_BT2[..., 1:].float() * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


FRAC_POS_SCALE = 32.0  # fractions in [0, 1] spread over sincos_2d's frequencies as if on a 32-wide grid


def frac_positions(pos_BT2: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(row, col) as cell-centre fractions of the grid, ((r + 0.5) / H, (c + 0.5) / W), times FRAC_POS_SCALE.

    The same place in the picture gets the same value in a 4x4, 8x8 or 6x10 grid, which absolute
    positions cannot give a multi-aspect, multi-resolution model (NaViT's fractional positions).
    """
    size = torch.tensor([float(grid[0]), float(grid[1])], device=pos_BT2.device)
    return (pos_BT2.float() + 0.5) / size * FRAC_POS_SCALE


def write_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, start: int | torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a set's K/V ``[B, H, T, E]`` into preallocated cache buffers at ``start``; return the
    buffers' filled part, keys [0, start + T). With ``start`` an index tensor ``[T]`` (static cache)
    the K/V go to those slots and the whole buffers are returned (shapes independent of the step)."""
    if isinstance(start, torch.Tensor):
        k_buf.index_copy_(2, start, k)
        v_buf.index_copy_(2, start, v)
        return k_buf, v_buf
    end = start + k.shape[2]
    k_buf[:, :, start:end], v_buf[:, :, start:end] = k, v
    return k_buf[:, :, :end], v_buf[:, :, :end]


def apply_rope(x_BHTE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x0, x1) of the head dim: (x0 c - x1 s, x1 c + x0 s), with ``cos``/``sin`` from
    :meth:`Rope2D.cos_sin` (``[c, c]`` and ``[-s, s]`` per pair). Written as x * cos + swap(x) * sin,
    elementwise, with no stack: inductor's CPU flex-attention template cannot take a stacked view
    as its query (a lowering error), and the products and sums are the same as the stacked form's."""
    swapped = x_BHTE.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return x_BHTE * cos + swapped * sin


_FLEX = None


def _flex_attention():
    """flex_attention: traced as is inside a compiled block (the block's graph fuses it, on CPU too);
    called from eager code, compiled on CUDA (fused kernels that skip fully-masked blocks) and eager
    elsewhere (forward only: eager flex has no backward on CPU, see training.config)."""
    global _FLEX
    if torch.compiler.is_compiling():
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX


BLOCK_RECOMPILE_LIMIT = 64


def allow_block_recompiles(limit: int = BLOCK_RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit for the compiled blocks.

    Every encoder (decoder) block shares one code object, hence one cache of graphs, and each bucket
    grid, train/eval mode and KV-cache step kind adds an entry; past the default limit (8) dynamo
    silently falls back to eager for the rest of the run, the failure this project compiles to avoid."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)


class Attention(nn.Module):
    """Multi-head attention over an explicit key/value source (self or cross), via torch SDPA."""

    def __init__(self, cfg: FMTConfig):
        super().__init__()
        d = cfg.width
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wkv = nn.Linear(d, 2 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def _split(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, T, E]

    def project_kv(self, ctx_BSD: torch.Tensor, rope_k: tuple[torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.wkv(ctx_BSD).chunk(2, dim=-1)
        k = apply_rope(self.k_norm(self._split(k)), *rope_k)
        return k, self._split(v)

    def attend(self, x_BTD: torch.Tensor, k_BHSE: torch.Tensor, v_BHSE: torch.Tensor,
               rope_q: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
        q = apply_rope(self.q_norm(self._split(self.wq(x_BTD))), *rope_q)
        if isinstance(mask, BlockMask):
            if torch.compiler.is_compiling():  # inductor's CPU flex template takes plain buffers, not views
                q, k_BHSE, v_BHSE = q.contiguous(), k_BHSE.contiguous(), v_BHSE.contiguous()
            out = _flex_attention()(q, k_BHSE, v_BHSE, block_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k_BHSE, v_BHSE, attn_mask=mask)
        return self.wo(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, cfg: FMTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class EncoderBlock(nn.Module):
    """Pre-norm block with set-causal self-attention over known tokens."""

    def __init__(self, cfg: FMTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """With ``cache`` = (k_buf, v_buf, start), this block's K/V are written into the preallocated
        buffers at ``start`` and the queries see keys [0, start + T) (the KV cache)."""
        h = self.attn_norm(x)
        k, v = self.attn.project_kv(h, rope)
        if cache is not None:
            k, v = write_kv(cache[0], cache[1], cache[2], k, v)
        x = x + self.attn.attend(h, k, v, rope, mask)
        return x + self.ffn(self.ffn_norm(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: self-attention among the targets of a set, cross-attention to the encoder."""

    def __init__(self, cfg: FMTConfig):
        super().__init__()
        self.self_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], self_mask: torch.Tensor | None,
                cross_k: torch.Tensor, cross_v: torch.Tensor, cross_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.self_norm(x)
        k, v = self.self_attn.project_kv(h, rope)
        x = x + self.self_attn.attend(h, k, v, rope, self_mask)
        x = x + self.cross_attn.attend(self.cross_norm(x), cross_k, cross_v, rope, cross_mask)
        return x + self.ffn(self.ffn_norm(x))


def init_weights(module: nn.Module, std: float, num_layers: int) -> None:
    """Normal(0, std) for weights; output projections scaled by 1/sqrt(2*layers) (GPT-2 style)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        s = std / math.sqrt(2 * num_layers) if name.endswith(("wo.weight", "w2.weight")) else std
        nn.init.normal_(p, mean=0.0, std=s)
