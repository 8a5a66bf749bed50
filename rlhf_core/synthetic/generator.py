"""The synthetic task's data: a mixed-quality demonstrator, noisy preference labels, the dataset writer.

**Demonstrator** (:func:`sample_response`). Each example draws a quality ``q ~ U(0, 1)``; then

1. length: ``k = n + offset`` with ``offset = 0`` with probability ``0.25 + 0.75 q``, else uniform
   in {-2, -1, +1, +2}; at least one word;
2. words: each word is on-topic with probability ``0.25 + 0.75 q``, else a word of another topic;
   words are drawn without replacement, so they are distinct ...
3. ... except that with probability ``0.15 (1 - q)`` (once per response, if ``k >= 2``) one word
   after the first is replaced by a copy of an earlier word. Repeats are therefore rare (about
   7.5% of demonstrations), which is why a learned reward model can miss the ``diversity`` part
   of the gold reward (see :mod:`rlhf_core.synthetic.gold_reward`);
4. the final ``"."`` is omitted with probability ``0.3 (1 - q)``.

At ``q = 1`` the demonstrator is ideal; at ``q = 0`` it is mostly off-topic, and over ``q ~ U(0, 1)``
demonstrations are of mixed quality, so SFT alone is mediocre and PPO/DPO have headroom.

**Preferences** (:func:`sample_preference`). For a prompt, two independent demonstrations ``a`` and
``b`` (resampled while identical) are labelled by a simulated annotator following Bradley-Terry with
a temperature ``τ``::

    P(a ≻ b) = σ((R(a) − R(b)) / τ)                                  (1)

with ``R`` the gold reward; the label is drawn from (1), so labels are noisy like human ones.
The best possible classifier (which knows ``R``) picks the gold-better response and is right with
probability ``max(p, 1 − p)``; its mean over pairs is the Bayes accuracy (:func:`bayes_accuracy`),
the ceiling of any reward model's held-out accuracy.

**Writer** (:func:`generate_task`). Deterministic in ``seed``: each file draws from its own
``random.Random`` seeded with ``"rlhf_core.synthetic:<seed>:<file>"`` (string seeds are hashed with
SHA-512, stable across processes), so the same seed gives byte-identical files and changing one
file's size leaves the other files unchanged.

The prompt space holds only 160 prompts, so ``prompts.jsonl`` cannot be disjoint from the training
prompts: it cycles through every prompt in a seeded shuffled order (distinct when ``n_prompts <= 160``),
and is held out in the sense that evaluation samples fresh responses for it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from rlhf_core.synthetic.gold_reward import GOLD_REWARD_MAX, REWARD_WEIGHTS, gold_reward
from rlhf_core.synthetic.language import (
    MAX_N,
    MIN_N,
    TEMPLATES,
    TOPICS,
    WORD_TOPIC,
    all_prompts,
    format_response,
    parse_prompt,
    sample_prompt,
)

__all__ = [
    "bayes_accuracy",
    "generate_task",
    "ideal_response",
    "label_agreement",
    "preference_probability",
    "sample_preference",
    "sample_response",
]

_ROUND: Final[int] = 6
"""Decimals of the rewards written to the files (exact rewards are small-denominator fractions)."""


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows, even for a tiny temperature.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def sample_response(rng: random.Random, topic: str, n: int, quality: float) -> str:
    """One demonstration for a request of ``n`` words of ``topic``; steps 1-4 of the module docstring.

    ``quality`` in [0, 1]: 1 gives the ideal response, 0 a mostly off-topic one.
    """
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
    if not 1 <= n <= len(WORD_TOPIC) - 2:  # room for n + 2 distinct words
        raise ValueError(f"n must be in 1..{len(WORD_TOPIC) - 2}, got {n}")
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    p_good = 0.25 + 0.75 * quality
    offset = 0 if rng.random() < p_good else rng.choice((-2, -1, 1, 2))
    k = max(1, n + offset)
    on_pool = list(TOPICS[topic])
    off_pool = [word for word in WORD_TOPIC if WORD_TOPIC[word] != topic]
    words: list[str] = []
    for _ in range(k):
        pool = on_pool if (rng.random() < p_good and on_pool) else off_pool
        words.append(pool.pop(rng.randrange(len(pool))))  # without replacement: distinct words
    if k >= 2 and rng.random() < 0.15 * (1.0 - quality):
        j = rng.randrange(1, k)
        words[j] = words[rng.randrange(j)]
    period = rng.random() >= 0.3 * (1.0 - quality)
    return format_response(words, period=period)


def ideal_response(prompt: str, rng: random.Random) -> str:
    """An ideal response to ``prompt``: ``n`` distinct on-topic words in random order, then ``"."``."""
    topic, n = parse_prompt(prompt)
    if n > len(TOPICS[topic]):
        raise ValueError(f"prompt {prompt!r}: asks for {n} distinct words but topic {topic!r} has {len(TOPICS[topic])}")
    return format_response(rng.sample(TOPICS[topic], n))


def preference_probability(reward_a: float, reward_b: float, temperature: float) -> float:
    """``P(a ≻ b) = σ((R(a) − R(b)) / τ)``: Eq. (1), Bradley-Terry with temperature ``τ``."""
    _check_temperature(temperature)
    return _sigmoid((reward_a - reward_b) / temperature)


def sample_preference(rng: random.Random, prompt: str, temperature: float) -> dict[str, Any]:
    """One labelled pair for ``prompt``: ``{prompt, chosen, rejected, chosen_gold, rejected_gold}``.

    Two independent demonstrations (each with its own quality ``q ~ U(0, 1)``, the second
    resampled while identical to the first); the winner is drawn from Eq. (1).
    """
    topic, n = parse_prompt(prompt)
    a = sample_response(rng, topic, n, rng.random())
    b = sample_response(rng, topic, n, rng.random())
    while b == a:
        b = sample_response(rng, topic, n, rng.random())
    gold_a, gold_b = gold_reward(prompt, a), gold_reward(prompt, b)
    a_wins = rng.random() < preference_probability(gold_a, gold_b, temperature)
    (chosen, chosen_gold), (rejected, rejected_gold) = ((a, gold_a), (b, gold_b)) if a_wins else ((b, gold_b), (a, gold_a))
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_gold": round(chosen_gold, _ROUND),
        "rejected_gold": round(rejected_gold, _ROUND),
    }


def bayes_accuracy(gold_a: Sequence[float], gold_b: Sequence[float], temperature: float) -> float:
    """Accuracy of the best possible classifier of labels drawn from Eq. (1): ``mean_i max(p_i, 1 − p_i)``.

    ``p_i = σ((gold_a[i] − gold_b[i]) / τ)``; symmetric in a and b, so (chosen, rejected) works as well
    as the original order. Pairs with equal gold reward contribute 0.5.
    """
    _check_temperature(temperature)
    if len(gold_a) != len(gold_b) or not gold_a:
        raise ValueError(f"bayes_accuracy needs two equal, non-empty lists; got {len(gold_a)} and {len(gold_b)}")
    total = 0.0
    for ra, rb in zip(gold_a, gold_b):
        p = preference_probability(ra, rb, temperature)
        total += max(p, 1.0 - p)
    return total / len(gold_a)


def label_agreement(chosen_gold: Sequence[float], rejected_gold: Sequence[float]) -> float:
    """Share of pairs whose label agrees with the gold ordering (ties count ½).

    Its expectation under Eq. (1) is exactly :func:`bayes_accuracy`.
    """
    if len(chosen_gold) != len(rejected_gold) or not chosen_gold:
        raise ValueError(f"label_agreement needs two equal, non-empty lists; got {len(chosen_gold)} and {len(rejected_gold)}")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_gold, rejected_gold)) / len(chosen_gold)


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"rlhf_core.synthetic:{seed}:{name}")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _unique_rows(make_row: Callable[[], dict[str, Any]], n_rows: int, key: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """``n_rows`` rows with distinct ``key`` columns: real datasets are deduplicated, and the
    validation gate rejects duplicate pairs, so the generator resamples duplicates."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for _ in range(50 * n_rows):
        row = make_row()
        k = tuple(row[c] for c in key)
        if k not in seen:
            seen.add(k)
            rows.append(row)
            if len(rows) == n_rows:
                return rows
    raise ValueError(f"cannot draw {n_rows} distinct {what} from the synthetic language; ask for fewer")


