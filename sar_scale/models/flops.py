"""Model FLOPs of one training sample: the single count behind the trainer's logged MFU and the step
times of `sar-scale plan` (kept beside the model, like torchtitan's ``get_nparams_and_flops``).

FLOPs are *model* FLOPs (the MFU convention: activation recomputation is not counted): 2 x (linear
weights x the tokens each one acts on) per forward, plus attention scores (QK^T and AV, 4 x d per
query-key pair). The encoder's set-causal self-attention and the decoder's cross-attention to earlier
sets count half of their dense cost (like causal attention); decoder self-attention is within one set
only and is left out (it is n x set size, small next to the rest for any plan but MAR's last steps).
Training = 3 x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from sar_scale.models.config import FMTConfig


@dataclass(frozen=True)
class ModelShape:
    """Linear-weight counts grouped by which sequence they act on (from the meta-device model)."""

    params: int
    width: int
    enc_layers: int
    dec_layers: int
    vocab: int
    cond_tokens: int  # longest condition context: text tokens + start token, or 1 class token
    enc_linear: int  # encoder blocks: act on condition + encoded image tokens
    dec_linear: int  # decoder blocks except cross-attention K/V: act on the target tokens
    cross_kv_linear: int  # decoder cross-attention K/V projections: act on the encoder memory
    head: int
    pos_proj: int  # absolute (+ fractional) position projections: act on image tokens and targets
    text_proj: int


def model_shape(config: str | dict | FMTConfig, **overrides) -> ModelShape:
    """Build the model on the meta device (no memory, any size) and count linear weights by role."""
    from torch import nn

    from sar_scale.models import build_model

    m = build_model(config, device="meta", **overrides)
    c = m.config

    def lin(mod: nn.Module, skip: str | None = None) -> int:
        return sum(x.weight.numel() for name, x in mod.named_modules()
                   if isinstance(x, nn.Linear) and not (skip and name.endswith(skip)))

    return ModelShape(
        params=m.num_parameters(), width=c.width, enc_layers=c.enc_layers, dec_layers=c.dec_layers,
        vocab=c.vocab_size, cond_tokens=(c.max_text_len + 1) if c.cond == "text" else 1,
        enc_linear=sum(lin(b) for b in m.encoder), dec_linear=sum(lin(b, "cross_attn.wkv") for b in m.decoder),
        cross_kv_linear=sum(blk.cross_attn.wkv.weight.numel() for blk in m.decoder), head=m.head.weight.numel(),
        pos_proj=m.pos_proj.weight.numel() + (m.frac_proj.weight.numel() if m.frac_proj is not None else 0),
        text_proj=m.text_proj.weight.numel() if c.cond == "text" else 0)


def train_flops_per_sample(s: ModelShape, n: int, cond_tokens: int | None = None) -> float:
    """Model FLOPs (forward + backward = 3 x forward) for one image of ``n`` tokens whose condition
    context is ``cond_tokens`` long (default: the longest, ``s.cond_tokens``)."""
    c = s.cond_tokens if cond_tokens is None else cond_tokens
    enc_seq = c + n  # condition + the encoded image tokens (all n: the encoder sees the last set too)
    fwd = 2.0 * (s.enc_linear * enc_seq + s.dec_linear * n + s.cross_kv_linear * enc_seq
                 + s.head * n + s.pos_proj * 2 * n + s.text_proj * max(0, c - 1))
    fwd += 0.5 * 4.0 * s.width * enc_seq * enc_seq * s.enc_layers  # set-causal self-attention
    fwd += 0.5 * 4.0 * s.width * n * enc_seq * s.dec_layers  # cross-attention to earlier sets
    return 3.0 * fwd


__all__ = ["ModelShape", "model_shape", "train_flops_per_sample"]
