"""Wall time of ``train_tokenizer`` (the from-scratch tokenizer ``prepare`` trains) by corpus size.

    python -m bench.tokenizer [--texts 10000 50000] [--vocab 512] [--repeats 3]

Texts are random sentences over a small vocabulary (as in ``tests/test_models.py``); the median
of ``--repeats`` runs is reported per size, with the vocabulary it reached.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from bench.common import OFFLINE_ENV, markdown_table, median

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "red", "big", "small", "ball", "house,", "said:",
         "hello", "world!", "42", "7", "yes", "no"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    from rlhf_core.models import train_tokenizer

    rows = []
    for n in args.texts:
        texts = make_texts(n, seed=1)
        seconds, vocab = [], 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            vocab = len(train_tokenizer(texts, vocab_size=args.vocab))
            seconds.append(time.perf_counter() - started)
        rows.append([f"{n:,}", str(vocab), f"{median(seconds):.2f}", f"{min(seconds):.2f}"])
    print(markdown_table(["texts", "vocab", "median s", "min s"], rows))


if __name__ == "__main__":
    main()