def _sft_rows(rng: random.Random, n_rows: int) -> list[dict[str, Any]]:
    def row() -> dict[str, Any]:
        prompt = sample_prompt(rng)
        topic, n = parse_prompt(prompt)
        return {"prompt": prompt, "completion": sample_response(rng, topic, n, rng.random())}

    return _unique_rows(row, n_rows, ("prompt", "completion"), "SFT demonstrations")


def _preference_rows(rng: random.Random, n_rows: int, temperature: float) -> list[dict[str, Any]]:
    return _unique_rows(lambda: sample_preference(rng, sample_prompt(rng), temperature), n_rows,
                        ("prompt", "chosen", "rejected"), "preference pairs")


def _heldout_prompts(rng: random.Random, n_rows: int) -> list[str]:
    prompts: list[str] = []
    while len(prompts) < n_rows:  # shuffled passes over the whole prompt space: balanced coverage
        cycle = all_prompts()
        rng.shuffle(cycle)
        prompts.extend(cycle)
    return prompts[:n_rows]


def _pair_stats(rows: Sequence[dict[str, Any]], temperature: float) -> tuple[float, float]:
    chosen = [row["chosen_gold"] for row in rows]
    rejected = [row["rejected_gold"] for row in rows]
    return bayes_accuracy(chosen, rejected, temperature), label_agreement(chosen, rejected)


