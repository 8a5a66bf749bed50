"""The synthetic task: the embedded default data of the pipeline, with a known gold reward.

A prompt asks for ``n`` words of a topic (``"List 3 fruit words."``); the ideal response is ``n``
distinct on-topic words ending with a period (``"apple pear fig."``). The gold reward is a pure,
documented function (:mod:`~rlhf_core.synthetic.gold_reward`), demonstrations are of mixed
quality and preference labels are drawn Bradley-Terry-style from the gold reward
(:mod:`~rlhf_core.synthetic.generator`), so every stage's effect is measurable on a CPU in minutes.

Modules: :mod:`~rlhf_core.synthetic.language` (vocabulary, prompts), :mod:`~rlhf_core.synthetic.gold_reward`,
:mod:`~rlhf_core.synthetic.generator` (demonstrator, preferences, dataset writer).
"""

from rlhf_core.synthetic.generator import (
    bayes_accuracy,
    generate_task,
    ideal_response,
    label_agreement,
    preference_probability,
    sample_preference,
    sample_response,
)
from rlhf_core.synthetic.gold_reward import (
    GOLD_REWARD_MAX,
    REWARD_WEIGHTS,
    GoldReward,
    gold_reward,
    gold_reward_components,
    is_well_formed,
)
from rlhf_core.synthetic.language import (
    MAX_N,
    MIN_N,
    TEMPLATES,
    TOPICS,
    WORD_TOPIC,
    all_prompts,
    extract_words,
    format_response,
    make_prompt,
    parse_prompt,
    sample_prompt,
)

__all__ = [
    "GOLD_REWARD_MAX",
    "MAX_N",
    "MIN_N",
    "REWARD_WEIGHTS",
    "TEMPLATES",
    "TOPICS",
    "WORD_TOPIC",
    "GoldReward",
    "all_prompts",
    "bayes_accuracy",
    "extract_words",
    "format_response",
    "generate_task",
    "gold_reward",
    "gold_reward_components",
    "ideal_response",
    "is_well_formed",
    "label_agreement",
    "make_prompt",
    "parse_prompt",
    "preference_probability",
    "sample_preference",
    "sample_prompt",
    "sample_response",
]
