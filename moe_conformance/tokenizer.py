"""A small BPE tokenizer for the reverse-text task, built with the `tokenizers` library.

The tiny models have ``vocab_size`` 256, so the tokenizer has exactly 256 entries: 5 special
tokens, the task's characters (with ``▁`` marking a word start, sentencepiece style) and BPE
merges learned on texts and their reversals. It is committed as ``fixtures/tokenizer/``
(``tokenizer.json`` plus ``tokenizer_config.json`` and ``special_tokens_map.json``, so
``transformers.AutoTokenizer`` and vLLM load the folder as-is); the tiny checkpoints the suites
write carry a copy.

Regenerate (deterministic; the project's tests check the committed file matches):

    .venv/bin/python -m moe_conformance.tokenizer
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from .paths import fixtures_dir

VOCAB_SIZE = 256
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]  # ids 0..4
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_dir() -> Path:
    return fixtures_dir() / "tokenizer"


def build():
    """Train the tokenizer from ``data.corpus()`` (no download, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import ALPHABET, corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=sorted(set(ALPHABET.replace(" ", "")) | {"▁"}),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def configs() -> dict[str, dict]:
    special = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "sep_token": "<sep>", "unk_token": "<unk>"}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False, **special,
        },
        "special_tokens_map.json": special,
    }


def save(folder: Path, tok=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (tok or build()).save(str(folder / "tokenizer.json"), pretty=True)
    for name, content in configs().items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder


def copy_to(folder: Path) -> None:
    """Put the committed tokenizer files beside a checkpoint."""
    for name in FILES:
        shutil.copy(tokenizer_dir() / name, Path(folder) / name)


@lru_cache(maxsize=None)
def load():
    """The committed tokenizer (a ``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    path = tokenizer_dir() / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m moe_conformance.tokenizer` to build it")
    return Tokenizer.from_file(str(path))


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else tokenizer_dir()
    tok = build()
    save(folder, tok)
    print(f"wrote {folder} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main(sys.argv[1:])
