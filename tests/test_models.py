"""rlhf_core.models: tokenizer, tiny models, loading/saving, scalar heads, LoRA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rlhf_core.data.tokenize import encode_prompts
from rlhf_core.models import (
    LoraSettings,
    TinyModelConfig,
    apply_lora,
    build_tiny_causal_lm,
    last_token_index,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    save_model,
    sequence_scores,
    token_scores,
    train_tokenizer,
)
from rlhf_core.models.io import resolve_dtype

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "red", "big", "small", "ball", "house,", "said:", "hello", "world!", "42", "7", "yes", "no"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_texts(2000), vocab_size=384)


def weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".safetensors", ".pt", ".pth", ".ckpt"})


def right_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right"
    return batch["input_ids"], batch["attention_mask"]


def to_left_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each right-padded row's tokens to the end (same tokens, left padding)."""
    ids, mask = torch.full_like(input_ids, pad_id), torch.zeros_like(attention_mask)
    for row, n in enumerate(attention_mask.sum(-1).tolist()):
        ids[row, ids.shape[1] - n :] = input_ids[row, :n]
        mask[row, ids.shape[1] - n :] = 1
    return ids, mask


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    assert len(set(ids)) == len(specials)
    assert tokenizer.pad_token_id == ids[0] and tokenizer.bos_token_id == ids[1] and tokenizer.eos_token_id == ids[2]
    for token, token_id in zip(specials, ids):  # each special token is one id, not spelled out in bytes
        assert tokenizer.encode(token) == [token_id]
    assert tokenizer.padding_side == "right"
    assert 256 + len(specials) < len(tokenizer) <= 384  # merges were learned, within the budget
    assert len(tokenizer.encode(" the cat sat on the mat")) < len(" the cat sat on the mat")


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat",
        "  leading, double  spaces and trailing ",
        "lines\n\tand tabs\n",
        "unseen: Zürich ☃ 😀 {x}",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_train_tokenizer_on_10k_texts():
    """How long it takes is measured by ``python -m bench.tokenizer``, not asserted here."""
    texts = make_texts(10_000, seed=1)
    tok = train_tokenizer(texts, vocab_size=512)
    assert len(tok) <= 512
    assert all(tok.decode(tok.encode(text)) == text for text in texts[:200])


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], vocab_size=100)


def test_chat_template_renders_as_documented(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there, cat"}]
    expected = "<|system|>Be brief.\n<|user|>Hi  there, cat\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|assistant|>"

    ids = encode_prompts(tokenizer, [""], [messages])[0]  # how every stage encodes prompts
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == tokenizer.encode(expected + "<|assistant|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.decode(ids) == expected + "<|assistant|>"
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == tokenizer.encode(expected)


def test_chat_template_rejects_unknown_role(tokenizer):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="unknown role tool"):
        encode_prompts(tokenizer, [""], [[{"role": "tool", "content": "x"}]])


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    assert loaded.padding_side == "right"
    text = " the red ball, said: hello"
    assert loaded.encode(text) == tokenizer.encode(text)
    messages = [{"role": "user", "content": "hello"}]
    assert encode_prompts(loaded, [""], [messages]) == encode_prompts(tokenizer, [""], [messages])


def test_load_tokenizer_falls_back_to_eos_for_pad(tokenizer, tmp_path):
    no_pad = train_tokenizer(make_texts(200), vocab_size=300)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|eos|>" and loaded.pad_token_id == loaded.eos_token_id


# --- tiny causal LMs --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_model_builds_with_tokenizer_ids(tokenizer, arch):
    rng_before = torch.random.get_rng_state()
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch), seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # init randomness stays local
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog"])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (*input_ids.shape, len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_model_is_deterministic_in_seed(tokenizer, arch):
    same = [build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch), seed=3) for _ in range(2)]
    other = build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch), seed=4)
    params = [dict(m.named_parameters()) for m in (*same, other)]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    assert not all(torch.equal(params[0][k], params[2][k]) for k in params[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "bert"}, "arch"),
        ({"hidden_size": 130, "n_head": 4}, "divisible"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
        ({"arch": "llama", "hidden_size": 12, "n_head": 4}, "even head size"),
    ],
)
def test_tiny_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyModelConfig(**kwargs)


