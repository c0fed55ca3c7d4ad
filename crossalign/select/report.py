"""``reports/``: the comparison a reader checks before trusting a champion.

``comparison.md`` (leaderboard with the seeds stated, the champion against every other method and
every method against the baseline with CIs, the deterministic costs and a link to the measured
ones, binding probe per swap kind with 95 % CIs over twin pairs, protocol, glossary) and five
PNGs: R@K bars per method, the binding probe per kind and method (CI bars, chance line at 50 %),
training curves from ``plots/train/<m>.csv``, and a retrieval gallery of the champion on test
(captions -> top-5 images with the true one marked; images -> top-5 captions).
"""
from __future__ import annotations

import csv
import textwrap
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crossalign.config import Config  # noqa: E402
from crossalign.io import atomic_file, load_npy, read_json  # noqa: E402
from crossalign.retrieval.protocol import METRIC_KEYS  # noqa: E402

RECALL_PNG, CURVES_PNG = "recall_at_k.png", "training_curves.png"
T2I_PNG, I2T_PNG = "gallery_text_to_image.png", "gallery_image_to_text.png"
BINDING_PNG = "binding_probe.png"
TOP = 5
CURVE_SERIES = ("train_loss", "val_rsum")  # the series plotted when logged (dvc.yaml's training plot)


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# One colour per method in every figure, fixed by name (a figure showing some methods only keeps
# each one's colour): matplotlib's tab10 hues. The evaluation-only control is grey. dvc.yaml's
# training-curve template (.dvc/plots/training_curve.json) maps the same colours to the CSV files.
METHOD_COLOURS = {"concat_mlp": "#1f77b4", "contrastive": "#ff7f0e", "cross_attention": "#2ca02c",
                  "joint": "#9467bd", "contrastive+cross_attention": "#7f7f7f"}
OTHER_COLOURS = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf")  # a method not listed above


def colour(method: str) -> str:
    """The method's colour (:data:`METHOD_COLOURS`; another name: a fixed pick by its checksum)."""
    return METHOD_COLOURS.get(method) or OTHER_COLOURS[zlib.crc32(method.encode()) % len(OTHER_COLOURS)]


def colours(methods) -> dict[str, str]:
    """``{method: colour}`` for the methods of one figure."""
    return {m: colour(m) for m in methods}


def plot_recall(board: list[dict], path: Path) -> Path:
    return _save(recall_figure(board), path)


