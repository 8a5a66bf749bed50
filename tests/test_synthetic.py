"""The synthetic task: language, gold reward, demonstrator, preference labels and the dataset writer."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from rlhf_core.synthetic import (
    GOLD_REWARD_MAX,
    MAX_N,
    MIN_N,
    REWARD_WEIGHTS,
    TEMPLATES,
    TOPICS,
    GoldReward,
    all_prompts,
    bayes_accuracy,
    extract_words,
    generate_task,
    gold_reward,
    gold_reward_components,
    ideal_response,
    label_agreement,
    make_prompt,
    parse_prompt,
    sample_response,
)

FILES = ("sft.jsonl", "preferences_train.jsonl", "preferences_test.jsonl", "prompts.jsonl", "task.json")
PROMPT = "List 3 fruit words."  # topic fruit, n = 3


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def default_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default-size task, generated once for the statistical tests."""
    out = tmp_path_factory.mktemp("task")
    return out, generate_task(out, seed=0)


# ----------------------------------------------------------------------------------------- language


def test_vocabulary_has_eight_topics_of_ten_distinct_lowercase_words() -> None:
    assert len(TOPICS) == 8
    words = [word for topic_words in TOPICS.values() for word in topic_words]
    assert all(len(topic_words) == 10 for topic_words in TOPICS.values())
    assert len(set(words)) == len(words), "a word belongs to two topics"
    assert all(word.isalpha() and word.islower() and word.isascii() for word in words)


def test_parse_prompt_inverts_make_prompt_for_every_prompt() -> None:
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == len(TEMPLATES) * len(TOPICS) * (MAX_N - MIN_N + 1)
    for template in range(len(TEMPLATES)):
        for topic in TOPICS:
            for n in range(MIN_N, MAX_N + 1):
                assert parse_prompt(make_prompt(topic, n, template)) == (topic, n)
    assert parse_prompt("  Name 12 words about weather.\n") == ("weather", 12)


@pytest.mark.parametrize(
    "bad", ["List 3 planet words.", "List three fruit words.", "List 0 fruit words.", "Tell me a joke.", ""]
)
def test_parse_prompt_rejects_non_task_prompts_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="prompt") as err:
        parse_prompt(bad)
    assert repr(bad) in str(err.value)


def test_extract_words_lowercases_and_strips_punctuation() -> None:
    assert extract_words("Apple, PEAR!  fig.") == ["apple", "pear", "fig"]
    assert extract_words(" ...  ") == []


# -------------------------------------------------------------------------------------- gold reward


def test_gold_reward_max_is_the_sum_of_weights_and_ideal_responses_reach_it() -> None:
    assert pytest.approx(sum(REWARD_WEIGHTS.values())) == GOLD_REWARD_MAX
    rng = random.Random(1)
    for prompt in all_prompts():
        response = ideal_response(prompt, rng)
        topic, n = parse_prompt(prompt)
        words = response[:-1].split(" ")
        assert response.endswith(".") and len(set(words)) == n and set(words) <= set(TOPICS[topic])
        assert gold_reward(prompt, response) == pytest.approx(GOLD_REWARD_MAX)


def test_off_topic_word_lowers_relevance_and_total() -> None:
    ideal, off = "apple pear fig.", "apple pear hammer."
    before, after = gold_reward_components(PROMPT, ideal), gold_reward_components(PROMPT, off)
    assert after["relevance"] == pytest.approx(2 / 3) and before["relevance"] == 1.0
    assert {k: after[k] for k in ("length", "diversity", "format")} == {"length": 1.0, "diversity": 1.0, "format": 1.0}
    assert gold_reward(PROMPT, off) == pytest.approx(GOLD_REWARD_MAX - REWARD_WEIGHTS["relevance"] / 3)


@pytest.mark.parametrize("response,k", [("apple pear.", 2), ("apple pear fig plum.", 4), ("apple pear fig plum lemon.", 5)])
def test_wrong_length_lowers_length_and_total(response: str, k: int) -> None:
    comps = gold_reward_components(PROMPT, response)
    assert comps["length"] == pytest.approx(1 - abs(k - 3) / 3) and comps["length"] < 1
    assert comps["relevance"] == comps["diversity"] == comps["format"] == 1.0
    assert gold_reward(PROMPT, response) < GOLD_REWARD_MAX


