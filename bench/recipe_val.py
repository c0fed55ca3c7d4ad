"""The shipped recipe choices, measured on val: each choice against its alternative, one seed.

Each arm trains one method through the project's training loop (``bench.binding.measure``: params.yaml
plus the arm's overrides, seed 0, early stopping on val) and scores **val**: RSUM and the binding
probe on val's own twins (``eval/val_index.json``), overall and per swap kind with 95 % CIs over
twin pairs. ``joint`` arms are also scored at fusion alpha 0.75 and 1.0 (an evaluation knob: the
same weights re-ranked). The choices measured (params.yaml keys):

- ``methods.joint.dropout``: 0.0 vs 0.1
- ``methods.joint.shared_projections``: false vs true
- ``methods.joint.matcher``: late vs cross
- ``methods.cross_attention.matcher``: late vs cross
- ``methods.joint.fusion_alpha``: 1.0 vs 0.75 (from every joint arm, no extra training)

    python -m bench.recipe_val --epochs 4                 # all arms on val, 4 epochs each
    python -m bench.recipe_val --final --arms joint cross_attention   # params.yaml as shipped, on TEST

Writes ``bench/results/recipe_val.json`` (``--final``: ``recipe_final.json``) after every arm, with
the command, the machine and its load; an arm already there with the same overrides and epochs is
skipped, so an interrupted bench resumes. Prints one line per arm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from bench.binding import measure
from bench.splits import add_final_flag, scored_split

RESULTS = Path(__file__).resolve().parent / "results"
# arm name -> (method, overrides over params.yaml); the first arm of a method is params.yaml as shipped
ARMS = {
    "joint": ("joint", []),
    "joint-dropout-0.1": ("joint", ["methods.joint.dropout=0.1"]),
    "joint-shared-projections": ("joint", ["methods.joint.shared_projections=true"]),
    "joint-matcher-cross": ("joint", ["methods.joint.matcher=cross"]),
    "cross_attention": ("cross_attention", []),
    "cross_attention-matcher-cross": ("cross_attention", ["methods.cross_attention.matcher=cross"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs of every arm (default: params.yaml's)")
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--out", type=Path, default=None)
    add_final_flag(ap)
    args = ap.parse_args(argv)
    split = scored_split(args.final)
    if args.final and any(ARMS[a][1] for a in args.arms):
        print("error: --final scores the chosen configuration only: params.yaml as shipped (arms without "
              f"overrides: {[a for a, (_, o) in ARMS.items() if not o]})", file=sys.stderr)
        return 2
    out = args.out or RESULTS / ("recipe_final.json" if args.final else "recipe_val.json")
    done = json.loads(out.read_text()) if out.exists() else {"runs": []}
    runs = done["runs"]
    epochs = ["train.epochs=%d" % args.epochs] if args.epochs else []
    command = "python -m bench.recipe_val " + " ".join(argv if argv is not None else sys.argv[1:])
    for arm in args.arms:
        method, sets = ARMS[arm]
        sets = [*sets, *epochs]
        if any(r["arm"] == arm and r["set"] == sets and r["split"] == split for r in runs):
            continue
        load = os.getloadavg()
        result = measure(args.root, method, sets, split, args.threads, params=args.params)
        runs.append({"arm": arm, "command": command, "load_average_before": [round(x, 2) for x in load], **result})
        record = {"what": "the shipped recipe choices against their alternatives, one seed (0), scored on "
                          + split, "split": split,
                  "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)", "runs": runs}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(out)
        b = result["binding"]["overall"]
        print(f"{arm:<32} {split} RSUM {result[f'{split}_rsum']:6.1f}  binding {b[2]:5.1f} [{b[3][0]:.1f}, "
              f"{b[3][1]:.1f}]  best epoch {result['best_epoch']}/{result['epochs']}  {result['train_seconds']:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
