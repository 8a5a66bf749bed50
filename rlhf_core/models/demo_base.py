"""A small pretrained-format model folder built locally, for trying ``model.name_or_path`` with no hub.

``build_gpt2_folder`` writes what ``save_pretrained`` of a GPT-2 and its tokenizer writes, as a
downloaded checkpoint holds it (``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json``): a GPT-2 with a byte-level BPE trained on the given
texts whose only special token is ``<|endoftext|>`` (bos = eos = unk), no pad token and no chat
template, as GPT-2 ships. Byte-level BPE spells any UTF-8 text, so real data has no unknown
tokens. The weights are freshly initialised (SFT is the first training the model gets). The
default shape is tiny, for CPU runs: context 512 (the shared HH-RLHF file's 95th-percentile
prompt fits, so the gate passes with every length ``auto``), width 32, one layer, a 2,000-token
vocabulary.

Command line (the texts: every string in every record of the data files, any supported format)::

    .venv/bin/python -m rlhf_core.models.demo_base base-models/demo-gpt2 --texts data/alpaca.json data/hh.jsonl.gz
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOT = "<|endoftext|>"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def texts_of(sources: Iterable[str | Path]) -> Iterator[str]:
    """Every string value (nested ones included) of every parsed record of ``sources``, in file order."""
    from rlhf_core.data.rows import read_rows

    for source in sources:
        for row in read_rows(source).rows:
            if row.problem is None:
                yield from _strings(row.record)


def build_gpt2_folder(
    dest: str | Path, texts: Iterable[str], *, vocab_size: int = 2000, n_positions: int = 512, n_embd: int = 32,
    n_layer: int = 1, n_head: int = 4, seed: int = 0,
) -> Path:
    """Write a GPT-2 checkpoint and its byte-level BPE tokenizer (trained on ``texts``) to ``dest``; returns ``dest``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # seed the init without changing the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    dest = Path(dest)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_core.models.demo_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write (use it as model.name_or_path)")
    parser.add_argument("--texts", nargs="+", required=True, help="data files whose strings train the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--context", type=int, default=512, help="n_positions: the longest sequence")
    parser.add_argument("--width", type=int, default=32, help="n_embd")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dest = build_gpt2_folder(args.dest, texts_of(args.texts), vocab_size=args.vocab_size, n_positions=args.context,
                             n_embd=args.width, n_layer=args.layers, n_head=args.heads, seed=args.seed)
    print(f"wrote {dest}: GPT-2 (context {args.context}, width {args.width}, layers {args.layers}, vocabulary "
          f"{args.vocab_size}); use it with --set model.name_or_path={dest.resolve()}")


if __name__ == "__main__":
    main()