# --- loading and saving -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_save_load_gives_identical_logits(tokenizer, tmp_path, arch):
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch), seed=0).eval()
    save_model(model, tokenizer, tmp_path)
    assert weight_files(tmp_path) == ["model.safetensors"]
    loaded = load_causal_lm(str(tmp_path)).eval()
    assert type(loaded) is type(model)
    input_ids, attention_mask = right_padded(load_tokenizer(str(tmp_path)), ["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
            model(input_ids=input_ids, attention_mask=attention_mask).logits,
        )


def test_load_causal_lm_passes_safe_defaults(monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: calls.append((path, kw)) or "model")
    load_causal_lm("some/model")
    load_causal_lm("some/model", trust_remote_code=True, dtype="bfloat16")
    assert calls[0] == ("some/model", {"use_safetensors": True, "trust_remote_code": False})
    assert calls[1][1] == {"use_safetensors": True, "trust_remote_code": True, "dtype": torch.bfloat16}


def test_load_causal_lm_refuses_remote_code_by_default(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "rlhf_test_custom",
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomLM",
        },
    }))
    (tmp_path / "configuration_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(str(tmp_path))


def test_load_causal_lm_refuses_pickled_weights(tokenizer, tmp_path):
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError):
        load_causal_lm(str(tmp_path))


def test_load_causal_lm_dtype(tokenizer, tmp_path):
    save_model(build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0), tokenizer, tmp_path)
    assert next(load_causal_lm(str(tmp_path), dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(str(tmp_path)).parameters()).dtype == torch.float32
    assert resolve_dtype(torch.float16) is torch.float16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float33")


@pytest.fixture(params=["gpt2", "llama"])
def reward_model(request, tokenizer, tmp_path):
    """A reward model with a fresh score head on top of a saved tiny causal LM."""
    save_model(build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=request.param), seed=0), tokenizer, tmp_path / "lm")
    return load_reward_model(str(tmp_path / "lm")).eval()


def test_reward_model_save_load_gives_identical_scores(tokenizer, reward_model, tmp_path):
    assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == tokenizer.pad_token_id
    save_model(reward_model, tokenizer, tmp_path / "rm")
    assert weight_files(tmp_path / "rm") == ["model.safetensors"]
    loaded = load_reward_model(str(tmp_path / "rm"), seed=123).eval()  # the head is loaded, not drawn
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog", "yes"])
    with torch.no_grad():
        assert torch.equal(
            sequence_scores(loaded, input_ids, attention_mask), sequence_scores(reward_model, input_ids, attention_mask)
        )
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                           reward_model(input_ids=input_ids, attention_mask=attention_mask).logits)


