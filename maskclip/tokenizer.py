"""Caption tokenizer (HuggingFace `tokenizers`): a byte-level BPE trained on the captions, or
the standard CLIP BPE (49,408 tokens) built from the vocabulary file open_clip ships.

Nothing is ever downloaded; the tokenizer is saved with every checkpoint.

    tok = Tokenizer.train(captions, vocab_size=4096, context_length=32)
    tok = Tokenizer.clip(context_length=77)      # the same ids as open_clip's tokenizer
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_TO_UNICODE = _bytes_to_unicode()
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's word split (open_clip's SimpleTokenizer pattern)."""


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

    @classmethod
    def clip(cls, context_length: int = 77) -> Tokenizer:
        """OpenAI CLIP's BPE (lower-cased, `</w>` word ends), from open_clip's shipped
        `bpe_simple_vocab_16e6.txt.gz`: its 49,408 tokens keep CLIP's ids, so text towers of
        different runs share one vocabulary; this class's five special tokens follow them.
        (open_clip's extra `ftfy` text repair is not applied.)"""
        import gzip
        import importlib.util

        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "the CLIP tokenizer needs open_clip_torch (pip install open_clip_torch)"
            )
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_BYTE_TO_UNICODE.values())  # CLIP's order: printable bytes first
        vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
        vocab_list += ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
        vocab = {tok: i for i, tok in enumerate(vocab_list)}
        hf = HFTokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=None))
        hf.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # a word end becomes a byte-level space, then bytes become text (CLIP's own decode)
        space = _BYTE_TO_UNICODE[ord(" ")]
        hf.decoder = decoders.Sequence([decoders.Replace("</w>", space), decoders.ByteLevel()])
        hf.add_special_tokens(list(SPECIAL_TOKENS))
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
