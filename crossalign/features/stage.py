"""The ``features`` stage: frozen-encoder outputs of every prepared split, computed once.

Reads ``data/prepared/<split>/`` and writes ``data/features/<split>/`` (formats: crossalign.io)
plus ``eval/test_index.json`` (ids, captions and binding twins of the test split, in the row and
column order of its features, for the evaluation report) and ``eval/val_index.json`` (the same for
val: the binding probe on val is the one a recipe choice may read).

Streaming: images are read from the memory-mapped uint8 array one batch at a time, outputs are
written into ``np.lib.format.open_memmap`` files, and mapped pages are flushed and dropped from
the process every ~64 MB, so peak memory is set by the batch and the model, not the split.
Speed: batched ``torch.inference_mode``, channels-last, images normalised on the device from
uint8; on CUDA bf16 autocast, pinned host memory and non-blocking copies; a reader thread
prefetches the next batch and a writer thread stores the previous one while the model runs.
Captions are encoded in batches sorted by length, each padded only to its own longest caption,
and stored packed (each caption's own states only, :class:`crossalign.io.FeatureWriter`).

Binding negatives (:mod:`crossalign.features.hardneg`): each split also gets ``twin_row.npy``
(from the image records' ``twin_id``) and up to ``features.perturbations`` perturbed captions per
real caption (:mod:`crossalign.features.perturb`: same words, bound differently), tokenised with the text
encoder's tokenizer and streamed through the same :func:`encode_texts` into ``neg_text_*.npy``.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from crossalign.config import Config, FeaturesParams
from crossalign.device import resolve_device
from crossalign.features.encoders import ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder
from crossalign.features import perturb
from crossalign.features.leaks import split_leaks, twin_leaks
from crossalign.features.hardneg import NegTextWriter, twin_row_array
from crossalign.io import (TEXT_LAYERS_FILE, FeatureWriter, atomic_dir, atomic_file, drop_pages, load_npy, read_json,
                           write_json)

SPLITS = ("train", "val", "test")
RELEASE_BYTES = 64 << 20  # drop mapped pages after about this many bytes streamed
COPIED = ("image_ids", "caption_image_index", "caption_ids")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (exact and deterministic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Captions:
    """Token ids of a split's captions as a flat array and offsets (caption j is
    ``tokens[offsets[j]:offsets[j+1]]``), clipped to the encoder's longest input."""

    tokens: np.ndarray  # (T,) int
    offsets: np.ndarray  # (M + 1,) int64
    limit: int
    source: str

    @property
    def lengths(self) -> np.ndarray:
        return np.minimum(np.diff(self.offsets), self.limit).astype(np.int32)  # (M,)

    def ids(self, j: int) -> np.ndarray:
        seq = self.tokens[self.offsets[j]:self.offsets[j + 1]]
        if seq.size > self.limit:  # keep the closing special token ([SEP]) of a clipped caption
            seq = np.concatenate([seq[: self.limit - 1], seq[-1:]])
        return seq


def caption_ids(split_dir: Path, encoder: TextEncoder, chunk: int = 8192) -> Captions:
    """The prepared ids when the encoder's vocabulary is preprocess's, else ``captions.json``
    re-tokenised with the encoder's own tokenizer (chunked into flat arrays)."""
    meta = read_json(split_dir / "meta.json")
    tokenizer = str(meta.get("tokenizer", "offline"))
    if encoder.vocab_matches(tokenizer):
        return Captions(load_npy(split_dir / "tokens.npy"), np.asarray(load_npy(split_dir / "offsets.npy"), np.int64),
                        encoder.max_length, f"prepared ids (preprocess.tokenizer = {tokenizer!r})")
    max_length = min(int(meta.get("max_length", encoder.max_length)), encoder.max_length)
    return tokenize_texts(read_json(split_dir / "captions.json"), encoder, max_length,
                          f"re-tokenised captions.json with {encoder.name!r}'s tokenizer "
                          f"(preprocess.tokenizer = {tokenizer!r} has another vocabulary)", chunk)


