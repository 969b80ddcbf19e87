"""The native candidate's KV cache: decoding token by token gives the logits of one full
forward, for every built-in attention kind (GQA with sinks and windows, MLA), with left padding."""

import pytest
import torch

from moe_conformance.case import ArchCase
from moe_conformance.native import KVCache
from moe_conformance.registry import discover


@pytest.mark.parametrize("arch", ["kimi_k25", "gpt_oss", "qwen2_moe"])
def test_incremental_decoding_matches_full_forward(arch):
    known, _ = discover()
    case = ArchCase(known[arch].load(), "faithful")
    model = case.candidate()
    batch = case.batches["left_padded"]
    mask, positions = batch.attention_mask, batch.position_ids
    with torch.no_grad():
        full = model(**batch.kwargs).logits
        cache, steps, prefill = KVCache(), [], 9
        out = model(batch.input_ids[:, :prefill], attention_mask=mask[:, :prefill],
                    position_ids=positions[:, :prefill], cache=cache)
        steps.append(out.logits)
        for t in range(prefill, batch.input_ids.shape[1]):
            out = model(batch.input_ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                        position_ids=positions[:, t:t + 1], cache=cache)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    valid = batch.valid
    delta = (incremental - full).abs()[valid].max()
    assert cache.length == batch.input_ids.shape[1]
    assert delta < 1e-4, f"{arch}: cached decoding differs from the full forward by {float(delta):.3g}"
