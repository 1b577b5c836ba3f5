"""EMA of model weights that works under every ZeRO stage.

Each rank averages the weights it holds: full tensors under ZeRO 0-2, its flat partition
(``param.ds_tensor``) under ZeRO-3, so EMA memory scales like the model's. Checkpoints store one
full-shape ``ema.safetensors`` (gathered on rank 0), which also makes EMA independent of the world
size on resume and directly loadable by an exporter.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [self._local(p).detach().float().clone() for _, p in self.named]

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if _is_zero3(p) else p.data

    @torch.no_grad()
    def update(self) -> None:
        cur = [self._local(p).float() for _, p in self.named]
        torch._foreach_lerp_(self.shadow, cur, 1.0 - self.decay)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full-shape fp32 EMA weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        out: dict[str, torch.Tensor] = {}
        for (name, p), sh in zip(self.named, self.shadow):
            if _is_zero3(p):
                world = dist.get_world_size()
                parts = [torch.empty_like(sh) for _ in range(world)]
                dist.all_gather(parts, sh)
                if rank == 0:
                    out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu().clone()
            elif rank == 0:
                out[name] = sh.cpu().clone()
        return out if rank == 0 else None

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`full_state_dict` on every rank (slices this rank's ZeRO-3 partition)."""
        import torch.distributed as dist

        missing = [n for n, _ in self.named if n not in sd]
        if missing:
            raise KeyError(f"EMA state is missing parameters: {missing[:5]}")
        for i, (name, p) in enumerate(self.named):
            full = sd[name].float()
            if _is_zero3(p):
                part = self.shadow[i].numel()
                r = dist.get_rank()
                flat = torch.zeros(part * dist.get_world_size(), dtype=torch.float32)
                flat[: full.numel()] = full.flatten()
                self.shadow[i].copy_(flat[r * part:(r + 1) * part].view_as(self.shadow[i]))
            else:
                if full.shape != self.shadow[i].shape:
                    raise ValueError(f"EMA {name}: shape {tuple(full.shape)} != {tuple(self.shadow[i].shape)}")
                self.shadow[i].copy_(full)
