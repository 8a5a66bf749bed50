"""rlhf_core.rollout: the batch layout, k samples per prompt for group methods, recomputed response log-probs."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.generation import generate
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
from rlhf_core.rollout import batch_response_logprobs, model_response_logprobs, response_columns, sample_batch

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "red green blue", "one two three four five"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, TinyModelConfig(n_layer=1, hidden_size=32, n_head=2, max_positions=64), seed=0).eval()


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in ("the cat", "a dog ran in the", "red")]


def test_sample_batch_is_generate_in_one_batch_layout(model, tokenizer):
    ids = prompt_ids(tokenizer)
    batch = sample_batch(model, tokenizer, ids, max_new_tokens=5, temperature=0.7, batch_size=2, seed=3)
    out = generate(model, tokenizer, ids, max_new_tokens=5, temperature=0.7, batch_size=2, seed=3)
    q = out.query_ids.shape[1]
    assert batch.n_query == q and len(batch) == len(ids) and batch.texts == out.texts
    assert torch.equal(batch.query_response, torch.cat([out.query_ids, out.response_ids], 1))
    assert torch.equal(batch.attention_mask, torch.cat([out.query_mask, out.response_mask], 1))
    assert torch.equal(batch.completion_mask[:, :q], torch.zeros_like(out.query_mask))
    assert torch.equal(batch.completion_mask[:, q:], out.response_mask) and torch.equal(batch.mask, out.response_mask.bool())


def test_group_size_gives_k_consecutive_samples_per_prompt(model, tokenizer):
    ids, k = prompt_ids(tokenizer), 4
    batch = sample_batch(model, tokenizer, ids, max_new_tokens=6, temperature=1.0, batch_size=8, seed=0, group_size=k)
    assert len(batch) == len(ids) * k
    q = batch.n_query
    for g, prompt in enumerate(ids):
        for row in range(g * k, (g + 1) * k):  # rows g·k … g·k + k − 1 answer prompt g (rlhf_core.rl.group's layout)
            assert batch.query_response[row, q - len(prompt) : q].tolist() == prompt
        assert len({tuple(batch.query_response[row, q:].tolist()) for row in range(g * k, (g + 1) * k)}) > 1  # k samples
    repeated = sample_batch(model, tokenizer, [p for p in ids for _ in range(k)], max_new_tokens=6, temperature=1.0,
                            batch_size=8, seed=0)
    assert torch.equal(repeated.query_response, batch.query_response)
    with pytest.raises(ValueError, match="group_size"):
        sample_batch(model, tokenizer, ids, max_new_tokens=2, temperature=1.0, batch_size=2, group_size=0)


def test_response_logprobs_are_those_of_the_unpadded_prefixes(model, tokenizer):
    """log softmax(z/τ) of each sampled token given its own unpadded prefix, 0 after the response; chunking changes nothing."""
    ids, tau = prompt_ids(tokenizer), 0.7
    batch = sample_batch(model, tokenizer, ids, max_new_tokens=5, temperature=tau, batch_size=3, seed=1)
    whole = model_response_logprobs(model, batch.query_response, batch.attention_mask, batch.n_query, tau)  # (B, R)
    chunked = batch_response_logprobs(model, batch, tau, batch_size=1)
    torch.testing.assert_close(chunked, whole.detach())
    q = batch.n_query
    with torch.no_grad():
        for row, prompt in enumerate(ids):
            response = batch.query_response[row, q:]
            for t in range(int(batch.response_mask[row].sum())):
                prefix = torch.tensor([prompt + response[:t].tolist()])
                expected = (model(prefix).logits[0, -1] / tau).log_softmax(-1)[int(response[t])]
                assert whole[row, t] == pytest.approx(float(expected), abs=1e-4)
    assert (whole[~batch.mask] == 0).all()


def test_response_columns_are_the_positions_before_each_response_token():
    per_position = torch.arange(2 * 7).view(2, 7)  # Q = 3, R = 4
    assert response_columns(per_position, 3).tolist() == [[2, 3, 4, 5], [9, 10, 11, 12]]
