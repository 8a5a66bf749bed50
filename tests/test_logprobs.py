"""rlhf_core.logprobs against naive per-token loops over a tiny random GPT-2, with right and left padding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_core.logprobs import (
    causal_lm_logits,
    entropy_from_logits,
    masked_token_logprobs,
    position_ids_from_attention_mask,
    selective_log_softmax,
    sequence_logprobs,
    token_logprobs,
)

VOCAB = 24
PAD = 0

# Three sequences: (prompt, completion) token ids, of different lengths.
EXAMPLES = [
    ([5, 6, 7], [8, 9, 10, 11]),
    ([12, 13], [14]),
    ([3, 4, 5, 6, 7], [20, 21]),
]


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def _batch(padding_side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask), each (B, T), padded on ``padding_side``."""
    width = max(len(p) + len(c) for p, c in EXAMPLES)
    ids, attn, comp = [], [], []
    for prompt, completion in EXAMPLES:
        pad = width - len(prompt) - len(completion)
        row_ids = prompt + completion
        row_comp = [0] * len(prompt) + [1] * len(completion)
        if padding_side == "right":
            ids.append(row_ids + [PAD] * pad)
            attn.append([1] * len(row_ids) + [0] * pad)
            comp.append(row_comp + [0] * pad)
        else:
            ids.append([PAD] * pad + row_ids)
            attn.append([0] * pad + [1] * len(row_ids))
            comp.append([0] * pad + row_comp)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp)


def _naive_token_logps(model: GPT2LMHeadModel, tokens: list[int], temperature: float = 1.0) -> list[float]:
    """log π(x_{t+1} | x_≤t) for t = 0..L-2 of ONE unpadded sequence, one prefix forward at a time."""
    out = []
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            logits = model(torch.tensor([tokens[: t + 1]])).logits[0, -1].double() / temperature  # (V,)
            log_z = math.log(sum(math.exp(v) for v in logits.tolist()))
            out.append(logits[tokens[t + 1]].item() - log_z)
    return out


# ---------------------------------------------------------------------------------- tensor helpers


def test_selective_log_softmax_equals_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g) * 5
    index = torch.randint(0, 11, (3, 4), generator=g)
    expected = logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), expected, atol=1e-6)


def test_selective_log_softmax_half_precision_is_close_to_fp32() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 13, generator=g) * 3
    index = torch.randint(0, 13, (2, 5), generator=g)
    expected = logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits.bfloat16(), index)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.05)


def test_selective_log_softmax_rejects_mismatched_index() -> None:
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_from_logits_matches_definition_and_uniform_case() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 9, generator=g)
    p = logits.softmax(-1)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, chunk_size=4), expected, atol=1e-6)
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 9)), torch.full((2,), math.log(9)), atol=1e-6)
    assert entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_position_ids_count_only_attended_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_masked_token_logprobs_shifts_and_zeroes() -> None:
    logits = torch.zeros(1, 4, 5)  # uniform: every log-prob is −log 5
    logits[0, 1, 2] = 10.0  # position 1 predicts token 2 with near certainty
    ids = torch.tensor([[1, 4, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 0]])  # tokens 4 and 2 are scored; in shifted coords columns 0 and 1
    got = masked_token_logprobs(logits, ids, mask)
    assert got.shape == (1, 3)
    assert got[0, 0].item() == pytest.approx(-math.log(5), abs=1e-6)
    assert got[0, 1].item() == pytest.approx(10.0 - math.log(math.exp(10.0) + 4), abs=1e-5)
    assert got[0, 2].item() == 0.0


# ------------------------------------------------------------------------------------- model-based


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_logprobs_match_naive_loop(model: GPT2LMHeadModel, padding_side: str, temperature: float) -> None:
    ids, attn, _ = _batch(padding_side)
    with torch.no_grad():
        got = token_logprobs(model, ids, attn, temperature=temperature)  # (B, T-1)
    assert got.shape == (ids.shape[0], ids.shape[1] - 1)
    for b, (prompt, completion) in enumerate(EXAMPLES):
        tokens = prompt + completion
        expected = _naive_token_logps(model, tokens, temperature)
        start = 0 if padding_side == "right" else ids.shape[1] - len(tokens)  # column of token 1's log-prob
        cols = got[b, start : start + len(expected)]
        assert torch.allclose(cols.double(), torch.tensor(expected, dtype=torch.double), atol=1e-5)
        # Everything else (targets that are padding) is exactly zero.
        assert got[b].abs().sum().item() == pytest.approx(cols.abs().sum().item(), abs=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_logprobs_match_naive_sum_and_mean(model: GPT2LMHeadModel, padding_side: str) -> None:
    ids, attn, comp = _batch(padding_side)
    with torch.no_grad():
        total = sequence_logprobs(model, ids, attn, comp)
        mean = sequence_logprobs(model, ids, attn, comp, average=True)
    assert total.shape == mean.shape == (3,)
    for b, (prompt, completion) in enumerate(EXAMPLES):
        per_token = _naive_token_logps(model, prompt + completion)
        completion_logps = per_token[len(prompt) - 1 :]  # log-probs of the completion tokens only
        assert len(completion_logps) == len(completion)
        assert total[b].item() == pytest.approx(sum(completion_logps), abs=1e-5)
        assert mean[b].item() == pytest.approx(sum(completion_logps) / len(completion), abs=1e-5)


def test_left_and_right_padding_agree(model: GPT2LMHeadModel) -> None:
    with torch.no_grad():
        right = sequence_logprobs(model, *_batch("right"))
        left = sequence_logprobs(model, *_batch("left"))
    assert torch.allclose(right, left, atol=1e-5)


def test_masked_token_logprobs_reuses_one_forward(model: GPT2LMHeadModel) -> None:
    ids, attn, comp = _batch("left")
    with torch.no_grad():
        logits = causal_lm_logits(model, ids, attn)
        from_logits = masked_token_logprobs(logits, ids, comp).sum(-1)
        direct = sequence_logprobs(model, ids, attn, comp)
    assert torch.allclose(from_logits, direct, atol=1e-6)


def test_sequence_logprobs_is_differentiable(model: GPT2LMHeadModel) -> None:
    ids, attn, comp = _batch("left")
    model.zero_grad()
    sequence_logprobs(model, ids, attn, comp).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    model.zero_grad()


def test_bad_inputs_raise_clear_errors(model: GPT2LMHeadModel) -> None:
    ids, attn, comp = _batch("right")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, attn, temperature=0.0)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logprobs(model, ids, attn, comp[:, :-1])
    with pytest.raises(ValueError, match="logits"):
        masked_token_logprobs(torch.zeros(3, 2, VOCAB), ids, comp)
