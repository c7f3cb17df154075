"""Byte-level BPE tokenizers in Hugging Face format (`tokenizer.json` + `tokenizer_config.json`).

A trained tokenizer loads with `transformers.AutoTokenizer.from_pretrained(dir)` and
`PreTrainedTokenizerFast(tokenizer_file=...)`; inside lmaas the `tokenizers` library is used
directly, because it is light enough to load in every Ray task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmaas.errors import InvalidInputError, NotFoundError

EOS = "<|endoftext|>"
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer as bytes that travel to every task: its JSON text, EOS id and hash."""

    json: str
    eos_id: int
    eos_token: str
    vocab_size: int
    chat_template: str | None = None
    """The Jinja chat template of a pretrained tokenizer's `tokenizer_config.json` (chat datasets render with it)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (HF format) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.json)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.eos_token,
            "unk_token": self.eos_token,
            "pad_token": self.eos_token,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        return directory


def train_bpe(texts: Iterable[str], vocab_size: int) -> TokenizerSpec:
    """Train a byte-level BPE tokenizer (GPT-2 style) with `EOS` as its only special token.

    Deterministic: the same texts in the same order give byte-identical `tokenizer.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TokenizerSpec(tok.to_str(), tok.token_to_id(EOS), EOS, tok.get_vocab_size())


def load_pretrained(directory: str | Path) -> TokenizerSpec:
    """An existing HF tokenizer directory (`tokenizer.json`, optional `tokenizer_config.json`).

    Raises:
        NotFoundError: no `tokenizer.json` in `directory`.
        InvalidInputError: the tokenizer has no end-of-sequence token lmaas recognizes.
    """
    from tokenizers import Tokenizer

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise NotFoundError(f"tokenizer {directory}: no tokenizer.json there (a Hugging Face tokenizer directory)")
    text = path.read_text()
    tok = Tokenizer.from_str(text)
    candidates = list(_EOS_CANDIDATES)
    config = directory / "tokenizer_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    eos = settings.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos:
        candidates.insert(0, eos)
    template = settings.get("chat_template")
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return TokenizerSpec(text, token_id, token, tok.get_vocab_size(), template if isinstance(template, str) else None)
    raise InvalidInputError(
        f"tokenizer {directory}: no end-of-sequence token (tried {', '.join(candidates)}); set eos_token in tokenizer_config.json",
        param="tokenizer",
    )


def hf_tokenizer(spec_json: str, eos_token: str, chat_template: str | None = None):  # noqa: ANN201 - PreTrainedTokenizerFast
    """A transformers tokenizer over a spec's JSON (what `apply_chat_template` needs), built where it runs: no files."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec_json), eos_token=eos_token, pad_token=eos_token,
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)


@lru_cache(maxsize=4)
def _compiled(json_text: str):  # noqa: ANN202 - tokenizers.Tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json_text)


def encode_batch(spec_json: str, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added); the compiled tokenizer is cached per process."""
    return [e.ids for e in _compiled(spec_json).encode_batch(texts, add_special_tokens=False)]