def encode_images(images: np.ndarray, encoder: ImageEncoder, out_tokens: np.ndarray, out_pooled: np.ndarray,
                  batch_size: int, device: torch.device, desc: str = "images", progress: bool = True) -> None:
    """Stream uint8 ``images (N, 3, S, S)`` through ``encoder`` into ``out_tokens (N, R, D)`` and
    ``out_pooled (N, D)`` (fp16, usually open_memmap files)."""
    n = images.shape[0]
    cuda = device.type == "cuda"
    release_rows = max(1, RELEASE_BYTES // max(1, images[:1].nbytes + out_tokens[:1].nbytes))

    def load(i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(images[i:i + batch_size], copy=True))  # (b, 3, S, S) uint8, read now
        if (i // batch_size) % max(1, release_rows // batch_size) == 0:
            drop_pages(images)
        return x.pin_memory() if cuda else x

    def store(i: int, tokens: np.ndarray, pooled: np.ndarray) -> None:
        out_tokens[i:i + len(tokens)] = tokens
        out_pooled[i:i + len(pooled)] = pooled
        if (i // batch_size + 1) % max(1, release_rows // batch_size) == 0:
            drop_pages(out_tokens), drop_pages(out_pooled)

    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        ahead: Future | None = pool.submit(load, 0) if n else None
        writing: Future | None = None
        for i in range(0, n, batch_size):
            x = ahead.result()
            ahead = pool.submit(load, i + batch_size) if i + batch_size < n else None
            x = x.to(device, non_blocking=cuda)  # (b, 3, S, S) uint8
            with torch.inference_mode(), autocast(device):
                tokens, pooled = encoder(x)  # (b, R, D), (b, D)
            tokens = tokens.to(torch.float16).cpu().numpy()
            pooled = pooled.to(torch.float16).cpu().numpy()
            if writing is not None:
                writing.result()
            writing = pool.submit(store, i, tokens, pooled)
            bar.update(len(tokens))
        if writing is not None:
            writing.result()
    drop_pages(out_tokens), drop_pages(out_pooled), drop_pages(images)


def encode_texts(captions: Captions, encoder: TextEncoder, writer: FeatureWriter, batch_size: int,
                 device: torch.device, desc: str = "captions", progress: bool = True) -> None:
    """Encode captions in length-sorted batches, each padded to its own longest caption, into the
    packed ``writer`` (:meth:`FeatureWriter.write_texts` keeps each caption's own states)."""
    lengths = captions.lengths  # (M,)
    order = np.argsort(-lengths, kind="stable")  # longest first: a batch too big fails at once
    cuda = device.type == "cuda"
    with tqdm(total=len(order), desc=desc, unit="cap", disable=not progress, leave=False) as bar:
        for b in range(0, len(order), batch_size):
            rows = np.sort(order[b:b + batch_size])  # (b,) ascending rows: sequential writes
            width = max(1, int(lengths[rows].max()))
            ids = np.zeros((len(rows), width), np.int64)  # (b, l)
            mask = np.zeros((len(rows), width), np.int64)  # (b, l)
            for r, j in enumerate(rows):
                seq = captions.ids(int(j))
                ids[r, :seq.size], mask[r, :seq.size] = seq, 1
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            if cuda:
                ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
            with torch.inference_mode(), autocast(device):
                states, pooled = encoder(ids_t.to(device, non_blocking=cuda), mask_t.to(device, non_blocking=cuda))
            writer.write_texts(rows, states.to(torch.float16).cpu().numpy(),  # (b, l, D)
                               pooled.to(torch.float16).cpu().numpy())  # (b, D)
            bar.update(len(rows))
    writer.drop()


def tokenize_texts(texts: list[str], encoder: TextEncoder, max_length: int, source: str,
                   chunk: int = 8192) -> Captions:
    """``texts`` tokenised with the encoder's own tokenizer (chunked) into flat :class:`Captions`."""
    parts, lengths = [], [0]
    for start in range(0, len(texts), chunk):
        for seq in encoder.tokenize(texts[start:start + chunk], max_length):
            parts.append(np.asarray(seq, np.int32))
            lengths.append(len(seq))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return Captions(tokens, np.cumsum(lengths, dtype=np.int64), encoder.max_length, source)


def encode_negatives(src: Path, dst: Path, n_images: int, text_encoder: TextEncoder, params: FeaturesParams,
                     device: torch.device, progress: bool = True) -> dict:
    """Write ``twin_row.npy`` and the perturbed captions (``neg_*.npy``, :mod:`crossalign.features.hardneg`)
    of one split into ``dst``; returns the meta.json ``perturbations`` entry."""
    records = read_json(src / "images.json")
    if len(records) != n_images:
        raise ValueError(f"{src / 'images.json'}: {len(records)} records for {n_images} images in images.npy")
    twin_row = twin_row_array(records, load_npy(src / "image_ids.npy"))
    captions = read_json(src / "captions.json")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{src / 'captions.json'}: expected a list of caption strings")
    texts, source, kind = perturb.perturb_all(captions, params.perturbations)
    max_length = min(int(read_json(src / "meta.json").get("max_length", text_encoder.max_length)),
                     text_encoder.max_length)
    negs = tokenize_texts(texts, text_encoder, max_length, "perturbed captions.json")
    writer = NegTextWriter(dst, negs.lengths, text_encoder.dim, release=RELEASE_BYTES)
    if texts:
        encode_texts(negs, text_encoder, writer, params.text_batch_size, device, desc=f"{src.name} perturbed",
                     progress=progress)
    writer.close(source, kind, twin_row)
    counts = {name: int((kind == code).sum()) for code, name in enumerate(perturb.KINDS)}
    return {"kinds": list(perturb.KINDS), "per_caption": int(params.perturbations), "count": len(texts),
            "by_kind": counts, "captions_with_any": int(np.unique(source).size)}


def encode_split(src: Path, dst: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder,
                 params: FeaturesParams, device: torch.device, progress: bool = True) -> dict:
    """Write one ``data/features/<split>/`` from ``data/prepared/<split>/``; returns its meta."""
    images = load_npy(src / "images.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{src / 'images.npy'}: expected uint8 [N, 3, S, S], got {images.dtype} {list(images.shape)}")
    copied = {name: load_npy(src / f"{name}.npy") for name in COPIED}
    n, size = images.shape[0], images.shape[2]
    if copied["image_ids"].shape[0] != n:
        raise ValueError(f"{src / 'image_ids.npy'}: {copied['image_ids'].shape[0]} ids for {n} images in images.npy")
    captions = caption_ids(src, text_encoder)
    m = len(captions.offsets) - 1
    for name in ("caption_image_index", "caption_ids"):
        if copied[name].shape[0] != m:
            raise ValueError(f"{src / (name + '.npy')}: {copied[name].shape[0]} rows for {m} captions")
    index = copied["caption_image_index"]
    if m and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"{src / 'caption_image_index.npy'}: rows must lie in [0, {n}), got [{index.min()}, {index.max()}]")

    grid = image_encoder.grid(size)
    regions, di, dt = grid[0] * grid[1], image_encoder.dim, text_encoder.dim
    lengths = captions.lengths  # (M,) states kept per caption
    width = max(1, int(lengths.max())) if m else 1
    writer = FeatureWriter(dst, n, regions, di, lengths, dt, release=RELEASE_BYTES)
    encode_images(images, image_encoder, writer.image_tokens, writer.image_pooled, params.image_batch_size,
                  device, desc=f"{src.name} images", progress=progress)
    encode_texts(captions, text_encoder, writer, params.text_batch_size, device, desc=f"{src.name} captions",
                 progress=progress)
    meta = {
        "split": src.name, "n_images": int(n), "n_captions": int(m), "image_size": int(size),
        "image_encoder": image_encoder.describe(size),
        "text_encoder": {**text_encoder.describe(), "token_ids": captions.source,
                         "clipped_captions": int((np.diff(captions.offsets) > captions.limit).sum())},
        "image_dim": int(di), "text_dim": int(dt), "regions": int(regions), "max_length": int(width), "text_layout": "packed",
        "n_text_tokens": int(lengths.sum()),
        "dtype": "float16", "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "perturbations": encode_negatives(src, dst, n, text_encoder, params, device, progress),
    }
    writer.close(copied["image_ids"], copied["caption_image_index"], copied["caption_ids"], meta)
    return meta


def twin_rows(records: list[dict], image_ids: np.ndarray) -> list[dict]:
    """Binding twins as rows: one entry per image record whose ``twin_id`` (the partner's image
    id) is another image of the same split, with its ``swap`` kind."""
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    twins = []
    for r, record in enumerate(records):
        twin = row_of.get(int(record["twin_id"])) if record.get("twin_id") is not None else None
        if twin is not None and twin != r:
            twins.append({"image": r, "twin": twin, "swap": record.get("swap")})
    return twins


def split_records(split_dir: Path) -> list[dict]:
    """The image records of a prepared split (``images.json``), each with the id its row has in
    ``image_ids.npy``; raises ``ValueError`` naming the file when they disagree."""
    image_ids = np.asarray(load_npy(split_dir / "image_ids.npy"), np.int64)
    records = read_json(split_dir / "images.json")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{split_dir / 'images.json'}: expected a list of image records")
    if len(records) != len(image_ids):
        raise ValueError(f"{split_dir / 'images.json'}: {len(records)} records for {len(image_ids)} image ids")
    return [{**record, "id": int(i)} for record, i in zip(records, image_ids)]


def check_disjoint(prepared: Path, splits: tuple[str, ...] = SPLITS) -> None:
    """Stop unless the prepared splits share no image: by id, by file name or by binding-twin
    scene (:func:`crossalign.features.leaks.split_leaks`), for every pair of splits. Runs before anything
    is written; the error names the splits and the first offending images."""
    records = {s: split_records(prepared / s) for s in splits}
    twins = {s: twin_rows(records[s], np.array([r["id"] for r in records[s]], np.int64)) for s in splits}
    leaks = split_leaks(records, twins)
    if leaks:
        pairs = list(dict.fromkeys(pair for pair, _ in leaks))
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise ValueError(f"{prepared}: splits {', '.join(pairs)} are not disjoint, {len(leaks)} leak(s): "
                         f"{'; '.join(text for _, text in leaks[:10])}{more}. Each image (id, file and binding-twin "
                         "scene) must belong to exactly one of train/val/test; rerun the data and preprocess "
                         "stages with a disjoint split. Nothing was written.")


def build_test_index(split_dir: Path) -> dict:
    """``eval/test_index.json``'s content: image ids, each caption's image id, the captions and the
    twins, in the row / column order of the test features. Fails when a twin pair's image or scene
    is also in ``../train`` (:func:`crossalign.features.leaks.twin_leaks`): the probe would not be held out."""
    image_ids = np.asarray(load_npy(split_dir / "image_ids.npy"), np.int64)
    cap_index = np.asarray(load_npy(split_dir / "caption_image_index.npy"), np.int64)
    records = read_json(split_dir / "images.json")
    captions = read_json(split_dir / "captions.json")
    if len(records) != len(image_ids):
        raise ValueError(f"{split_dir / 'images.json'}: {len(records)} records for {len(image_ids)} image ids")
    if len(captions) != len(cap_index):
        raise ValueError(f"{split_dir / 'captions.json'}: {len(captions)} captions for {len(cap_index)} index rows")
    if len(cap_index) and (cap_index.min() < 0 or cap_index.max() >= len(image_ids)):
        raise ValueError(f"{split_dir / 'caption_image_index.npy'}: rows must lie in [0, {len(image_ids)}), "
                         f"got [{cap_index.min()}, {cap_index.max()}]")
    for r, record in enumerate(records):
        if "id" in record and int(record["id"]) != int(image_ids[r]):
            raise ValueError(f"{split_dir / 'images.json'}: record {r} has id {record['id']}, "
                             f"image_ids.npy row {r} is {int(image_ids[r])}")
    twins = twin_rows(records, image_ids)
    train = split_dir.parent / "train" / "images.json"
    if twins and train.exists():
        leaks = twin_leaks(records, twins, read_json(train))
        if leaks:
            raise ValueError(f"{split_dir / 'images.json'} vs {train}: the binding probe would score twins seen in "
                             f"training ({len(leaks)}): {'; '.join(leaks[:5])}")
    return {"image_ids": image_ids.tolist(), "caption_image_ids": image_ids[cap_index].tolist(),
            "captions": list(captions), "twins": twins}


def write_test_index(split_dir: Path, path: Path) -> dict:
    """Write :func:`build_test_index` of ``split_dir`` to ``path`` (nothing when it fails) and return it."""
    index = build_test_index(split_dir)
    write_json(path, index)
    return index


def run(cfg: Config, root: Path, progress: bool = True) -> Path:
    """Encode ``root/data/prepared/{train,val,test}`` into ``root/data/features/`` (atomically,
    all splits or none) and write ``root/eval/test_index.json`` and ``root/eval/val_index.json``
    (each split's ids, captions and binding twins). Returns the features directory. The splits'
    disjointness (:func:`check_disjoint`) and both indexes are checked first: bad input leaves every
    output as it was."""
    params = cfg.features
    root = Path(root)
    prepared = root / "data" / "prepared"
    missing = [s for s in SPLITS if not (prepared / s / "images.npy").exists()]
    if missing:
        raise FileNotFoundError(f"{prepared}: no prepared split(s) {missing} (run the preprocess stage first)")
    check_disjoint(prepared)  # before anything is replaced: a leaking split leaves the outputs as they were
    index = build_test_index(prepared / "test")
    val_index = build_test_index(prepared / "val")
    device = resolve_device(params.device, "features.device")
    torch.set_num_threads(params.threads or os.cpu_count() or 1)
    image_encoder = build_image_encoder(params.image_encoder, device)
    text_encoder = build_text_encoder(params.text_encoder, device, params.text_token_layer,
                                      params.text_trainable_layers)
    out = root / "data" / "features"
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            encode_split(prepared / split, tmp / split, image_encoder, text_encoder, params, device, progress)
        if params.text_trainable_layers:  # the layers' pretrained weights, where training reads its features
            with atomic_file(tmp / "train" / TEXT_LAYERS_FILE, "wb") as fh:
                fh.write(save_safetensors(text_encoder.text_layers()[1]))
    write_json(root / "eval" / "test_index.json", index)
    write_json(root / "eval" / "val_index.json", val_index)  # val's own twins: what recipe choices read
    return out
