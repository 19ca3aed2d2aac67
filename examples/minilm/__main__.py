"""``python -m examples.minilm``: all-MiniLM-L6-v2, float vs nearest rounding vs AdaRound
(mean cosine to the float embeddings, nearest-neighbour agreement)."""

from __future__ import annotations

import argparse
import logging

from examples.cli import add_quantization_options, run_and_print
from examples.minilm.data import stdlib_text
from examples.minilm.metrics import embedding_agreement
from examples.minilm.model import minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_quantization_options(parser, steps=200)
    parser.add_argument("--num-calibration", type=int, default=256)
    parser.add_argument("--num-evaluation", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = stdlib_text(args.num_calibration, args.num_evaluation, args.max_length, args.seed)
    run_and_print("all-MiniLM-L6-v2", minilm(), data, embedding_agreement, args,
                  f"{args.num_calibration} calibration / {args.num_evaluation} evaluation "
                  "sentences")


if __name__ == "__main__":
    main()
