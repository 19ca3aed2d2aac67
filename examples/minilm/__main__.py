"""``python -m examples.minilm``: all-MiniLM-L6-v2, float vs nearest rounding vs AdaRound
(mean cosine to the float embeddings, nearest-neighbour agreement)."""

from __future__ import annotations

import argparse
import logging

from examples.chain import quantize_and_compare
from examples.cli import adaround_config_from, add_quantization_options, print_result, qconfig_from
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
    result = quantize_and_compare(minilm(), data, embedding_agreement, qconfig_from(args),
                                  adaround_config_from(args), args.batch_size)
    activations = args.activation_bits or "float"
    print_result(f"all-MiniLM-L6-v2 W{args.weight_bits}A{activations}, {args.num_calibration} "
                 f"calibration / {args.num_evaluation} evaluation sentences, "
                 f"{args.steps} steps per layer", result)


if __name__ == "__main__":
    main()
