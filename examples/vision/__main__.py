"""``python -m examples.vision``: torchvision's ResNet-18 or MobileNetV2 (random weights,
BatchNorm statistics from the photo crops), float vs nearest rounding vs AdaRound
(top-1 agreement with the float model, output SNR)."""

from __future__ import annotations

import argparse
import logging

from examples.cli import add_quantization_options, run_and_print
from examples.vision import models
from examples.vision.data import photo_crops
from examples.vision.metrics import output_agreement

ARCHITECTURES = {"resnet18": models.resnet18, "mobilenet_v2": models.mobilenet_v2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=sorted(ARCHITECTURES))
    add_quantization_options(parser, steps=20)
    parser.add_argument("--num-calibration", type=int, default=64)
    parser.add_argument("--num-evaluation", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default=None, help="a local state_dict file; default: random")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = ARCHITECTURES[args.model](weights=args.weights, seed=args.seed,
                                      image_size=args.image_size)
    data = photo_crops(args.num_calibration, args.num_evaluation, args.image_size, args.seed)
    run_and_print(args.model, model, data, output_agreement, args,
                  f"{args.image_size}px, {args.num_calibration} calibration / "
                  f"{args.num_evaluation} evaluation crops")


if __name__ == "__main__":
    main()
