"""Reward functions by name: what an online trainer (PPO, GRPO, RLOO) can be told to optimise.

A reward is a :class:`~rlhf_core.reward_sources.RewardFn` (``fn(prompts, responses) -> floats``).
``params.yaml`` names them (``{name: rouge_l, weight: 1.0}``); :func:`build_reward` turns a name
and its settings into the function. Built in, each with its range:

==============  ===========  ===============================================================
name            range        what it scores
==============  ===========  ===============================================================
``gold``        [0, 2.25]    the synthetic task's known reward (``rlhf_core.synthetic``)
``rouge_l``     [0, 1]       ROUGE-L F1 (Lin 2004) of the response's words against the
                             prompt's reference answer (longest common subsequence)
``bleu``        [0, 1]       sentence BLEU-4 (Papineni et al. 2002) against the reference,
                             add-one smoothed n-gram precisions (Lin & Och 2004), brevity penalty
``format``      {0, 1}       1 when the whole response matches ``pattern`` (a regex)
``length``      [0, 1]       ``max(0, 1 − |words − target| / target)``
==============  ===========  ===============================================================

Anything else with a colon is a user's function by import path, ``my_package.rewards:score``:
a :class:`RewardFn`, or a factory returning one when ``settings`` are given (called with them as
keyword arguments). Its range is the user's to document.

References (``rouge_l``, ``bleu``) come from the data: a mapping prompt → reference answer (the
SFT completion or the chosen response); a prompt without one scores 0.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rlhf_core.reward_sources import RewardFn

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (the unit of ROUGE-L, BLEU and ``length``)."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a|·|b|) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, §3.1 with β = 1): ``2PR/(P+R)``, ``P = LCS/|c|``, ``R = LCS/|r|``."""
    c, r = words(candidate), words(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU: ``BP · exp(Σ_n (1/N) log p_n)`` with clipped n-gram precisions ``p_n``.

    ``p_1`` is the plain clipped precision; ``p_n`` for ``n > 1`` is add-one smoothed,
    ``(matches + 1)/(total + 1)`` (Lin & Och 2004), so a short response is not zeroed by a missing
    4-gram. ``BP = 1`` when ``|c| > |r|``, else ``exp(1 − |r|/|c|)``; an empty response scores 0.
    """
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        cand, ref = _ngrams(c, n), _ngrams(r, n)
        matches = sum(min(count, ref[gram]) for gram, count in cand.items())
        total = max(len(c) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(log_sum / max_n)


@dataclass(frozen=True)
class ReferenceMetric:
    """A reward scoring each response against its prompt's reference answer with ``metric``."""

    metric: Callable[[str, str], float]
    references: Mapping[str, str]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.metric(resp, self.references[p]) if p in self.references else 0.0 for p, resp in zip(prompts, responses)]


@dataclass(frozen=True)
class FormatReward:
    """1.0 when the whole response (surrounding whitespace ignored) matches ``pattern``, else 0.0."""

    pattern: str

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        compiled = re.compile(self.pattern, re.DOTALL)
        return [1.0 if compiled.fullmatch(r.strip()) else 0.0 for r in responses]


@dataclass(frozen=True)
class LengthReward:
    """``max(0, 1 − |words − target| / target)``: 1 at ``target`` words, 0 at none or twice as many."""

    target: int

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [max(0.0, 1.0 - abs(len(r.split()) - self.target) / self.target) for r in responses]


def _gold(**_: Any) -> RewardFn:
    from rlhf_core.synthetic import GoldReward

    return GoldReward()


def _references(settings: dict[str, Any], name: str) -> Mapping[str, str]:
    refs = settings.pop("references", None)
    if refs is None:
        raise ValueError(f"reward {name!r} scores against reference answers; none were given (the data has no references)")
    return refs


def _format(*, pattern: str | None = None) -> RewardFn:
    if not pattern:
        raise ValueError("reward 'format' needs a 'pattern' (a regular expression the whole response must match)")
    re.compile(pattern)  # a bad pattern fails here, naming itself
    return FormatReward(pattern)


def _length(*, target: int | None = None) -> RewardFn:
    if not isinstance(target, int) or target <= 0:
        raise ValueError(f"reward 'length' needs 'target', a positive number of words, got {target!r}")
    return LengthReward(target)


BUILTIN: dict[str, Callable[..., RewardFn]] = {
    "gold": _gold,
    "rouge_l": lambda references, **kw: ReferenceMetric(rouge_l_f1, references),
    "bleu": lambda references, **kw: ReferenceMetric(sentence_bleu, references),
    "format": _format,
    "length": _length,
}
NEEDS_REFERENCES = {"rouge_l", "bleu"}


def build_reward(name: str, settings: Mapping[str, Any] | None = None, *,
                 references: Mapping[str, str] | None = None) -> RewardFn:
    """The reward function called ``name`` (a built-in or ``module.path:attribute``) with its ``settings``.

    Raises ``ValueError`` naming the choices for an unknown name, the missing setting, or the
    import path that does not resolve.
    """
    settings = dict(settings or {})
    if name in BUILTIN:
        if name in NEEDS_REFERENCES:
            settings["references"] = references
            return BUILTIN[name](_references(settings, name), **settings)
        return BUILTIN[name](**settings)
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: built-ins are {sorted(BUILTIN)}, or give an import path 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    fn = target(**settings) if settings else target
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable (expected fn(prompts, responses) -> list of floats)")
    return fn
