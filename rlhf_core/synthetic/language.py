"""The synthetic task's language: topics and their words, prompt templates, prompt parsing.

A prompt asks for ``n`` words of one topic, e.g. ``"List 3 fruit words."``; the ideal response is
``n`` distinct words of that topic separated by single spaces and ending with a period:
``"apple pear fig."``. The space of prompts is small on purpose (4 templates x 8 topics x n in 2..6
= 160 prompts) so that a tiny model trained from scratch on a CPU learns it in about a minute.

Everything here is a constant or a pure function of its arguments; randomness comes from the
caller's ``random.Random``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Final

__all__ = [
    "MAX_N",
    "MIN_N",
    "TEMPLATES",
    "TOPICS",
    "WORD_TOPIC",
    "all_prompts",
    "extract_words",
    "format_response",
    "make_prompt",
    "parse_prompt",
    "sample_prompt",
]

TOPICS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "fruit": ("apple", "pear", "fig", "grape", "lemon", "mango", "peach", "plum", "cherry", "banana"),
    "animal": ("cat", "dog", "horse", "cow", "sheep", "lion", "tiger", "mouse", "rabbit", "fox"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "pliers", "axe", "ladder"),
    "body": ("hand", "foot", "head", "arm", "leg", "knee", "elbow", "nose", "ear", "shoulder"),
    "weather": ("rain", "snow", "wind", "storm", "fog", "sun", "cloud", "hail", "thunder", "frost"),
    "vehicle": ("car", "bus", "truck", "train", "bike", "boat", "plane", "tram", "van", "taxi"),
    "clothing": ("shirt", "coat", "hat", "sock", "shoe", "scarf", "glove", "dress", "skirt", "jacket"),
})
"""Topic -> its 10 words. Every word is lowercase ASCII letters and belongs to exactly one topic."""

WORD_TOPIC: Final[Mapping[str, str]] = MappingProxyType(
    {word: topic for topic, words in TOPICS.items() for word in words}
)
"""Word -> the one topic it belongs to (the inverse of :data:`TOPICS`)."""

TEMPLATES: Final[tuple[str, ...]] = (
    "List {n} {topic} words.",
    "Name {n} words about {topic}.",
    "Give me {n} {topic} words.",
    "Write {n} words related to {topic}.",
)
"""Prompt templates; each has exactly one ``{n}`` and one ``{topic}``."""

MIN_N: Final[int] = 2
MAX_N: Final[int] = 6
"""Range (inclusive) of the number of words the generator asks for."""

_WORD_RE: Final = re.compile(r"[a-z0-9]+")


def make_prompt(topic: str, n: int, template: int = 0) -> str:
    """The prompt asking for ``n`` words of ``topic`` with template number ``template`` (0..3)."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    return TEMPLATES[template].format(n=n, topic=topic)


def all_prompts() -> list[str]:
    """Every prompt of the task (template x topic x n in MIN_N..MAX_N), in a fixed order."""
    return [
        make_prompt(topic, n, template)
        for template in range(len(TEMPLATES))
        for topic in TOPICS
        for n in range(MIN_N, MAX_N + 1)
    ]


def sample_prompt(rng: random.Random) -> str:
    """One prompt with template, topic and n drawn uniformly from ``rng``."""
    template = rng.randrange(len(TEMPLATES))
    topic = rng.choice(tuple(TOPICS))
    n = rng.randint(MIN_N, MAX_N)
    return make_prompt(topic, n, template)


@lru_cache(maxsize=1)
def _prompt_patterns() -> tuple[re.Pattern[str], ...]:
    patterns = []
    for template in TEMPLATES:
        regex = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{topic\}", r"(?P<topic>[a-z]+)")
        patterns.append(re.compile(regex))
    return tuple(patterns)


def parse_prompt(prompt: str) -> tuple[str, int]:
    """``(topic, n)`` of a task prompt; surrounding whitespace is ignored.

    Accepts any ``n >= 1`` (not only the generator's 2..6), so the gold reward is defined for
    hand-written prompts too. Raises ``ValueError`` naming the prompt if it matches no template,
    names an unknown topic or asks for fewer than one word.
    """
    text = prompt.strip()
    for pattern in _prompt_patterns():
        match = pattern.fullmatch(text)
        if match is None:
            continue
        topic, n = match["topic"], int(match["n"])
        if topic not in TOPICS:
            raise ValueError(f"prompt {prompt!r}: unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
        if n < 1:
            raise ValueError(f"prompt {prompt!r}: asks for {n} words; must be >= 1")
        return topic, n
    raise ValueError(
        f"prompt {prompt!r} is not a synthetic-task prompt; expected one of the templates "
        + "; ".join(repr(t) for t in TEMPLATES)
    )


def extract_words(text: str) -> list[str]:
    """The words of ``text``: lowercased, split at anything that is not a letter or digit.

    So punctuation is stripped (``"Apple, pear!"`` -> ``["apple", "pear"]``) and digits count as
    (off-topic) words.
    """
    return _WORD_RE.findall(text.lower())


def format_response(words: Sequence[str], period: bool = True) -> str:
    """Words joined by single spaces, with a final ``"."`` unless ``period`` is false."""
    return " ".join(words) + ("." if period else "")
