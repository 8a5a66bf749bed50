"""Hugging Face-format model folders built locally, standing in for pretrained models (no hub here).

Each folder is what ``save_pretrained`` of a model and its tokenizer writes, as a downloaded
checkpoint would hold: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
tokenizer files. The tokenizers are trained with the ``tokenizers`` library on the synthetic
task's texts (so the pipeline's data has few unknown tokens), and neither has a pad token:

- :func:`llama_folder`: a Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output
  layer) with a Metaspace BPE tokenizer in the style of Llama/SentencePiece (``<s>`` added in
  front, ``<unk>``), ChatML role markers and a ChatML ``chat_template``; eos is ``<|im_end|>``,
  the end of a turn, as in ChatML chat models.
- :func:`gpt2_folder`: a GPT-2 with a byte-level BPE whose only special token is
  ``<|endoftext|>`` (bos = eos = unk), and no chat template (``rlhf_core.models.demo_base``, the
  builder the README's walkthrough uses, at this module's tiny size).
"""

from __future__ import annotations

import string
from functools import cache
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@cache
def training_texts(n: int = 400) -> tuple[str, ...]:
    """Prompts and answers of the synthetic task (the pipeline's default data), plus role names."""
    import tempfile

    from rlhf_core.data.loading import load_records
    from rlhf_core.synthetic import generate_task

    with tempfile.TemporaryDirectory() as tmp:
        generate_task(Path(tmp), seed=1, n_sft=n, n_pref_train=n, n_pref_test=8, n_prompts=8, temperature=0.2)
        sft = load_records(Path(tmp) / "sft.jsonl")
        pref = load_records(Path(tmp) / "preferences_train.jsonl")
        texts = [*sft["prompt"], *sft["completion"], *pref["chosen"], *pref["rejected"]]
    return (*texts, "system user assistant")


def llama_folder(dest: Path, *, max_position_embeddings: int = 96, seed: int = 0) -> Path:
    """A tiny Llama checkpoint with a ChatML tokenizer that has no pad token (see the module docstring)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[c for c in string.printable if c != " "] + ["\u2581"])  # ▁: Metaspace's space
    backend.train_from_iterator(training_texts(), trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<unk>", chat_template=CHATML_TEMPLATE)
    assert tokenizer.pad_token is None
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def gpt2_folder(dest: Path, *, n_positions: int = 96, seed: int = 0) -> Path:
    """A tiny GPT-2 checkpoint with a byte-level BPE, ``<|endoftext|>`` only, no pad token, no chat template."""
    from rlhf_core.models.demo_base import build_gpt2_folder

    return build_gpt2_folder(dest, training_texts(), vocab_size=400, n_positions=n_positions, n_embd=32, n_layer=1,
                             n_head=4, seed=seed)
