"""The reverse-text task and the committed tokenizer."""

from __future__ import annotations

import json

import torch

from moe_conformance import data, tokenizer, training


def test_committed_tokenizer_is_what_the_script_builds(tmp_path):
    tokenizer.save(tmp_path)
    for name in tokenizer.FILES:
        built = json.loads((tmp_path / name).read_text())
        committed = json.loads((tokenizer.tokenizer_dir() / name).read_text())
        assert built == committed, f"fixtures/tokenizer/{name} is stale: run `python -m moe_conformance.tokenizer`"


def test_tokenizer_fits_the_tiny_vocab_and_roundtrips():
    tok = tokenizer.load()
    assert tok.get_vocab_size() <= 256
    assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == list(range(len(tokenizer.SPECIAL_TOKENS)))
    for text in data.texts(200, seed=7):
        for s in (text, data.reverse(text)):
            ids = tok.encode(s).ids
            assert tok.token_to_id("<unk>") not in ids
            assert tok.decode(ids) == s


def test_transformers_loads_the_tokenizer_folder():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.tokenizer_dir())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = data.texts(1, seed=3)[0]
    assert tok.decode(tok(text).input_ids) == text


def test_batches_are_deterministic_and_mask_the_prompt():
    tok = tokenizer.load()
    a, b = data.batches(tok, 3, 4, seed=11), data.batches(tok, 3, 4, seed=11)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    batch = a[0]
    sep, eos = tok.token_to_id("<sep>"), tok.token_to_id("<eos>")
    for row in range(batch.input_ids.shape[0]):
        ids, labels, mask = batch.input_ids[row], batch.labels[row], batch.attention_mask[row]
        n = int(mask.sum())
        s = int((ids == sep).nonzero()[0, 0])
        assert (labels[:s] == data.IGNORE).all() and (labels[n - 1:] == data.IGNORE).all()
        assert torch.equal(labels[s:n - 1], ids[s + 1:n]) and int(ids[n - 1]) == eos
        prompt = tok.decode(ids[1:s].tolist())
        answer = tok.decode(ids[s + 1:n - 1].tolist())
        assert answer == data.reverse(prompt)


def test_lr_schedule_shape():
    cfg = training.TrainConfig(steps=20, warmup=4, lr=1e-3, min_lr_ratio=0.1)
    lrs = [training.lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert abs(lrs[-1] - 1e-4) < 1e-12


def test_aux_loss_matches_transformers_and_balanced_value():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, 8, generator=gen) for _ in range(3))
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1, 2:] = 0
    # transformers' reference takes the same rows per layer; its mask is [B, S] with B*S rows
    ours = training.aux_loss(logits, 2, mask)
    theirs = load_balancing_loss_func(logits, 8, 2, mask)
    assert torch.allclose(ours, theirs, rtol=1e-6)
    uniform = tuple(torch.zeros(16, 8) for _ in range(2))
    assert abs(float(training.aux_loss(uniform, 2)) - 2.0) < 0.6  # near top_k when balanced


def test_bias_update_moves_toward_mean():
    bias = torch.zeros(4)
    training.bias_update(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.1)
    assert torch.equal(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
