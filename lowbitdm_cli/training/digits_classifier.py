"""Train the digits evaluator's classifier and write its reference statistics into the weights folder::

    python -m lowbitdm_cli.training.digits_classifier

Writes ``digits_classifier.safetensors`` and ``digits_ref_stats.safetensors``. (The training
function itself still lives beside the evaluator, `evaluation.digits_features`.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbitdm_cli.evaluation.digits_features import train_digits_classifier
from lowbitdm_cli.models.digits import WEIGHTS_DIR

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    print(json.dumps(train_digits_classifier(args.out, epochs=args.epochs), indent=2))


if __name__ == "__main__":
    main()
