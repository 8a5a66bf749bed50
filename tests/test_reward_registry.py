"""Reward functions by name: hand-computed ROUGE-L and BLEU, naive LCS, rules, import paths, clear errors."""

from __future__ import annotations

import itertools
import math
import sys
import types

import pytest

from rlhf_core.reward_registry import BUILTIN, build_reward, lcs_length, rouge_l_f1, sentence_bleu, words


def _naive_lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by trying every subsequence of the shorter list (tiny inputs only)."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for k in range(len(short), 0, -1):
        for combo in itertools.combinations(short, k):
            it = iter(long_)
            if all(tok in it for tok in combo):
                return k
    return 0


@pytest.mark.parametrize("a,b", [("a b c d", "a c d b"), ("x y", "y x"), ("a a b", "a b a b"), ("", "a"), ("p q r", "s t")])
def test_lcs_matches_brute_force(a, b):
    assert lcs_length(a.split(), b.split()) == _naive_lcs(a.split(), b.split())


def test_rouge_l_hand_computed():
    # candidate "the cat sat on mat" vs reference "the cat is on the mat": LCS = the cat on mat = 4
    p, r = 4 / 5, 4 / 6
    assert rouge_l_f1("The cat sat on mat", "the cat is on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l_f1("identical words here", "identical words here") == pytest.approx(1.0)
    assert rouge_l_f1("nothing shared", "other words") == 0.0


def test_bleu_hand_computed():
    # c = "a b c d" (4 tokens), r = "a b c e f" (5 tokens)
    # p1 = 3/4; p2 = (2+1)/(3+1); p3 = (1+1)/(2+1); p4 = (0+1)/(1+1); BP = exp(1 - 5/4)
    expected = math.exp(1 - 5 / 4) * math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert sentence_bleu("a b c d", "a b c e f") == pytest.approx(expected)
    assert sentence_bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert sentence_bleu("z", "a b") == 0.0
    assert sentence_bleu("", "a b") == 0.0


def test_words_split_punctuation_and_lowercase():
    assert words("Apple, PEAR.") == ["apple", ",", "pear", "."]


def test_reference_metrics_score_against_the_prompts_reference_and_zero_without_one():
    fn = build_reward("rouge_l", references={"q1": "red apple"})
    assert fn(["q1", "q2"], ["red apple", "red apple"]) == [pytest.approx(1.0), 0.0]
    bleu = build_reward("bleu", references={"q1": "one two three four"})
    assert bleu(["q1"], ["one two three four"]) == [pytest.approx(1.0)]


def test_rules_and_gold():
    fmt = build_reward("format", {"pattern": r"[a-z ]+\."})
    assert fmt(["p", "p"], ["  apple pear. ", "Apple!"]) == [1.0, 0.0]
    length = build_reward("length", {"target": 4})
    assert length(["p"] * 3, ["a b c d", "a b", "a b c d e f g h i"]) == [1.0, 0.5, 0.0]
    gold = build_reward("gold")
    from rlhf_core.synthetic import GoldReward

    prompts, responses = ["List 3 fruit words.", "Give me 2 animal words."], ["apple pear fig.", "cat cat"]
    assert gold(prompts, responses) == GoldReward()(prompts, responses)
    assert gold(prompts, responses)[0] == pytest.approx(2.25)  # the ideal answer scores the documented maximum


def test_a_users_function_by_import_path_and_a_factory_with_settings(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.score = lambda prompts, responses: [float(len(r)) for r in responses]
    module.make = lambda bonus: (lambda prompts, responses: [bonus] * len(responses))
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert build_reward("my_rewards:score")(["p"], ["abc"]) == [3.0]
    assert build_reward("my_rewards:make", {"bonus": 2.5})(["p", "q"], ["a", "b"]) == [2.5, 2.5]


def test_errors_name_the_choices_and_what_is_missing():
    with pytest.raises(ValueError, match="built-ins are") as err:
        build_reward("rouge")
    assert all(name in str(err.value) for name in BUILTIN)
    with pytest.raises(ValueError, match="reference answers"):
        build_reward("bleu")
    with pytest.raises(ValueError, match="pattern"):
        build_reward("format")
    with pytest.raises(ValueError, match="target"):
        build_reward("length", {"target": 0})
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("no_such_module_xyz:score")
