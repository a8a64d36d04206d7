"""Caption tokenizer: a byte-level BPE (HuggingFace `tokenizers`) trained on the captions.

Nothing is ever downloaded: train on the run's captions, then save the tokenizer with the checkpoint.

    tok = Tokenizer.train(captions, vocab_size=4096, context_length=32)
    ids = tok.encode(["a red circle", "a blue square"])  # LongTensor [2, 32]
    tok2 = Tokenizer.from_json(tok.to_json())
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, SOT, EOT, MASK, UNK = "<pad>", "<sot>", "<eot>", "<mask>", "<unk>"
SPECIAL_TOKENS = (PAD, SOT, EOT, MASK, UNK)  # PAD first, so pad_id == 0
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


class Tokenizer:
    """`<sot> tokens <eot> <pad>...` encoding into a fixed context length."""

    def __init__(self, hf: HFTokenizer, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self._hf = hf
        self._context_length = context_length
        if hasattr(hf, "encode_special_tokens"):  # treat "<eot>" typed in a caption as plain text
            hf.encode_special_tokens = True
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self._pad_id, self._sot_id, self._eot_id, self._mask_id, self._unk_id = ids

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 4096, context_length: int = 77
    ) -> Tokenizer:
        """Train a byte-level BPE on `texts` (lowercased, whitespace-normalised)."""
        if vocab_size < _MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {_MIN_VOCAB}, got {vocab_size}")
        hf = HFTokenizer(models.BPE(unk_token=UNK))
        hf.normalizer = normalizers.Sequence(
            [
                normalizers.NFKC(),
                normalizers.Lowercase(),
                normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Strip(),
            ]
        )
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((str(t) for t in texts), trainer=trainer)
        return cls(hf, context_length)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def sot_id(self) -> int:
        return self._sot_id

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self._pad_id, self._sot_id, self._eot_id, self._mask_id, self._unk_id)

    def encode(self, texts: str | list[str]) -> torch.Tensor:
        """Encode to LongTensor [B, context_length]; long captions are cut before `<eot>`."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self._context_length), self._pad_id, dtype=torch.long)
        room = self._context_length - 2
        for row, enc in enumerate(self._hf.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self._sot_id, *enc.ids[:room], self._eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Decode one row of ids, dropping special tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(self.special_ids)
        return self._hf.decode([i for i in ids if i not in special]).strip()

    def to_json(self) -> str:
        return json.dumps(
            {"context_length": self._context_length, "tokenizer": json.loads(self._hf.to_str())}
        )

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        d = json.loads(s)
        hf = HFTokenizer.from_str(json.dumps(d["tokenizer"]))
        return cls(hf, int(d["context_length"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
