"""The condition a SAR model generates from: a class id or a sequence of text features.

The condition is the context of the first set. Dropping it (for classifier-free guidance) means:
class id -1 (the model's null class), or all text tokens masked out (the model always keeps one
learned "start" condition token, so an empty text is still a valid, unconditional context).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

TextEncodeFn = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> ([B, L, D], [B, L])


@dataclass
class Condition:
    class_ids: torch.Tensor | None = None  # [B] long, -1 = null
    text: torch.Tensor | None = None  # [B, L, D]
    text_mask: torch.Tensor | None = None  # [B, L] bool, True = valid token

    def __post_init__(self) -> None:
        if (self.class_ids is None) == (self.text is None):
            raise ValueError("Condition needs exactly one of class_ids or text")
        if self.text is not None:
            if self.text.dim() != 3:
                raise ValueError(f"text features must be [B, L, D], got {tuple(self.text.shape)}")
            if self.text_mask is None:
                self.text_mask = torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)
            if self.text_mask.shape != self.text.shape[:2]:
                raise ValueError("text_mask must be [B, L] matching text")
            self.text_mask = self.text_mask.to(torch.bool)

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], *, text_encoder: TextEncodeFn | None = None,
                   max_text_len: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Condition:
        """The condition of a batch, however it arrives: ``class_ids``, precomputed ``text`` features
        (+ ``text_mask``), or ``captions`` run through ``text_encoder``. Text is cut to the model's
        ``max_text_len`` (as training saw it) and moved to ``device``/``dtype``; the one constructor
        used by training, evaluation and the generation pipeline."""
        if batch.get("class_ids") is not None:
            ids = batch["class_ids"]
            ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, dtype=torch.long)
            return cls(class_ids=ids.to(device) if device is not None else ids)
        if batch.get("text") is not None:
            text_BLD, mask_BL = batch["text"], batch.get("text_mask")
        elif batch.get("captions") is not None:
            if text_encoder is None:
                raise ValueError("this batch has captions but no text encoder was given to encode them")
            with torch.no_grad():
                text_BLD, mask_BL = text_encoder(list(batch["captions"]))
        else:
            raise ValueError(f"a batch needs class_ids, text or captions for its condition; keys: {sorted(batch)}")
        if max_text_len is not None:
            text_BLD = text_BLD[:, :max_text_len]
            mask_BL = mask_BL[:, :max_text_len] if mask_BL is not None else None
        text_BLD = text_BLD.to(device if device is not None else text_BLD.device, dtype or text_BLD.dtype)
        if mask_BL is not None:
            mask_BL = mask_BL.to(text_BLD.device)
        return cls(text=text_BLD, text_mask=mask_BL)

    @property
    def batch_size(self) -> int:
        return (self.class_ids if self.class_ids is not None else self.text).shape[0]

    @property
    def device(self) -> torch.device:
        return (self.class_ids if self.class_ids is not None else self.text).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        if self.class_ids is not None:
            return Condition(class_ids=self.class_ids.to(device))
        return Condition(text=self.text.to(device, dtype=dtype or self.text.dtype),
                         text_mask=self.text_mask.to(device))

    def padded(self, length: int) -> Condition:
        """Text padded with masked-out zero tokens to ``length`` (class conditions are returned as is)."""
        if self.text is None or self.text.shape[1] >= length:
            return self
        b, n, d = self.text.shape
        text = torch.cat([self.text, self.text.new_zeros(b, length - n, d)], dim=1)
        mask = torch.cat([self.text_mask, self.text_mask.new_zeros(b, length - n)], dim=1)
        return Condition(text=text, text_mask=mask)

    def _apply_keep(self, keep_B: torch.Tensor) -> Condition:
        if self.class_ids is not None:
            return Condition(class_ids=torch.where(keep_B, self.class_ids, torch.full_like(self.class_ids, -1)))
        return Condition(text=self.text, text_mask=self.text_mask & keep_B.unsqueeze(1))

    def dropped(self, p: float, generator: torch.Generator | None = None) -> Condition:
        """Null each sample's condition with probability ``p`` (CFG training)."""
        if p <= 0:
            return self
        keep = torch.rand(self.batch_size, generator=generator) >= p
        return self._apply_keep(keep.to(self.device))

    def null_like(self) -> Condition:
        return self._apply_keep(torch.zeros(self.batch_size, dtype=torch.bool, device=self.device))

    def cat(self, other: Condition) -> Condition:
        """Concatenate along the batch (CFG doubles the batch: [cond; uncond])."""
        if self.class_ids is not None:
            return Condition(class_ids=torch.cat([self.class_ids, other.class_ids]))
        return Condition(text=torch.cat([self.text, other.text]),
                         text_mask=torch.cat([self.text_mask, other.text_mask]))
