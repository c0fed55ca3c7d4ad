"""Training-step time, interleaved: the old batch gather (whole split widened to float32 in
RAM, ``SplitTensors``, reproduced below) vs ``crossalign.train.batches.DeviceSplit`` (fp16 in RAM; methods
that read pooled features only skip the tokens). Default set's shapes (bench/train.py), CPU, one
model per variant from the same seed; old and new steps alternate so load drift on a shared
machine hits both alike. Median seconds per step after one warm-up step.

    python -m bench.placement_speed [steps] [--n-train 2000] [--params params.yaml]
"""
import argparse
import json
import time

import numpy as np
import torch

from bench import entry
from bench.train import synthetic_split
from crossalign import config
from crossalign.train.batches import DeviceSplit
from crossalign.methods import get_method
from crossalign.methods.base import Batch


class Old:  # the old SplitTensors.of + .batch, same logic
    def __init__(s, train):
        padded, lengths = train.text.gather()
        t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)
        s.it, s.ip = t(train.image_tokens, torch.float32), t(train.image_pooled, torch.float32)
        s.tt, s.tl = t(padded, torch.float32), t(lengths, torch.long)
        s.tp, s.ci = t(train.text_pooled, torch.float32), t(train.caption_image_index, torch.long)
    def batch(s, c):
        img = s.ci[c]; l = s.tl[c]; w = max(int(l.max()), 1)
        return Batch(image_tokens=s.it[img], image_pooled=s.ip[img], text_tokens=s.tt[c, :w],
                     text_mask=torch.arange(w)[None, :] < l[:, None], text_pooled=s.tp[c], image_index=img)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="?", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n-train", type=int, default=2000, help="train images (5 captions each)")
    args = ap.parse_args(argv)
    cfg = config.load(args.params)
    train = synthetic_split(args.n_train, 5, 49, 1280, 384, 0)
    steps = args.steps
    out = {}
    for method in ("concat_mlp", "cross_attention", "contrastive", "joint"):
        spec = get_method(method)
        runs = {}
        for name in ("old", "new"):
            torch.manual_seed(0)
            model = spec.build_model(cfg, 1280, 384)
            src = Old(train) if name == "old" else DeviceSplit(train, torch.device("cpu"), model.reads_tokens)
            runs[name] = (model, spec.build_loss(cfg), torch.optim.AdamW(model.parameters(), lr=1e-3), src, [])
        order = torch.randperm(train.n_captions, generator=torch.Generator().manual_seed(0))
        for s in range(steps + 1):
            for name in (("old", "new") if s % 2 else ("new", "old")):
                model, loss_fn, opt, src, times = runs[name]
                t0 = time.perf_counter()
                batch = src.batch(order[s * 128:(s + 1) * 128])
                loss = sum(loss_fn(model(batch), batch).values())
                opt.zero_grad(); loss.backward(); opt.step()
                if s:  # first step: warm-up
                    times.append(time.perf_counter() - t0)
        old, new = np.median(runs["old"][4]), np.median(runs["new"][4])
        out[method] = {"old_step_s": round(float(old), 4), "new_step_s": round(float(new), 4), "new/old": round(float(new / old), 3)}
        print(method, out[method], flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    entry(main)