def generate_task(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_sft: int = 2000,
    n_pref_train: int = 2000,
    n_pref_test: int = 400,
    n_prompts: int = 200,
    temperature: float = 0.2,
) -> dict[str, Any]:
    """Write the synthetic task into ``out_dir`` (created if missing) and return ``task.json``'s content.

    Files: ``sft.jsonl`` (prompt, completion), ``preferences_train.jsonl`` and
    ``preferences_test.jsonl`` (prompt, chosen, rejected, chosen_gold, rejected_gold),
    ``prompts.jsonl`` (prompt) and ``task.json`` (seed, sizes, temperature, reward weights, Bayes
    accuracy and empirical label agreement per preference split, mean gold reward of the SFT
    demonstrations and of ideal responses to the held-out prompts, the language).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    sizes = {"sft": n_sft, "preferences_train": n_pref_train, "preferences_test": n_pref_test, "prompts": n_prompts}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size of {name} must be an int >= 1, got {size!r}")
    _check_temperature(temperature)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sft = _sft_rows(_rng(seed, "sft"), n_sft)
    pref_train = _preference_rows(_rng(seed, "preferences_train"), n_pref_train, temperature)
    pref_test = _preference_rows(_rng(seed, "preferences_test"), n_pref_test, temperature)
    prompts = _heldout_prompts(_rng(seed, "prompts"), n_prompts)
    ideal_rng = _rng(seed, "ideal")
    ideal_gold = [gold_reward(p, ideal_response(p, ideal_rng)) for p in prompts]

    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "preferences_train.jsonl", pref_train)
    _write_jsonl(out / "preferences_test.jsonl", pref_test)
    _write_jsonl(out / "prompts.jsonl", ({"prompt": p} for p in prompts))

    bayes_train, agreement_train = _pair_stats(pref_train, temperature)
    bayes_test, agreement_test = _pair_stats(pref_test, temperature)
    task: dict[str, Any] = {
        "generator": "rlhf_core.synthetic",
        "seed": seed,
        "sizes": sizes,
        "temperature": temperature,
        "reward_weights": dict(REWARD_WEIGHTS),
        "gold_reward_max": GOLD_REWARD_MAX,
        "bayes_accuracy_train": round(bayes_train, _ROUND),
        "bayes_accuracy_test": round(bayes_test, _ROUND),
        "label_agreement_train": round(agreement_train, _ROUND),
        "label_agreement_test": round(agreement_test, _ROUND),
        "sft_mean_gold_reward": round(_mean([gold_reward(r["prompt"], r["completion"]) for r in sft]), _ROUND),
        "ideal_mean_gold_reward": round(_mean(ideal_gold), _ROUND),
        "n_range": [MIN_N, MAX_N],
        "templates": list(TEMPLATES),
        "topics": {topic: list(words) for topic, words in TOPICS.items()},
    }
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8", newline="\n")
    return task
