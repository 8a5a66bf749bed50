"""rlhf_core.generation: shapes, EOS truncation and masks, left padding, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.generation import generate, truncate_at_eos
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "red green blue", "one two three four five"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, TinyModelConfig(n_layer=1, hidden_size=32, n_head=2, max_positions=64), seed=0).eval()


def prompts(tokenizer) -> list[list[int]]:
    texts = ["the cat", "a dog ran in the", "red", "one two three four", "blue green", "the mat"] * 3
    return [tokenizer.encode(t) for t in texts]


@pytest.fixture
def eos_boost(model, tokenizer):
    """Raise the EOS logit by 3 so some (not all) sampled responses end early."""
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_add(
        -1, torch.tensor([tokenizer.eos_token_id]), torch.full((*out.shape[:-1], 1), 3.0)))
    yield
    handle.remove()


def test_truncate_at_eos_keeps_first_eos_and_masks_the_rest():
    eos, pad_id = 2, 0
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, has_eos = truncate_at_eos(ids, eos, pad_id)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_truncate_at_eos_when_pad_is_eos():
    out, mask, _ = truncate_at_eos(torch.tensor([[4, 2, 2, 2]]), eos_token_id=2, pad_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0]] and out.tolist() == [[4, 2, 2, 2]]


def test_shapes_left_padding_and_eos_truncation(model, tokenizer, eos_boost):
    ids = prompts(tokenizer)
    out = generate(model, tokenizer, ids, max_new_tokens=8, batch_size=5, seed=0)
    n, q = len(ids), max(len(p) for p in ids)
    assert out.query_ids.shape == out.query_mask.shape == (n, q)
    assert out.response_ids.shape == out.response_mask.shape and out.response_ids.shape[0] == n
    assert out.response_ids.shape[1] <= 8 and len(out.texts) == n and out.has_eos.shape == (n,)
    # Queries: left-padded, real tokens flush right and unchanged.
    for row, p in enumerate(ids):
        assert out.query_mask[row].tolist() == [0] * (q - len(p)) + [1] * len(p)
        assert out.query_ids[row, q - len(p):].tolist() == p
    # The EOS boost gives both kinds of responses; check each kind's truncation.
    assert out.has_eos.any() and (~out.has_eos).any(), out.has_eos
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in range(n):
        length = int(out.response_mask[row].sum())
        tokens = out.response_ids[row].tolist()
        assert out.response_mask[row, :length].all() and not out.response_mask[row, length:].any()
        assert all(t == pad_id for t in tokens[length:])
        assert eos not in tokens[:length - 1]  # no EOS before the last kept token
        assert (tokens[length - 1] == eos) == bool(out.has_eos[row])
        if not out.has_eos[row]:
            assert length == 8
        assert out.texts[row] == tokenizer.decode(tokens[:length], skip_special_tokens=True)


def test_left_padded_batch_gives_same_greedy_output_as_single_prompt(model, tokenizer):
    ids = prompts(tokenizer)[:6]
    batch = generate(model, tokenizer, ids, max_new_tokens=6, do_sample=False, batch_size=6)
    for row, p in enumerate(ids):
        single = generate(model, tokenizer, [p], max_new_tokens=6, do_sample=False)
        length = int(single.response_mask[0].sum())
        assert batch.response_ids[row, :length].tolist() == single.response_ids[0, :length].tolist()
        assert batch.texts[row] == single.texts[0]


def test_seed_gives_same_samples_and_leaves_global_rng_alone(model, tokenizer):
    ids = prompts(tokenizer)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tokenizer, ids, max_new_tokens=8, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tokenizer, ids, max_new_tokens=8, seed=7)
    c = generate(model, tokenizer, ids, max_new_tokens=8, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_k_zero_samples_beyond_the_default_top_50(model, tokenizer):
    """HF's default ``top_k=50`` must not apply: with ``top_k=0`` a 300-token vocabulary shows tokens outside any top-50."""
    ids = [tokenizer.encode("the cat")] * 64
    out = generate(model, tokenizer, ids, max_new_tokens=1, seed=0, temperature=3.0)
    assert len(set(out.response_ids[:, 0].tolist())) > 50


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(prompt_ids=[]), "empty"), (dict(prompt_ids=[[1], []]), "no tokens"), (dict(temperature=0.0), "temperature"),
     (dict(max_new_tokens=0), "max_new_tokens")],
)
def test_bad_arguments_raise(model, tokenizer, kwargs, match):
    args = dict(prompt_ids=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, args.pop("prompt_ids"), **args)