def recall_figure(board: list[dict]) -> plt.Figure:
    """Grouped bars: test R@1/5/10 of both directions per method (std as error bars); the legend
    sits right of the axes so it hides no bar."""
    keys = [k for k in METRIC_KEYS if k != "rsum"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(board)
    colour = colours(r["method"] for r in board)
    for j, row in enumerate(board):
        x = np.arange(len(keys)) + j * width  # (6,)
        err = [row["test_std"].get(k, 0.0) for k in keys]
        ax.bar(x, [row["test"][k] for k in keys], width, yerr=err, color=colour[row["method"]],
               label=f"{row['method']} (RSUM {row['test']['rsum']:.1f})")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.replace("_r", " R@") for k in keys])
    ax.set_ylabel("recall on test (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Retrieval recall per method (test split; champion chosen on val)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def binding_figure(probes: dict[str, dict]) -> plt.Figure:
    """Grouped bars: binding (mean of i2t and t2i) per swap kind and overall, one bar per method,
    its 95 % pair-bootstrap CI as the error bar; the chance line drawn at 50 %."""
    kinds = ["overall"] + sorted({k for p in probes.values() for k in p["per_swap"]})
    colour = colours(probes)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(probes), 1)
    for j, (method, p) in enumerate(sorted(probes.items())):
        cells = [p["overall"] if k == "overall" else p["per_swap"].get(k) for k in kinds]
        x = np.arange(len(kinds)) + j * width  # (K,)
        mean = np.array([c["mean"] if c else np.nan for c in cells])  # (K,)
        lo = np.array([c["ci95"]["mean"][0] if c else np.nan for c in cells])
        hi = np.array([c["ci95"]["mean"][1] if c else np.nan for c in cells])
        ax.bar(x, mean, width, yerr=np.maximum(np.stack([mean - lo, hi - mean]), 0), capsize=3, color=colour[method], label=method)
    ax.axhline(50.0, color="black", linestyle="--", linewidth=1, label="chance (50 %)")
    first = next(iter(probes.values()))  # every method is probed on the same test twins
    pairs = [(first["overall"] if k == "overall" else first["per_swap"].get(k, {})).get("pairs", "?") for k in kinds]
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, [f"{k}\n({n} pairs)" for k, n in zip(kinds, pairs)])
    ax.set_ylabel("true beats twin (%, mean of i2t and t2i)")
    ax.set_ylim(0, 100)
    ax.set_title("Binding probe on test twins (95 % CI over twin pairs)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def _ci(cell: dict, key: str) -> str:
    lo, hi = cell["ci95"][key]
    return f"{cell[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def binding_lines(probes: dict[str, dict], fits: dict[str, dict] | None = None) -> list[str]:
    """The probe table: one row per method and swap kind (overall first), each direction and their
    mean with its 95 % pair-bootstrap CI; with ``fits`` (each method's train-twin fit, the same probe
    on training twins) a last column with the fit's mean beside the test one."""
    fits = fits or {}
    head = "| method | swap | pairs | i2t [95% CI] | t2i [95% CI] | mean [95% CI] |"
    lines = [head + (" train-twin fit: mean [95% CI] |" if fits else ""), "|---" * (7 if fits else 6) + "|"]
    for m, p in probes.items():
        for kind, cell in [("overall", p["overall"])] + sorted(p["per_swap"].items()):
            fit = ""
            if fits:
                f = fits.get(m, {})
                f = f.get("overall") if kind == "overall" else f.get("per_swap", {}).get(kind)
                fit = (" – |" if not f else f" {_ci(f, 'mean')} |" if "ci95" in f
                       else f" {(f['i2t'] + f['t2i']) / 2:.1f} |")
            if "ci95" not in cell:  # a results.json without binding CIs
                lines.append(f"| {m} | {kind} | {cell['pairs']} | {cell['i2t']:.1f} | {cell['t2i']:.1f} | "
                             f"{(cell['i2t'] + cell['t2i']) / 2:.1f} |" + fit)
                continue
            name = f"**{kind}**" if kind == "overall" else kind
            lines.append(f"| {m} | {name} | {cell['pairs']} | {_ci(cell, 'i2t')} | {_ci(cell, 't2i')} | "
                         f"{_ci(cell, 'mean')} |" + fit)
    return lines


def swap_lines(metrics: dict[str, dict]) -> list[str]:
    """The caption-swap probe section (``test.swap_probe`` of each method's results,
    :mod:`crossalign.evaluate.swap`): one row per method, one column per perturbation kind (overall
    first), each cell the i2t accuracy with its 95 % image-bootstrap CI and the pairs it counts; a
    kind no test caption offered is "absent", never 0 %."""
    probes = {m: x["test"]["swap_probe"] for m, x in metrics.items()
              if x["test"].get("swap_probe") and not x["test"]["swap_probe"]["overall"].get("absent")}
    lines = ["", "## Caption-swap probe (true caption vs the same words bound differently, chance 50%)", ""]
    if not probes:
        return lines + ["No caption-swap pairs on the test split (`features.perturbations: 0`, or features "
                        "written without perturbed captions)."]
    kinds = list(dict.fromkeys(k for p in probes.values() for k in p["per_kind"]))

    def cell(c: dict) -> str:
        if c.get("absent") or "i2t" not in c:
            return "absent"
        return f"{c['i2t']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}], n {c['pairs']:,}"

    lines += ["| method | **overall** | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for m, p in probes.items():
        lines.append(f"| {m} | {cell(p['overall'])} | "
                     + " | ".join(cell(p["per_kind"].get(k, {"absent": True})) for k in kinds) + " |")
    first = next(iter(probes.values()))
    return lines + ["", "Image→text: % of (caption, perturbation) pairs where the image's true caption scores "
                    "above its word swap (`crossalign/features/perturb.py`: colour / size / number words or the "
                    "two noun phrases of a relation exchanged: the same words, bound differently); ties count "
                    "half. The score is the one the method ranks by (a re-ranker's fused score at its alpha, "
                    "as if both captions were in the shortlist). 95% CI: percentile bootstrap over test images "
                    f"(an image's captions and their swaps move together; {first.get('resamples', '?')} "
                    "resamples); n: pairs. absent: no test caption offered that swap. Works on any captions: "
                    "no binding twins needed."]


def read_curve(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of a training-curve CSV (``epoch`` plus any logged series)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with an 'epoch' column and at least one row")
    cols: dict[str, np.ndarray] = {}
    for key in rows[0]:
        try:
            cols[key] = np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
        except ValueError:
            continue
    return cols


def plot_curves(curves: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    return _save(curves_figure(curves), path)


def curves_figure(curves: dict[str, dict[str, np.ndarray]]) -> plt.Figure:
    """A panel for train loss and one for val RSUM (else the first four series logged), one line
    per method (and seed); one legend below the panels, covering none."""
    logged = sorted({k for c in curves.values() for k in c if k not in ("epoch", "seed", "step")})
    series = [k for k in CURVE_SERIES if k in logged] or logged[:4]
    colour = colours(curves)
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(4.5 * max(len(series), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], series):
        for method, cols in curves.items():
            if name not in cols:
                continue
            seeds = np.unique(cols["seed"]) if "seed" in cols else [None]
            for j, s in enumerate(seeds):
                keep = (cols["seed"] == s) if s is not None else np.ones_like(cols["epoch"], bool)
                label = method if s is None or len(seeds) == 1 else f"{method} seed {int(s)}"
                ax.plot(cols["epoch"][keep], cols[name][keep], marker="o", ms=3, label=label,
                        color=colour[method], linestyle=("-", "--", ":", "-.")[j % 4])
        ax.set_xlabel("epoch")
        ax.set_title(name)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # one legend for all panels, below them: it covers no line
        fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(labels), 4), frameon=False)
    if not series:
        axes[0][0].text(0.5, 0.5, "no training curves found", ha="center")
    return fig


def plot_gallery_t2i(images: np.ndarray, captions: list[str], caption_image: np.ndarray,
                     t2i: np.ndarray, queries: list[int], path: Path) -> Path:
    """Rows: a test caption and its top-5 images by the champion's score; true image framed green."""
    fig, axes = plt.subplots(len(queries), TOP + 1, figsize=(2.2 * (TOP + 1), 2.6 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        ranking = np.argsort(-t2i[:, q], kind="stable")  # (N,) image rows, best first
        true_rank = int(np.flatnonzero(ranking == caption_image[q])[0])
        shown = [(c, i) for c, i in enumerate(ranking[:TOP])]
        if true_rank >= TOP:  # the true image, outside the top 5, in the last column
            shown.append((true_rank, ranking[true_rank]))
        axes[r][TOP].axis("off")
        for col, (c, i) in enumerate(shown):
            ax = axes[r][col]
            ax.axis("on")
            ax.imshow(np.asarray(images[i]).transpose(1, 2, 0))
            true = i == caption_image[q]
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("green" if true else "lightgrey")
                side.set_linewidth(5 if true else 1)
            ax.set_xlabel(f"#{c + 1}  {t2i[i, q]:.2f}" + ("  TRUE" if true else ""), fontsize=8,
                          color="green" if true else "black")
        axes[r][0].set_title("\n".join(textwrap.wrap(f'"{captions[q]}"', 60)), fontsize=8, loc="left")
    fig.suptitle("Text -> image: top-5 test images per caption (true image framed green; "
                 "shown last with its rank when outside the top 5)", fontsize=10)
    return _save(fig, path)


def plot_gallery_i2t(images: np.ndarray, captions: list[str], caption_image: np.ndarray,
                     i2t: np.ndarray, queries: list[int], path: Path) -> Path:
    """Rows: a test image and its top-5 captions; a true caption is marked [TRUE] in green."""
    fig, axes = plt.subplots(len(queries), 2, figsize=(11, 2.4 * len(queries)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for r, i in enumerate(queries):
        axes[r][0].imshow(np.asarray(images[i]).transpose(1, 2, 0))
        axes[r][0].axis("off")
        ranking = np.argsort(-i2t[i], kind="stable")  # (M,) caption columns, best first
        shown = list(enumerate(ranking[:TOP]))
        first_true = int(np.flatnonzero(caption_image[ranking] == i)[0])
        if first_true >= TOP:  # the best-ranked true caption, outside the top 5
            shown.append((first_true, ranking[first_true]))
        ax = axes[r][1]
        ax.axis("off")
        for line, (c, j) in enumerate(shown):
            true = caption_image[j] == i
            text = textwrap.shorten(captions[j], 90)
            ax.text(0, 0.95 - 0.17 * line, f"#{c + 1} {i2t[i, j]:.2f} {'[TRUE] ' if true else ''}{text}",
                    fontsize=8, color="green" if true else "black", transform=ax.transAxes, va="top")
    fig.suptitle("Image -> text: top-5 test captions per image (true captions in green; the best true "
                 "one added with its rank when outside the top 5)", fontsize=10)
    return _save(fig, path)


GLOSSARY = (
    ("i2t / t2i", "image->text retrieval (an image queries all test captions) / text->image (a caption "
                  "queries all test images)"),
    ("R@K", "recall at K: % of queries whose true item is among the K best-scored; for i2t a hit when "
            "any of the image's captions is in the top K (COCO protocol)"),
    ("RSUM", "sum of the six recalls i2t/t2i R@1, R@5, R@10 (max 600): the selection metric, on val"),
    ("medr", "median rank (1 = first) of the true item over the queries; lower is better"),
    ("1K / 5K", "COCO test protocols: the whole 5,000-image test split, or the mean over five 1,000-image folds "
                "(only for a 5,000-image split)"),
    ("binding probe", "% of comparisons where a scene beats its binding twin (same objects, attributes or "
                      "positions swapped); 50 % is chance; its CI resamples twin pairs, not images"),
    ("95% CI", "bootstrap interval of a gain: test images resampled with replacement, each with all its "
               "captions, both directions from one resample (and the seeds resampled first when there are "
               "several); a gain whose CI contains 0 is not distinguishable from noise"),
    ("index-able", "the method embeds images and captions separately, so a gallery can be encoded once and "
                   "searched with an embedding (nearest-neighbour) index"),
)


def _fmt(row: dict, key: str) -> str:
    std = row["test_std"].get(key)
    return f"{row['test'][key]:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def seeds_heading(board: list[dict]) -> str:
    """What the leaderboard numbers are, said truthfully for the seeds actually trained."""
    counts = {max(len(r["seeds"]), 1) for r in board}
    if counts == {1}:
        seeds = sorted({r["seeds"][0] for r in board if r["seeds"]})
        return f"test; one training seed per method, seed {', '.join(map(str, seeds)) or '?'}: no spread over seeds"
    if len(counts) == 1:
        return f"test; mean ± std over {counts.pop()} training seeds, std with ddof=1"
    return "test; mean over each method's seeds (column 'seeds'), ± std (ddof=1) where it has several"


def _gain_lines(gains: dict[str, dict], prefix: str) -> list[str]:
    out = []
    for method, g in gains.items():
        flag = "" if g["rsum"]["significant"] else " — RSUM difference not distinguishable from noise (CI contains 0)"
        out.append(f"- {prefix}**{method}**: {g['text']}{flag}")
    return out


# what the report promises about the test split (tests/test_choices_ignore_test.py holds the pipeline to it)
CHOSEN_ON_VAL = ("Every choice was made on train and validation only: the champion (validation RSUM), the tuned "
                 "values (`tune@<method>`: validation RSUM) and the recipe defaults in params.yaml (the bench/ "
                 "recipe runs score validation; they print test numbers only with `--final`, for the recipe "
                 "already chosen). The test split below is reported, never used to choose.")


MEASURED_REPORT = "comparison_with_measured_costs.md"  # the rendering with timings: costs/ and MLflow, never reports/
VERDICT_COMMAND = ".venv/bin/dvc exp run -n verdict $(.venv/bin/crossalign overlay params-verdict.yaml --flag=-S)"


def _count(n: float | None) -> str:
    """A count for a reader: exact below 10,000, else 3 significant digits with K / M / G."""
    if n is None:
        return "–"
    if n < 10_000:
        return f"{n:,.0f}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:,.0f}"


def _per_image(captions: int | None, images: int | None) -> str:
    if not captions or not images:
        return "?"
    ratio = captions / images
    return f"{ratio:.0f}" if ratio == int(ratio) else f"{ratio:.2f}"


def run_lines(facts: dict | None) -> list[str]:
    """The report's first table: what the comparison was run on (``selection['run']``)."""
    if not facts:
        return []
    splits = {name: f for name, f in facts["splits"].items()}
    names = " / ".join(splits)

    def counts(key: str) -> str:
        return " / ".join("–" if f is None else "?" if f.get(key) is None else f"{f[key]:,}" for f in splits.values())

    ratios = {_per_image((f or {}).get("captions"), (f or {}).get("images")) for f in splits.values() if f}
    per_image = (f"{ratios.pop()} (every split)" if len(ratios) == 1 else " / ".join(
        "–" if f is None else _per_image(f.get("captions"), f.get("images")) for f in splits.values()))
    img, txt, tune = facts["image_encoder"], facts["text_encoder"], facts["tuning"]
    grid = img.get("grid")
    shape = f"{grid[0]}×{grid[1]} grid, " if isinstance(grid, list) and len(grid) == 2 else ""
    img_text = img["name"] + (f" ({img['dim']:,}-d; {shape}{img['tokens']} tokens per image)"
                              if img.get("dim") and img.get("tokens") else "")
    txt_text = txt["name"] + (f" ({txt['dim']:,}-d token states" + (f": {txt['token_states']}" if txt.get("token_states")
                                                                     else "") + ")" if txt.get("dim") else "")
    seeds = facts["seeds"]
    seed_text = ", ".join(map(str, seeds)) + (" (one training seed per method)" if len(seeds) == 1 else
                                              f" ({len(seeds)} training seeds per method)")
    budget = (f"{tune['trials']} trials per method, at most {tune['epochs']} epochs each, {tune['sampler']} sampler"
              if tune["trials"] else "none (tune.trials 0: params.yaml values)")
    return ["## What it was run on", "", "| | |", "|---|---|", f"| dataset | {facts['dataset']} |",
            f"| images ({names}) | {counts('images')} |", f"| captions ({names}) | {counts('captions')} |",
            f"| captions per image | {per_image} |", f"| image encoder (frozen) | {img_text} |",
            f"| text encoder (frozen) | {txt_text} |", f"| seeds | {seed_text} |",
            f"| tuning budget (equal per method) | {budget} |",
            f"| training | at most {facts['train_epochs']} epochs (early stopping on val) |"]


def _diff(gain: dict) -> str:
    lo, hi = gain["ci95"]
    return f"{gain['delta']:+.1f} RSUM [95% CI {lo:+.1f}, {hi:+.1f}]"


def _noise(gain: dict) -> str:
    return "distinguishable from noise" if gain["significant"] else "not distinguishable from noise (CI contains 0)"


def _cost_text(entry: dict | None) -> str:
    entry = entry or {}
    pairs = "?" if entry.get("pairs") is None else f"{entry['pairs']:,}"
    params = "?" if entry.get("params") is None else f"{entry['params']:,}"
    return f"{pairs} pair-scorer calls, {_count(entry.get('macs'))} MACs per query, {params} params"


def decision_lines(decision: dict | None, serving: dict) -> list[str]:
    """The decision table by need (``selection['decision']``, :func:`crossalign.select.stage.decide`),
    each row with its evidence, and the controls beside it, never recommended."""
    if not decision:
        return []
    q, champ = decision["quality"], decision["quality"]["method"]
    rows = []
    if q["runner_up"] is None:
        rows.append(("best retrieval quality", f"**{champ}**", f"the only method that may be recommended "
                                                              f"(val RSUM {q['val_rsum']:.1f})"))
    elif q["rsum"] is None:
        rows.append(("best retrieval quality", f"**{champ}**", f"best val RSUM {q['val_rsum']:.1f} (runner-up "
                                                              f"{q['runner_up']}: no test comparison)"))
    else:
        runner = q["runner_up"]
        evidence = (f"champion by val RSUM {q['val_rsum']:.1f} vs {runner} {q['runner_up_val_rsum']:.1f}; on test "
                    f"{champ} − {runner} = {_diff(q['rsum'])}: {_noise(q['rsum'])}")
        if q["tie"]:
            other = runner if q["pick"] == champ else champ
            evidence += (f"; a **tie**: take the cheaper, {q['pick']} ({_cost_text(serving.get(q['pick']))}) over "
                         f"{other} ({_cost_text(serving.get(other))})")
            rows.append(("best retrieval quality", f"**{q['pick']}** (tie with {other})", evidence))
        else:
            rows.append(("best retrieval quality", f"**{champ}**", evidence + "; a clear lead"))
    ix = decision["index"]
    if ix is None:
        rows.append(("large galleries (embedding index)", "none", "no method that may be recommended ranks from an "
                                                                 "embedding index"))
    elif ix["is_champion"]:
        rows.append(("large galleries (embedding index)", f"**{ix['method']}**", "the champion itself ranks from an "
                                                                                "embedding index"))
    else:
        gap = (f"gap to {champ} on test: {champ} − {ix['method']} = {_diff(ix['gap'])}: {_noise(ix['gap'])}"
               if ix["gap"] else "no test comparison with the champion")
        rows.append(("large galleries (embedding index)", f"**{ix['method']}**",
                     f"best index-able method by val RSUM ({ix['val_rsum']:.1f}); {gap}"))
    b = decision["binding"]
    if b is None:
        rows.append(("binding / compositional sensitivity", "no evidence",
                     "the test split has no binding twins and its captions no word-swap perturbations"))
    else:
        ci = f" [95% CI {b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}]" if b["ci95"] else ""
        beats = ("true beats its binding twin" if b["probe"] == "twin"
                 else "the image prefers its true caption to a word swap of it")
        text = (f"{b['probe']} probe: {beats} {b['mean']:.1f} %{ci} (chance 50 %"
                f"{'; above chance' if b['above_chance'] else '; not shown above chance'})")
        if b["next"]:
            n = b["next"]
            nci = f" [{n['ci95'][0]:.1f}, {n['ci95'][1]:.1f}]" if n["ci95"] else ""
            text += (f"; next {n['method']} {n['mean']:.1f} %{nci}: "
                     + ("CIs apart" if b.get("apart") else "CIs overlap, not shown to bind better"))
        rows.append(("binding / compositional sensitivity", f"**{b['method']}**", text))
    c = decision["cost"]
    near = [m for m in c["within_noise"] if m != champ]
    text = (f"within noise of {champ} (test RSUM CI contains 0): {', '.join(near)}; cheapest per query: "
            if near else f"no other method is within noise of {champ}: ")
    rows.append(("lowest cost per query, quality within noise of the champion", f"**{c['method']}**",
                 text + _cost_text(serving.get(c["method"]))))
    lines = ["## Which method for which need", "",
             "Rankings are by validation RSUM; whether a difference is distinguishable from noise is read from the "
             "test split's paired bootstrap CIs, reported below (a tie is the reader's call to take the cheaper "
             "method: the registry's `champion` stays the validation choice).", "",
             "| need | method | evidence |", "|---|---|---|"]
    lines += [f"| {need} | {pick} | {why} |" for need, pick, why in rows]
    if decision["controls"]:
        lines += ["", "Controls (evaluation-only: shown, never recommended): " + "; ".join(
            f"{x['method']}, val RSUM {x['val_rsum']:.1f}"
            + (f", {champ} − it on test = {_diff(x['vs_champion'])}" if x["vs_champion"] else "")
            for x in decision["controls"]) + "."]
    return lines + seed_lines(decision)


def seed_lines(decision: dict) -> list[str]:
    """Which of the decision's comparisons one training seed cannot settle, and the overlay that does."""
    single = decision["single_seed"]
    if not single:
        return ["", "Every method was trained with several seeds: the CIs resample each method's seeds before the "
                "test images, so they include training variance."]
    q, ix, b, c = decision["quality"], decision["index"], decision["binding"], decision["cost"]
    champ = q["method"]
    rest = []
    if q["rsum"] is not None:
        rest.append(f"best quality: {champ} vs {q['runner_up']}, {_diff(q['rsum'])} — "
                    + ("a tie" if q["tie"] else "a lead"))
    if ix and ix["gap"]:
        rest.append(f"index-able: {ix['method']}'s gap to {champ}, {_diff(ix['gap'])}")
    if b and b["next"]:
        rest.append(f"binding: {b['method']} {b['mean']:.1f} % vs {b['next']['method']} {b['next']['mean']:.1f} % "
                    f"({'CIs apart' if b.get('apart') else 'CIs overlap'})")
    if q["rsum"] is not None:
        near = [m for m in c["within_noise"] if m != champ]
        rest.append(f"cost: which methods are within noise of {champ} ({', '.join(near) if near else 'none'})")
    who = "every method" if set(single) == set(decision["recommendable"]) else ", ".join(single)
    head = (f"{who[0].upper() + who[1:]} was trained with one seed: the 95 % CIs above resample test images (and "
            "twin pairs), not training runs, so they hold test sampling noise but no training variance. A lead here "
            "is a lead of one training run over another; a tie may hide a difference that more runs would show. "
            "These comparisons rest on a single training seed per method:")
    tail = ("Settle them with the verdict overlay (3 seeds per method and a real tuning budget: 20 trials of up to "
            "`train.epochs` epochs; its cost: [docs/evaluation.md](../docs/evaluation.md#the-verdict-overlay)):")
    return (["", "### What one training seed cannot settle", "", head, ""] + [f"- {r}" for r in rest]
            + ["", tail, "", f"    {VERDICT_COMMAND}"])


def cost_lines(selection: dict, measured: tuple[dict, str] | None = None) -> list[str]:
    """The cost section: per method the costs that are functions of the inputs (params, how it
    serves, pair-scorer calls and MACs per text query at the run's shapes); with ``measured``
    ``(costs.measure output, machine)`` also the measured times, labelled with the machine
    (only in the rendering kept out of reports/)."""
    serving = selection.get("serving") or {}
    if not serving:
        return []
    shape = next((c["shape"] for c in serving.values() if c.get("shape")), None)
    lines = ["## Cost", "",
             "| method | trainable params | ranks a text query by | pair-scorer calls per query | MACs per query |",
             "|---|---|---|---|---|"]
    for m, c in serving.items():
        pairs = "–" if c.get("pairs") is None else f"{c['pairs']:,}"
        macs = "–" if c.get("macs") is None else f"{c['macs']:,}"
        lines.append(f"| {m} | {c['params']:,} | {c['index']} | {pairs} | {macs} |")
    lines += ["", "Per text query against the test gallery" + (f" ({shape})" if shape else "") + ": the query "
              "caption through the method's text side, then its similarity to every gallery image (embedding "
              "methods: no pair-scorer call) and the pair-scorer calls (a matcher: every gallery image; a re-ranker: "
              "its shortlist). MACs: multiply-accumulates of the matrix products (linear layers, attention, "
              "similarities), counted from the module shapes; the gallery is encoded once (the index) and is not "
              "counted, nor is element-wise work (norms, activations, softmax, top-k). A control counts both of "
              "its models."]
    if measured is None:
        lines += ["", "Measured times (training seconds per epoch, milliseconds per query) depend on the machine, so "
                  "they are kept out of this report (a DVC out): see [costs/costs.md](../costs/costs.md), written by "
                  f"`select` beside `reports/`, and `{MEASURED_REPORT}`, this report with them, logged to MLflow's "
                  "`select` run."]
        return lines
    costs, machine = measured
    lines += ["", f"Measured on {machine} (training time from the MLflow runs that trained each model; latency: median "
              "of timed calls, text queries ranked against every test image, the frozen text encoder not timed):", "",
              "| method | train s/epoch | 1 query (ms) | 1,000 queries (ms) |", "|---|---|---|---|"]
    for m, c in costs.items():
        train = f"{c['train']['s_per_epoch']:.1f}" if c.get("train") else "not logged"
        lat = c["query_latency"]
        many = lat["1000"]
        n = "" if many["queries"] == 1000 else f" ({many['queries']} queries)"
        lines.append(f"| {m} | {train} | {lat['1']['ms']:.2f} | {many['ms']:.1f}{n} |")
    return lines


def markdown(cfg: Config, selection: dict, metrics: dict[str, dict], figures: list[str], notes: list[str],
             measured: tuple[dict, str] | None = None) -> str:
    """``reports/comparison.md``; with ``measured`` (``(costs, machine)``) the rendering that adds the
    measured times (:data:`MEASURED_REPORT`, logged to MLflow, never a DVC out)."""
    board = selection["leaderboard"]
    champ = selection["champion"]
    several = any(len(r["seeds"]) > 1 for r in board)
    how = (f"test images resampled with their captions{', seeds resampled first' if several else ''}; "
           f"{cfg.select.bootstrap} resamples")
    lines = ["# Method comparison", ""]
    if measured is not None:
        lines += [f"This rendering adds the times measured on {measured[1]} to the cost section; "
                  "`reports/comparison.md` (a DVC out) leaves them out.", ""]
    run = run_lines(selection.get("run"))
    lines += run + ([""] if run else [])
    lines += [f"Champion: **{champ}** — best validation RSUM "
              f"({next(r for r in board if r['method'] == champ)['val_rsum']:.1f}). {CHOSEN_ON_VAL}", ""]
    decision = decision_lines(selection.get("decision"), selection.get("serving") or {})
    lines += decision + ([""] if decision else [])
    lines += [f"## Leaderboard ({seeds_heading(board)})", "",
             "| method | params | val RSUM | " + " | ".join(METRIC_KEYS) + " | medr i2t/t2i | seeds |",
             "|---" * (len(METRIC_KEYS) + 5) + "|"]
    for row in board:
        medr = f"{row['test'].get('i2t_medr', float('nan')):.0f}/{row['test'].get('t2i_medr', float('nan')):.0f}"
        name = f"{row['method']} (control)" if row.get("control") else row["method"]
        params = "–" if row.get("params") is None else f"{row['params']:,}"
        lines.append(f"| {name} | {params} | {row['val_rsum']:.1f} | " + " | ".join(_fmt(row, k) for k in METRIC_KEYS)
                     + f" | {medr} | {len(row['seeds'])} |")
    lines += ["", "params: trainable parameters (a control: its two separately trained models together)."]
    if any("test_1k" in r for r in board):
        lines += ["", "1K (mean of five 1,000-image folds): " + "; ".join(
            f"{r['method']} RSUM {r['test_1k']['rsum']:.1f}" for r in board if "test_1k" in r)]
    if selection.get("champion_vs"):
        lines += ["", f"## Champion ({champ}) vs every other method (test; 95% bootstrap CI: {how})", "",
                  f"Each line is {champ} minus the other method, in points."]
        vs = selection["champion_vs"]  # runner-up first
        lines += [""] + _gain_lines({r["method"]: vs[r["method"]] for r in board if r["method"] in vs}, f"{champ} vs ")
    lines += ["", f"## Gain over {cfg.select.baseline} (test; 95% bootstrap CI: {how})", ""]
    lines += _gain_lines(selection["gain_over_baseline"], "")
    if selection.get("gain_over_control"):
        control = next(iter(selection["gain_over_control"].values()))["control"]
        lines += ["", f"## Joint training vs ensembling ({control}, test; 95% bootstrap CI: {how})", "",
                  f"`{control}` is an evaluation-only control: the separately trained models' shortlist and "
                  "matcher combined exactly as `joint` ranks (same shortlist k, fusion alpha chosen on val alike). "
                  "What `joint` "
                  "gains over it is what training the two objectives together adds beyond an ensemble.", ""]
        lines += _gain_lines(selection["gain_over_control"], "")
    if selection.get("tuning"):
        lines += ["", "## Defaults vs tuned (equal budget, validation only)", ""]
        from crossalign.train.tuning import leaderboards_markdown

        lines += leaderboards_markdown(selection["tuning"])
    cost = cost_lines(selection, measured)
    lines += [""] + cost if cost else []
    lines += ["", "## Binding probe (true vs binding twin, chance 50%)", ""]
    probes = {m: x["test"]["binding_probe"] for m, x in metrics.items() if x["test"].get("binding_probe")}
    if probes:
        fits = {m: x["train_fit"]["binding_probe"] for m, x in metrics.items() if x.get("train_fit")}
        lines += binding_lines(probes, fits)
        lines += ["", "% of comparisons where the true image / caption beats its binding twin's (same scene, the "
                  "focal pair's colours, sizes or places swapped; captions with the same words); ties count "
                  "half. 95% CI: percentile bootstrap over twin pairs (the independent unit: a pair's comparisons "
                  "share one scene), both directions and their mean from one resample "
                  f"({next(iter(probes.values())).get('resamples', '?')} resamples). A CI containing 50 cannot be "
                  "told from chance; test twins share no image or scene with train (checked by the features stage)."]
        if fits:
            n = next(iter(x["train_fit"] for x in metrics.values() if x.get("train_fit")))
            lines += ["", f"Train-twin fit: the same probe on the twin pairs among the first {n['images']:,} "
                      "*training* images (twins the model was trained on; `evaluate.fit_images`). A kind fitted "
                      "on train and at chance on test is overfitted; a kind not fitted on train is beyond what "
                      "the method learned from its training data."]
    else:
        lines.append("This dataset has no binding twins (the caption-swap probe below works on any captions).")
    lines += swap_lines(metrics)
    lines += ["", "## Protocol", ""] + [f"- {m}: {x.get('protocol', '')}" for m, x in metrics.items()]
    lines += ["", "## Glossary", ""] + [f"- **{term}**: {text}" for term, text in GLOSSARY]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run(cfg: Config, root: Path, selection: dict, measured: tuple[dict, str] | None = None) -> list[Path]:
    """Write ``reports/comparison.md`` and its PNGs; with ``measured`` (``(costs, machine)``) also
    ``costs/`` :data:`MEASURED_REPORT`, the same report with the measured times (not a DVC out).
    Returns the files written."""
    root = Path(root)
    out = root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {r["method"]: read_json(root / "eval" / r["method"] / "results.json") for r in selection["leaderboard"]}
    files, notes = [plot_recall(selection["leaderboard"], out / RECALL_PNG)], []
    probes = {m: x["test"]["binding_probe"] for m, x in metrics.items() if x["test"].get("binding_probe")}
    if probes and all("ci95" in p["overall"] for p in probes.values()):
        files.append(_save(binding_figure(probes), out / BINDING_PNG))
    curves = {m: read_curve(root / "plots" / "train" / f"{m}.csv") for m in metrics
              if (root / "plots" / "train" / f"{m}.csv").exists()}
    controls = {r["method"] for r in selection["leaderboard"] if r.get("control")}  # evaluated, never trained
    notes += [f"no training curve for {m} (plots/train/{m}.csv absent)" for m in metrics
              if m not in curves and m not in controls]
    files.append(plot_curves(curves, out / CURVES_PNG))
    prepared = root / "data" / "prepared" / "test"
    champ = selection["champion"]
    if cfg.select.gallery and (prepared / "images.npy").exists():
        images = load_npy(prepared / "images.npy")  # (N, 3, S, S) uint8
        captions = read_json(prepared / "captions.json")
        caption_image = np.asarray(load_npy(prepared / "caption_image_index.npy"))  # (M,)
        i2t = np.asarray(load_npy(root / "eval" / champ / "test_scores.npy"))  # (N, M)
        t2i_path = root / "eval" / champ / "test_scores_t2i.npy"
        t2i = np.asarray(load_npy(t2i_path)) if t2i_path.exists() else i2t
        if i2t.shape != (images.shape[0], len(captions)):
            raise ValueError(f"eval/{champ}/test_scores.npy is {i2t.shape}, data/prepared/test has "
                             f"{images.shape[0]} images x {len(captions)} captions")
        n = cfg.select.gallery
        files.append(plot_gallery_t2i(images, captions, caption_image, t2i,
                                      np.linspace(0, len(captions) - 1, n).astype(int).tolist(), out / T2I_PNG))
        files.append(plot_gallery_i2t(images, captions, caption_image, i2t,
                                      np.linspace(0, images.shape[0] - 1, n).astype(int).tolist(), out / I2T_PNG))
    else:
        notes.append("no retrieval gallery: select.gallery is 0 or data/prepared/test/images.npy is absent")
    text = markdown(cfg, selection, metrics, [f.name for f in files], notes)
    with atomic_file(out / "comparison.md") as fh:
        fh.write(text)
    files.append(out / "comparison.md")
    if measured is not None:
        from crossalign.select.costs import COSTS_DIR

        path = root / COSTS_DIR / MEASURED_REPORT  # beside costs/costs.md, never in reports/
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            fh.write(markdown(cfg, selection, metrics, [f.name for f in files if f.suffix == ".png"], notes, measured))
        files.append(path)
    return files
