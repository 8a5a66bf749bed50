"""Pretrained-format model folders (built locally: tests/pretrained_folders.py) as the base model.

A tokenizer without a pad token is batched with eos as pad, in memory only: logits do not change
with padding, the vocabulary and embeddings keep their size, and every saved copy of the
tokenizer is the original files byte for byte. Reward/value heads attach to Llama, GPT-2 and to
architectures transformers has no ``*ForSequenceClassification`` for; a borrowed pad id is never
written into a saved config, nor is the one ``Trainer`` copies from the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_core.logprobs import causal_lm_logits
from rlhf_core.models import load_causal_lm, load_reward_model, load_tokenizer, save_model, sequence_scores
from rlhf_core.models.tokenizer import save_tokenizer, tokenizer_files
from tests.pretrained_folders import gpt2_folder, llama_folder

TEXTS = ["Name 4 words about tool.", "Write 6 words related to vehicle, please.", "Fruit?"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {"llama": llama_folder(root / "llama"), "gpt2": gpt2_folder(root / "gpt2")}


def _batch(tokenizer, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = side
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_missing_pad_is_eos_in_memory_and_padding_does_not_change_logits(folders, arch):
    folder = folders[arch]
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "pad_token" not in json.loads((folder / "tokenizer_config.json").read_text())  # the folder is untouched
    model = load_causal_lm(str(folder)).eval()
    assert model.config.pad_token_id is None
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # no token added, nothing resized
    for side in ("right", "left"):
        ids, mask = _batch(tokenizer, TEXTS, side)
        assert (mask == 0).any(), "the batch is padded"
        with torch.no_grad():
            batched = causal_lm_logits(model, ids, mask)  # (B, T, V)
            for row, text in enumerate(TEXTS):
                alone = torch.tensor([tokenizer(text)["input_ids"]])
                single = causal_lm_logits(model, alone, torch.ones_like(alone))[0]  # (t, V)
                real = mask[row].bool()
                torch.testing.assert_close(batched[row][real], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_tokenizer_is_the_original_files(folders, arch, tmp_path):
    folder = folders[arch]
    tokenizer = load_tokenizer(str(folder))
    names = sorted(p.name for p in tokenizer_files(folder))
    assert ("chat_template.jinja" in names) == (arch == "llama")
    save_tokenizer(tokenizer, tmp_path / "tok")
    model = load_causal_lm(str(folder))
    save_model(model, tokenizer, tmp_path / "model")
    for out in (tmp_path / "tok", tmp_path / "model"):
        for name in names:
            assert (out / name).read_bytes() == (folder / name).read_bytes(), (out, name)
        again = load_tokenizer(str(out))
        assert again.chat_template == tokenizer.chat_template and again("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]
    # a tokenizer changed after loading is saved as it is now, not as the folder's copy
    tokenizer.add_tokens(["<|new|>"])
    save_tokenizer(tokenizer, tmp_path / "changed")
    assert len(load_tokenizer(str(tmp_path / "changed"))) == len(tokenizer)


def _cohere_folder(dest: Path, vocab_size: int, eos: int) -> Path:
    """A causal LM architecture without a ``*ForSequenceClassification`` class in transformers."""
    from transformers import AutoModelForCausalLM, CohereConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    assert "cohere" not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    config = CohereConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, bos_token_id=None, eos_token_id=eos, pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("arch", ["llama", "gpt2", "cohere"])
def test_reward_head_attaches_and_keeps_the_checkpoints_pad_id(folders, arch, tmp_path):
    tokenizer = load_tokenizer(str(folders["llama"] if arch == "cohere" else folders[arch]))
    folder = _cohere_folder(tmp_path / "base", len(tokenizer), tokenizer.eos_token_id) if arch == "cohere" else folders[arch]
    reward = load_reward_model(str(folder)).eval()
    prefix = {"llama": "Llama", "gpt2": "GPT2", "cohere": "Cohere"}[arch]
    assert type(reward).__name__ == f"{prefix}ForSequenceClassification"
    assert reward.score.out_features == 1
    assert reward.config.pad_token_id == tokenizer.eos_token_id  # borrowed: transformers needs one for batches
    ids, mask = _batch(tokenizer, TEXTS, "left")
    with torch.no_grad():
        scores = sequence_scores(reward, ids, mask)  # (B,)
        for row, text in enumerate(TEXTS):
            alone = torch.tensor([tokenizer(text)["input_ids"]])
            torch.testing.assert_close(scores[row], sequence_scores(reward, alone, torch.ones_like(alone))[0], rtol=1e-4, atol=1e-5)
    save_model(reward, tokenizer, tmp_path / "reward")
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["pad_token_id"] is None  # not written
    assert reward.config.pad_token_id == tokenizer.eos_token_id  # ...and still there in memory
    again = load_reward_model(str(tmp_path / "reward")).eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(again, ids, mask), scores)


def test_sft_keeps_the_special_token_ids_the_trainer_aligns(folders, tmp_path):
    """transformers' Trainer copies the tokenizer's (borrowed) pad id into the model config; it is put back."""
    import datasets

    from rlhf_core.trainers.sft import SFTConfig, train_sft

    tokenizer = load_tokenizer(str(folders["llama"]))
    model = load_causal_lm(str(folders["llama"]))
    rows = [{"prompt": f"Name {i} words about tool.", "completion": "pliers rake chisel.",
             "prompt_messages": [{"role": "user", "content": f"Name {i} words about tool."}]} for i in range(16)]
    data = datasets.Dataset.from_list(rows)
    cfg = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=2, per_device_train_batch_size=8, eval_steps=2, save_steps=10,
                    logging_steps=1, max_length=48, progress=False)
    result = train_sft(model, tokenizer, data, data, cfg)
    assert result.model.config.pad_token_id is None and result.model.generation_config.pad_token_id is None
    save_model(result.model, tokenizer, tmp_path / "sft")
    reloaded = load_causal_lm(str(tmp_path / "sft"))
    assert reloaded.config.pad_token_id is None
    assert reloaded.get_input_embeddings().padding_idx is None  # the eos row keeps training in later stages


@pytest.mark.parametrize("arch", ["llama", "cohere"])
def test_ppo_value_model_from_a_policy_of_any_architecture(folders, arch, tmp_path):
    """Without a reward model PPO builds its value model from the policy: any architecture, no eos padding_idx."""
    from rlhf_core.models import token_scores
    from rlhf_core.trainers.ppo.models import value_model_from_policy

    tokenizer = load_tokenizer(str(folders["llama"]))
    folder = _cohere_folder(tmp_path / "base", len(tokenizer), tokenizer.eos_token_id) if arch == "cohere" else folders["llama"]
    policy = load_causal_lm(str(folder))
    value = value_model_from_policy(policy, tokenizer.pad_token_id).eval()
    assert type(value).__name__ == f"{arch.capitalize()}ForSequenceClassification"
    assert value.get_input_embeddings().padding_idx is None and value.config.pad_token_id == tokenizer.eos_token_id
    torch.testing.assert_close(value.get_input_embeddings().weight, policy.get_input_embeddings().weight)
    ids, mask = _batch(tokenizer, TEXTS, "left")
    with torch.no_grad():
        values = token_scores(value, ids, mask)  # (B, T)
        alone = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
        torch.testing.assert_close(values[0][mask[0].bool()], token_scores(value, alone, torch.ones_like(alone))[0],
                                   rtol=1e-4, atol=1e-5)
