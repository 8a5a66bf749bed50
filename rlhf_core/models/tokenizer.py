"""Tokenizers: a byte-level BPE trained from scratch, or a pretrained one loaded with a pad token.

A pretrained tokenizer is used as it is: its vocabulary, special tokens and chat template are
never retrained or extended. When it has no pad token, :func:`load_tokenizer` borrows the eos
token as pad IN MEMORY only (batches mark padding with attention masks, so the pad id never
reaches what the model computes), and :func:`save_tokenizer` writes the files it was loaded from,
byte for byte, so every saved model carries the pretrained tokenizer unchanged.

The from-scratch tokenizer is what the tiny embedded-default model uses. Its special tokens:

- ``<|pad|>``, ``<|bos|>``, ``<|eos|>``: set as the wrapper's pad/bos/eos tokens;
- ``<|system|>``, ``<|user|>``, ``<|assistant|>``: role markers of the chat template.

No unknown token is needed: byte-level BPE can spell any UTF-8 text from its 256 byte symbols.
``encode`` adds no bos/eos by itself; the data code decides where they go.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], ROLE_TOKENS["system"]]

# Each message renders as "<|role|>content\n"; add_generation_prompt appends "<|assistant|>".
# The role tokens are written as literals (not built as '<|' + role + '|>') so transformers can
# recognise them as the template's control tokens, and an unknown role fails loudly.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>' }}"
    "{%- else -%}{{ raise_exception('chat template: unknown role ' ~ message['role'] ~ "
    "'; expected system, user or assistant') }}"
    "{%- endif -%}"
    "{{ message['content'] ~ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (``tokenizers`` library) on ``texts``.

    Args:
        texts: training texts; any iterable (a generator is consumed once).
        vocab_size: upper bound on the vocabulary, special tokens and the 256 byte symbols included.
            The result can be smaller when the texts have too few frequent pairs to merge.
        min_frequency: a pair is merged only if it occurs at least this often.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos set, right padding and :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be >= {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a text's first word is encoded as written, so decode(encode(t)) == t.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..5 in this order: pad=0, bos=1, eos=2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        padding_side="right",
        clean_up_tokenization_spaces=False,  # clean-up would turn " ." into "." and break round trips
        chat_template=CHAT_TEMPLATE,
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer``, making sure it has a pad token (eos, borrowed in memory).

    Loaded from a folder, it remembers the folder, so :func:`save_tokenizer` copies its files as they are.
    ``trust_remote_code`` stays ``False`` unless the caller sets it: custom tokenizer code in a
    checkpoint is not executed by default.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if Path(name_or_path).is_dir():  # save_tokenizer writes these files again, unchanged
        setattr(tokenizer, _SOURCE, (Path(name_or_path).resolve(), len(tokenizer), tokenizer.chat_template))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token; set one before training")
        # Many causal LMs (GPT-2, Llama) ship without a pad token. Reusing eos adds no new embedding
        # row (the model and its vocabulary stay as they are), and is safe because this project marks
        # padding with attention masks, never by comparing ids with pad_token_id (which would also
        # hide real eos tokens). The borrowing lives in memory only: see save_tokenizer.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_SOURCE = "_rlhf_source"
"""Attribute :func:`load_tokenizer` sets: (folder, vocabulary size, chat template) as loaded."""

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates",
)
"""What ``AutoTokenizer`` reads from a model folder (besides ``config.json``), across tokenizer kinds."""


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files (and the ``additional_chat_templates`` folder) present in ``folder``."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).exists()]


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> list[str]:
    """Write ``tokenizer`` to ``out_dir``; returns the names written.

    A tokenizer :func:`load_tokenizer` read from a folder, and not changed since (same vocabulary
    size and chat template), is saved as a copy of that folder's tokenizer files: the pretrained
    tokenizer exactly as it came, without the pad token borrowed in memory. When its
    ``tokenizer_config.json`` names no ``tokenizer_class`` and ``out_dir`` holds no model, the
    source's ``config.json`` is copied too, since ``AutoTokenizer`` then picks the class from the
    model type. Any other tokenizer (e.g. one trained by :func:`train_tokenizer`) is written by
    its own ``save_pretrained``.
    """
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = getattr(tokenizer, _SOURCE, None)
    unchanged = source is not None and (len(tokenizer), tokenizer.chat_template) == source[1:]
    files = tokenizer_files(source[0]) if unchanged else []
    if files and source[0] == out_dir.resolve():  # saving where it was loaded from: already there
        return [p.name for p in files]
    if not files:
        return [Path(p).name for p in tokenizer.save_pretrained(str(out_dir))]
    config = source[0] / "tokenizer_config.json"
    if (source[0] / "config.json").is_file() and not (out_dir / "config.json").exists() and (
        not config.is_file() or not json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    ):
        files.append(source[0] / "config.json")
    for path in files:
        if path.is_dir():
            shutil.copytree(path, out_dir / path.name, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, out_dir / path.name)
    return [p.name for p in files]
