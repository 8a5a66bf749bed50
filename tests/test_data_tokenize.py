"""Tokenisation rules (masking, EOS, templates, truncation, counts) and the collators."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_core.data.collate import PreferenceCollator, SFTCollator
from rlhf_core.data.formats import normalize
from rlhf_core.data.loading import load_records
from rlhf_core.data.tokenize import (
    IGNORE_INDEX,
    TokenizeStats,
    TruncationConfig,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = ["<system>", "<user>", "<assistant>", "a", "b", "c", "d", "e", "f", "g", "h", "good", "bad", "be", "nice"]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(*, bos: bool = True, adds_bos_itself: bool = False, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: every word is one token, unknown words are <unk>."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos_itself:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>" if bos else None, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Expected ids written from the words, independent of the code under test."""
    return tok.convert_tokens_to_ids(text.split())


def sft_ds(pairs: list[tuple[str, str]]) -> datasets.Dataset:
    return normalize(datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs]), "sft")


def pref_ds(rows: list[tuple[str, str, str]]) -> datasets.Dataset:
    return normalize(datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]), "preference")


# ---------------------------------------------------------------- SFT


def test_sft_masks_exactly_the_prompt_and_ends_with_eos(tok: PreTrainedTokenizerFast) -> None:
    out, stats = tokenize_sft(sft_ds([("a b c", "d e"), ("f", "g h a b")]), tok, TruncationConfig(max_length=64))
    first = out[0]
    assert first["input_ids"] == ids(tok, "<bos> a b c d e <eos>")
    assert first["labels"] == [IGNORE_INDEX] * 4 + ids(tok, "d e <eos>")
    assert first["prompt_length"] == 4
    for row in out:
        n = row["prompt_length"]
        assert all(label == IGNORE_INDEX for label in row["labels"][:n])
        assert row["labels"][n:] == row["input_ids"][n:] and IGNORE_INDEX not in row["labels"][n:]
        assert row["input_ids"][-1] == tok.eos_token_id
    assert out.column_names == ["input_ids", "labels", "prompt_length"]
    assert stats == TokenizeStats(n_input=2, n_kept=2)


def test_bos_is_not_doubled_when_the_tokenizer_adds_it() -> None:
    tok = make_tokenizer(adds_bos_itself=True)
    out, _ = tokenize_sft(sft_ds([("a b", "c")]), tok, TruncationConfig())
    assert out[0]["input_ids"] == ids(tok, "<bos> a b c <eos>")


def test_no_bos_when_the_tokenizer_has_none() -> None:
    tok = make_tokenizer(bos=False)
    out, _ = tokenize_sft(sft_ds([("a b", "c")]), tok, TruncationConfig())
    assert out[0]["input_ids"] == ids(tok, "a b c <eos>")


def test_chat_template_path_uses_prompt_messages_with_generation_prompt() -> None:
    tok = make_tokenizer(chat_template=TEMPLATE)
    raw = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a b"}, {"role": "assistant", "content": "good"}]}
    ds = normalize(datasets.Dataset.from_list([raw]), "sft")
    out, _ = tokenize_sft(ds, tok, TruncationConfig())
    assert out[0]["input_ids"] == ids(tok, "<system> be nice <user> a b <assistant> good <eos>")
    assert out[0]["prompt_length"] == 7


def test_no_template_path_tokenises_the_plain_transcript(tok: PreTrainedTokenizerFast) -> None:
    raw = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    out, _ = tokenize_sft(normalize(datasets.Dataset.from_list([raw]), "sft"), tok, TruncationConfig())
    # "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" -> the tags are unknown words
    assert out[0]["input_ids"] == ids(tok, "<bos> <unk> a <unk> b <unk> c <unk> d <eos>")


def test_left_truncation_keeps_the_end_of_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    out, stats = tokenize_sft(sft_ds([("a b c d e", "f"), ("a", "f")]), tok, TruncationConfig(max_length=16, max_prompt_length=3))
    assert out[0]["input_ids"] == ids(tok, "c d e f <eos>")
    assert out[1]["input_ids"] == ids(tok, "<bos> a f <eos>")
    assert stats.n_prompt_truncated == 1 and stats.n_dropped_prompt_too_long == 0


def test_drop_and_truncation_counts_on_a_hand_built_case(tok: PreTrainedTokenizerFast) -> None:
    rows = [
        ("a b", "c"),          # 3 + 2 = 5 tokens: fits
        ("a b c d e", "f"),    # prompt 6 >= max_length 6: dropped
        ("a b", "c d e f"),    # 3 + 5 > 6: completion cut to 3 tokens
        ("a b c d e f", "g"),  # prompt 7: dropped
    ]
    out, stats = tokenize_sft(sft_ds(rows), tok, TruncationConfig(max_length=6))
    assert stats.to_dict() == {
        "n_input": 4, "n_kept": 2, "n_dropped_prompt_too_long": 2, "n_prompt_truncated": 0, "n_completion_truncated": 1,
    }
    assert out["input_ids"] == [ids(tok, "<bos> a b c <eos>"), ids(tok, "<bos> a b c d e")]
    assert all(len(x) <= 6 for x in out["input_ids"])


