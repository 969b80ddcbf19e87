"""The reverse-text task, made in code: a text and its reversal.

``<bos> text <sep> reversed(text) <eos>``, the shape used to warm up tiny MoE models before RL.
The texts are a few pronounceable made-up words (syllables from a fixed alphabet), so the task
needs no download and every process builds the same examples from a seed. The loss covers the
reversal and ``<eos>`` only (SFT-style prompt masking).

Batches are right-padded with ``<pad>`` and carry an attention mask; ``labels`` hold -100 where
no loss is taken (prompt, padding, the last position), already shifted: ``labels[b, t]`` is the
token position t must predict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
IGNORE = -100
MAX_WORDS = 4


def make_word(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 3)))


def make_text(rng: random.Random) -> str:
    return " ".join(make_word(rng) for _ in range(rng.randint(2, MAX_WORDS)))


def reverse(text: str) -> str:
    return text[::-1]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng) for _ in range(n)]


def corpus(n: int = 4000, seed: int = 1234) -> list[str]:
    """What the tokenizer is trained on: texts and their reversals."""
    out = []
    for t in texts(n, seed):
        out += [t, reverse(t)]
    return out


@dataclass(frozen=True)
class TrainBatch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], 1 = real token
    labels: torch.Tensor  # [B, S], the next token at each position, IGNORE where no loss

    @property
    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    def to(self, device) -> TrainBatch:
        return TrainBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_example(tok, text: str) -> tuple[list[int], int]:
    """Token ids of one example and the index of its ``<sep>`` token."""
    ids = tok.token_to_id
    prompt = [ids("<bos>"), *tok.encode(text).ids, ids("<sep>")]
    answer = [*tok.encode(reverse(text)).ids, ids("<eos>")]
    return prompt + answer, len(prompt) - 1


def collate(tok, batch_texts: list[str], max_len: int = 64) -> TrainBatch:
    rows = [encode_example(tok, t) for t in batch_texts]
    S = max(len(ids) for ids, _ in rows)
    if S > max_len:
        raise ValueError(f"an example has {S} tokens, more than max_len {max_len}")
    pad = tok.token_to_id("<pad>")
    B = len(rows)
    input_ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    for b, (ids, sep) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        mask[b, :n] = 1
        # position t predicts ids[t + 1]; loss from <sep> on (it predicts the first answer token)
        labels[b, sep : n - 1] = torch.tensor(ids[sep + 1 : n])
    return TrainBatch(input_ids, mask, labels)


def batches(tok, steps: int, batch_size: int, seed: int) -> list[TrainBatch]:
    """``steps`` batches of ``batch_size`` fresh examples each, the same in every process."""
    all_texts = texts(steps * batch_size, seed)
    return [collate(tok, all_texts[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def lm_batch(tok, batch_size: int, seed: int) -> TrainBatch:
    """A reverse-text batch with a next-token label at every real position but the last of each
    row (plain language modelling): every routed real token then influences the loss."""
    b = collate(tok, texts(batch_size, seed))
    labels = torch.full_like(b.labels, IGNORE)
    labels[:, :-1] = torch.where(b.attention_mask[:, 1:].bool(), b.input_ids[:, 1:], IGNORE)
    return TrainBatch(b.input_ids, b.attention_mask, labels)