def test_repeated_word_lowers_only_diversity() -> None:
    comps = gold_reward_components(PROMPT, "apple apple fig.")
    assert comps["diversity"] == pytest.approx(2 / 3)
    assert comps["relevance"] == comps["length"] == comps["format"] == 1.0
    # the over-optimisation the module docstring warns about: one safe word, repeated
    assert gold_reward(PROMPT, "apple apple apple.") == pytest.approx(1 + 0.5 + 0.5 / 3 + 0.25)


@pytest.mark.parametrize(
    "response", ["apple pear fig", "Apple pear fig.", "apple  pear fig.", "apple, pear fig.", "apple pear fig..", "apple pear fig. ok"]
)
def test_format_breaks_lower_only_format(response: str) -> None:
    comps = gold_reward_components(PROMPT, response)
    assert comps["format"] == 0.0
    if len(extract_words(response)) == 3:  # same words as the ideal response: nothing else changes
        assert gold_reward(PROMPT, response) == pytest.approx(GOLD_REWARD_MAX - REWARD_WEIGHTS["format"])


def test_format_ignores_surrounding_whitespace_and_empty_response_scores_zero() -> None:
    assert gold_reward_components(PROMPT, " apple pear fig.\n")["format"] == 1.0
    assert gold_reward(PROMPT, "") == 0.0
    assert gold_reward(PROMPT, ".") == 0.0


def test_gold_reward_callable_scores_batches_and_checks_lengths() -> None:
    fn = GoldReward()
    prompts = [PROMPT, "Name 2 words about color.", PROMPT]
    responses = ["apple pear fig.", "red red", "cat"]
    assert fn(prompts, responses) == [gold_reward(p, r) for p, r in zip(prompts, responses)]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        fn(prompts[:2], responses[:1])
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        fn(["hello"], ["apple."])


# -------------------------------------------------------------------------------------- demonstrator


def test_demonstrator_is_ideal_at_quality_one_and_worse_at_zero() -> None:
    rng = random.Random(0)
    best = [gold_reward(PROMPT, sample_response(rng, "fruit", 3, 1.0)) for _ in range(200)]
    worst = [gold_reward(PROMPT, sample_response(rng, "fruit", 3, 0.0)) for _ in range(200)]
    assert all(score == pytest.approx(GOLD_REWARD_MAX) for score in best)
    assert statistics.mean(worst) < GOLD_REWARD_MAX - 0.5


