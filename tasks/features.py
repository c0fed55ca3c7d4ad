"""``python -m tasks.features``: frozen-encoder features of every prepared split (crossalign.features.stage)."""
from __future__ import annotations

import sys

from crossalign.features import stage as features
from tasks._stage import stage_main


def main(argv: list[str] | None = None) -> int:
    def add_args(parser) -> None:
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    return stage_main("Encode data/prepared/<split> into data/features/<split> and eval/test_index.json.",
                      lambda args, cfg, root: features.run(cfg, root, progress=not args.no_progress),
                      argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