def test_reward_head_init_follows_seed(tokenizer, tmp_path):
    save_model(build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0), tokenizer, tmp_path)
    heads = [load_reward_model(str(tmp_path), seed=s).score.weight for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


# --- scalar heads -----------------------------------------------------------------------------


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.bool()).dtype == torch.long
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_sequence_scores_equal_the_models_own_output(tokenizer, reward_model):
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog", "yes no yes no 42"])
    assert (attention_mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        ours = sequence_scores(reward_model, input_ids, attention_mask)
        theirs = reward_model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_token_scores_are_prefix_rewards(tokenizer, reward_model):
    """s_t is the score the model gives the prefix ending at t (the per-token value PPO uses)."""
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        scores = token_scores(reward_model, input_ids, attention_mask)
        assert scores.shape == input_ids.shape
        n = int(attention_mask[1].sum())
        for t in range(n):
            prefix = input_ids[1:, : t + 1]
            torch.testing.assert_close(scores[1, t], reward_model(input_ids=prefix).logits[0, 0], rtol=0, atol=1e-5)


def test_sequence_scores_invariant_to_padding_side(tokenizer, reward_model):
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog", "yes"])
    left_ids, left_mask = to_left_padding(input_ids, attention_mask, tokenizer.pad_token_id)
    assert not torch.equal(left_ids, input_ids)
    with torch.no_grad():
        right_scores = sequence_scores(reward_model, input_ids, attention_mask)
        left_scores = sequence_scores(reward_model, left_ids, left_mask)
    torch.testing.assert_close(left_scores, right_scores, rtol=0, atol=1e-5)


def test_sequence_scores_through_a_ddp_style_wrapper(tokenizer, reward_model):
    """DDP/DeepSpeed keep the model in ``.module`` and must be called through their own forward."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    wrapped = Wrapper(reward_model)
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_scores(wrapped, input_ids, attention_mask),
            sequence_scores(reward_model, input_ids, attention_mask),
            rtol=0, atol=0,
        )
    assert wrapped.calls == 1


def test_token_scores_need_a_score_head(tokenizer):
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="score"):
        token_scores(model, ids, torch.ones_like(ids))


# --- LoRA -------------------------------------------------------------------------------------


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Names of the modules that carry trainable LoRA weights (``...c_attn.lora_A...`` -> ``c_attn``)."""
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "targets"), [("gpt2", {"c_attn"}), ("llama", {"q_proj", "v_proj"})])
def test_lora_applies_with_peft_defaults(tokenizer, arch, targets):
    model = apply_lora(build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch), seed=0), LoraSettings(r=4))
    trainable, total = count_params(model)
    assert 0 < trainable < 0.05 * total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert adapted_modules(model) == targets


def test_lora_target_modules_setting_and_errors(tokenizer):
    base = build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0)
    model = apply_lora(base, LoraSettings(target_modules=["c_fc"]))
    assert adapted_modules(model) == {"c_fc"}

    class Unknown(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(Unknown(), LoraSettings())
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="task_type"):
        apply_lora(build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0), LoraSettings(), task_type="QA")


def test_lora_reward_model_scores_through_peft(tokenizer, tmp_path):
    save_model(build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0), tokenizer, tmp_path)
    model = load_reward_model(str(tmp_path), lora=LoraSettings(r=4)).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_scores(model, input_ids, attention_mask),
            model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1),
            rtol=0, atol=1e-6,
        )


def perturb_lora(model: torch.nn.Module) -> None:
    """peft starts B at zero (a no-op adapter); give it weights so merging changes the model."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_lora_merged_save_loads_as_plain_model(tokenizer, tmp_path):
    base = build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0).eval()
    input_ids, attention_mask = right_padded(tokenizer, ["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
    peft_model = apply_lora(base, LoraSettings(r=4))
    perturb_lora(peft_model)
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter matters

    merged = save_model(peft_model, tokenizer, tmp_path)
    assert not hasattr(merged, "peft_config")
    assert weight_files(tmp_path) == ["model.safetensors"] and not (tmp_path / "adapter_config.json").exists()
    loaded = load_causal_lm(str(tmp_path)).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        loaded_logits = loaded(input_ids=input_ids, attention_mask=attention_mask).logits
        assert torch.equal(loaded_logits, merged.eval()(input_ids=input_ids, attention_mask=attention_mask).logits)
    torch.testing.assert_close(loaded_logits, adapted_logits, rtol=0, atol=1e-4)


def test_lora_unmerged_save_writes_safetensors_adapter(tokenizer, tmp_path):
    peft_model = apply_lora(build_tiny_causal_lm(tokenizer, TinyModelConfig(), seed=0), LoraSettings(r=4))
    save_model(peft_model, tokenizer, tmp_path, merge_lora=False)
    assert weight_files(tmp_path) == ["adapter_model.safetensors"]
    assert (tmp_path / "adapter_config.json").exists()
    assert hasattr(peft_model, "peft_config")  # not merged