def test_bayes_accuracy_hand_computed() -> None:
    # pair 1: R(a) - R(b) = 0.2, pair 2: -0.4, τ = 0.2 -> p = σ(1), σ(-2)
    p1 = 1 / (1 + math.exp(-1.0))
    p2 = 1 / (1 + math.exp(2.0))
    expected = (max(p1, 1 - p1) + max(p2, 1 - p2)) / 2  # ≈ (0.7311 + 0.8808) / 2
    assert bayes_accuracy([1.2, 0.5], [1.0, 0.9], 0.2) == pytest.approx(expected, abs=1e-12)
    assert bayes_accuracy([0.9, 0.5], [1.0, 1.2], 0.2) == pytest.approx(bayes_accuracy([1.0, 1.2], [0.9, 0.5], 0.2))
    assert bayes_accuracy([1.0], [1.0], 0.2) == 0.5  # a tie is a coin flip
    with pytest.raises(ValueError, match="temperature"):
        bayes_accuracy([1.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="equal, non-empty"):
        bayes_accuracy([1.0], [], 0.2)


def test_label_agreement_counts_ties_half() -> None:
    assert label_agreement([2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 2.0, 0.5]) == pytest.approx((1 + 0.5 + 0 + 0) / 4)


# --------------------------------------------------------------------------------------------- writer


def test_same_seed_same_bytes_other_seed_different(tmp_path: Path) -> None:
    sizes = dict(n_sft=60, n_pref_train=60, n_pref_test=20, n_prompts=20)
    generate_task(tmp_path / "a", seed=3, **sizes)
    generate_task(tmp_path / "b", seed=3, **sizes)
    generate_task(tmp_path / "c", seed=4, **sizes)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        if name != "task.json":
            assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preferences_test"):
        generate_task(tmp_path, n_pref_test=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_task(tmp_path, temperature=-1.0)
    assert not any(tmp_path.iterdir()), "nothing is written when the arguments are bad"


def test_files_have_the_documented_columns_and_consistent_rewards(default_task: tuple[Path, dict]) -> None:
    out, task = default_task
    assert json.loads((out / "task.json").read_text()) == task
    sft = _read_jsonl(out / "sft.jsonl")
    assert len(sft) == task["sizes"]["sft"] == 2000
    assert all(set(row) == {"prompt", "completion"} and row["completion"] for row in sft)
    prompts = _read_jsonl(out / "prompts.jsonl")
    assert len(prompts) == 200 and all(set(row) == {"prompt"} for row in prompts)
    assert len({row["prompt"] for row in prompts[:160]}) == 160, "the first pass covers every prompt once"
    for name, size in (("preferences_train.jsonl", 2000), ("preferences_test.jsonl", 400)):
        rows = _read_jsonl(out / name)
        assert len(rows) == size
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}
            assert row["chosen"] != row["rejected"]
            assert row["chosen_gold"] == pytest.approx(gold_reward(row["prompt"], row["chosen"]), abs=1e-6)
            assert row["rejected_gold"] == pytest.approx(gold_reward(row["prompt"], row["rejected"]), abs=1e-6)
    for row in sft + prompts:
        parse_prompt(row["prompt"])  # every prompt parses
    assert task["ideal_mean_gold_reward"] == pytest.approx(GOLD_REWARD_MAX)


def test_labels_follow_gold_reward_noisily_near_the_bayes_accuracy(default_task: tuple[Path, dict]) -> None:
    out, task = default_task
    rows = _read_jsonl(out / "preferences_train.jsonl")
    chosen = [row["chosen_gold"] for row in rows]
    rejected = [row["rejected_gold"] for row in rows]
    agreement = label_agreement(chosen, rejected)
    assert 0.6 < agreement < 0.97, "labels should beat chance but be noisy"
    assert sum(c < r for c, r in zip(chosen, rejected)) > 50, "some labels prefer the gold-worse response"
    # E[agreement] = Bayes accuracy; its standard error on 2000 pairs is about 0.009
    assert agreement == pytest.approx(task["bayes_accuracy_train"], abs=0.03)
    assert task["bayes_accuracy_train"] == pytest.approx(bayes_accuracy(chosen, rejected, 0.2))
    assert 0.6 < task["bayes_accuracy_test"] < 1.0


def test_lower_temperature_means_less_label_noise(tmp_path: Path) -> None:
    sizes = dict(n_sft=1, n_pref_train=500, n_pref_test=1, n_prompts=1)
    sharp = generate_task(tmp_path / "sharp", temperature=0.05, **sizes)
    noisy = generate_task(tmp_path / "noisy", temperature=1.0, **sizes)
    assert sharp["bayes_accuracy_train"] > noisy["bayes_accuracy_train"] + 0.1
    assert sharp["label_agreement_train"] > noisy["label_agreement_train"] + 0.1


def test_demonstrations_are_of_mixed_quality_and_rarely_repeat(default_task: tuple[Path, dict]) -> None:
    out, task = default_task
    sft = _read_jsonl(out / "sft.jsonl")
    gold = [gold_reward(row["prompt"], row["completion"]) for row in sft]
    assert statistics.pstdev(gold) > 0.2
    assert 0.05 < sum(score == pytest.approx(GOLD_REWARD_MAX) for score in gold) / len(gold) < 0.5
    assert sum(score < GOLD_REWARD_MAX / 2 for score in gold) > 20, "some demonstrations are poor"
    assert task["sft_mean_gold_reward"] == pytest.approx(statistics.mean(gold), abs=1e-6)
    assert task["sft_mean_gold_reward"] < task["ideal_mean_gold_reward"] - 0.3, "SFT alone leaves headroom"
    repeats = sum(len(set(extract_words(row["completion"]))) < len(extract_words(row["completion"])) for row in sft)
    assert 0 < repeats / len(sft) < 0.15, "repeats exist but are rare (why a learned RM can miss diversity)"