def test_counts_survive_the_map_cache(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    """A file-backed dataset makes ``map`` reuse its cache on the second call; counts must not vanish."""
    sft_ds([("a b", "c"), ("a b c d e", "f")]).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    cfg = TruncationConfig(max_length=6)
    first, second = tokenize_sft(ds, tok, cfg)[1], tokenize_sft(ds, tok, cfg)[1]
    assert first == second and first.n_dropped_prompt_too_long == 1


def test_missing_columns_point_to_normalize(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"lacks columns \['prompt_messages', 'completion'\].*normalize"):
        tokenize_sft(datasets.Dataset.from_list([{"prompt": "a"}]), tok, TruncationConfig())


def test_empty_dataset_is_refused(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no rows"):
        tokenize_sft(sft_ds([("a", "b")]).select([]), tok, TruncationConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_length": 1}, "max_length"), ({"max_length": 8, "max_prompt_length": 8}, "max_prompt_length"),
     ({"max_prompt_length": 0}, "max_prompt_length"), ({"max_length": 8.0}, "max_length")],
)
def test_truncation_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TruncationConfig(**kwargs)


# ---------------------------------------------------------------- preference and prompts


def test_preference_shares_one_prompt_and_cuts_each_completion(tok: PreTrainedTokenizerFast) -> None:
    rows = [("a b c d", "good", "bad bad bad"), ("a b c d e f g", "good", "bad")]
    out, stats = tokenize_preference(pref_ds(rows), tok, TruncationConfig(max_length=6, max_prompt_length=4))
    assert out.column_names == ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    assert out["prompt_input_ids"] == [ids(tok, "a b c d"), ids(tok, "d e f g")]
    assert out["chosen_input_ids"] == [ids(tok, "good <eos>")] * 2
    assert out["rejected_input_ids"] == [ids(tok, "bad bad"), ids(tok, "bad <eos>")]
    assert stats == TokenizeStats(n_input=2, n_kept=2, n_prompt_truncated=2, n_completion_truncated=1)


def test_preference_drops_long_prompts_and_keeps_extra_columns(tok: PreTrainedTokenizerFast) -> None:
    ds = pref_ds([("a", "good", "bad"), ("a b c d e", "good", "bad")]).add_column("margin", [0.5, 1.0])
    out, stats = tokenize_preference(ds, tok, TruncationConfig(max_length=6))
    assert stats.n_kept == 1 and stats.n_dropped_prompt_too_long == 1
    assert out["margin"] == [0.5]


def test_prompts_for_generation(tok: PreTrainedTokenizerFast) -> None:
    ds = normalize(datasets.Dataset.from_list([{"prompt": "a b"}, {"prompt": "a b c d e f"}]), "prompt")
    out, stats = tokenize_prompts(ds, tok, TruncationConfig(max_length=5))
    assert out.column_names == ["prompt_input_ids"]
    assert out["prompt_input_ids"] == [ids(tok, "<bos> a b")]
    assert (stats.n_input, stats.n_kept, stats.n_dropped_prompt_too_long) == (2, 1, 1)


# ---------------------------------------------------------------- collators


def test_sft_collator_right_pads_and_ignores_pad_in_labels() -> None:
    batch = SFTCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [5, 8], "labels": [-100, 8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_preference_collator_pads_chosen_and_rejected_to_one_length() -> None:
    batch = PreferenceCollator(pad_token_id=0)([
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 4, 4]},
        {"prompt_input_ids": [1], "chosen_input_ids": [5, 5], "rejected_input_ids": [6]},
    ])
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 5, 5, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[1, 2, 4, 4, 4], [1, 6, 0, 0, 0]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["chosen_completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch["rejected_completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    both = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    assert both.shape == (4, 5)


def test_collators_need_a_pad_token() -> None:
    for collator in (SFTCollator, PreferenceCollator):
        with pytest.raises(ValueError, match="pad_token"):
            collator(None)


def test_public_slice_end_to_end(
    fixtures_dir: Path, tok: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real HH pairs: load -> normalise -> tokenise -> collate, masks consistent with the lengths."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # keep the Arrow cache out of $HOME
    pairs = normalize(load_records(fixtures_dir / "public" / "hh-rlhf-harmless-base-test.jsonl.gz"), "preference")
    out, stats = tokenize_preference(pairs, tok, TruncationConfig(max_length=96, max_prompt_length=64))
    assert stats.n_kept == stats.n_input == 20 and stats.n_prompt_truncated > 0
    batch = PreferenceCollator(tok.pad_token_id)([out[i] for i in range(4)])
    lengths = [len(out[i]["prompt_input_ids"]) + len(out[i]["chosen_input_ids"]) for i in range(4)]
    assert batch["chosen_attention_mask"].sum(1).tolist() == lengths
    assert batch["chosen_completion_mask"].sum(1).tolist() == [len(out[i]["chosen_input_ids"]) for i in range(4)]
    assert batch["chosen_input_ids"].shape[1] <= 96
