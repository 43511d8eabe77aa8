"""The built-in synthetic dataset: procedurally generated scenes, both input modes.

Each image is a 64x64 scene of 2-4 objects on a 3x3 grid. An object has a
shape (6), a colour (7) and a size (2); within one image no two objects share
colour and shape. Each image gets 5 different captions from varied templates
(synonyms, word order, spatial relations, lists). Every word is shared by
many images, so a caption is only matched by its composition: which colour
goes with which shape, and which object is left of / above which.

Region features stand in for bottom-up-attention detections: one region per
object plus 0-2 extra ones (a second, noisier detection of an object, or
background), in random order. A region's feature is a fixed random
projection (seeded) of its attributes (one-hot shape, colour, size, grid
cell, box) plus Gaussian noise, stored as float16 (R, region_dim) with the
boxes (R, 4).

Output of ``python -m data_shards synthetic --out DIR``:

    DIR/raw/dataset_synthetic.json        Karpathy-format JSON (+ each image's "scene"), no image files
    DIR/shards/regions/{train,val,test}   region-feature shards
    DIR/shards/jpg/{train,val,test}       JPEG shards (64x64 renderings)

and with --web also DIR/web/train and DIR/web/extra: the same world in
img2dataset's layout, one caption per image (data_shards.web_synthetic).

Everything is a deterministic function of --seed and the sizes.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from data_shards.writer import BuildError, SampleEncoder, ShardWriter, sample_json
from user_dist.atomic import atomic_json
from user_dist.data_format import CAPTIONS_PER_IMAGE, MANIFEST

GENERATOR_VERSION = 1
SOURCE = "synthetic"
SPLITS = ("train", "val", "test")
# image_id = offset + index, so ids are unique across splits; caption j of an
# image has id 5 * image_id + j (unique too), so the caption-id path is always exercised.
ID_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}
SPLIT_SEED = {"train": 1, "val": 2, "test": 3}
CANVAS, GRID = 64, 3
DEFAULT_SIZES = {"train": 10_000, "val": 1_000, "test": 5_000}

SHAPES = {"circle": ("circle", "disc", "round shape"), "square": ("square", "block"),
          "triangle": ("triangle",), "star": ("star",), "diamond": ("diamond", "rhombus"),
          "cross": ("cross", "plus sign")}
COLOURS = {"red": ((220, 40, 40), ("red",)), "green": ((40, 170, 60), ("green",)),
           "blue": ((40, 80, 220), ("blue",)), "yellow": ((230, 210, 40), ("yellow",)),
           "purple": ((140, 60, 180), ("purple", "violet")), "orange": ((240, 140, 30), ("orange",)),
           "white": ((245, 245, 245), ("white",))}
SIZES = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RADIUS = {"small": 5, "large": 9}
# Relation of A to B, its phrasings, and the inverse relation (B to A).
RELATIONS = {"left": ("to the left of", "left of", "on the left of"),
             "right": ("to the right of", "right of", "on the right of"),
             "above": ("above", "over"), "below": ("below", "under", "beneath")}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
SHAPE_NAMES, COLOUR_NAMES, SIZE_NAMES = list(SHAPES), list(COLOURS), list(SIZES)
# Attribute vector: one-hot shape, colour, size, grid cell, then the box.
ATTR_DIM = len(SHAPES) + len(COLOURS) + len(SIZES) + GRID * GRID + 4


# --------------------------------------------------------------------------- scenes and captions


def make_scene(rng: np.random.Generator) -> List[Dict[str, Any]]:
    """2-4 objects, each {'shape', 'colour', 'size', 'cell': [col, row], 'box': [x1, y1, x2, y2] (pixels)}."""
    k = int(rng.integers(2, 5))
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=k, replace=False)  # distinct (shape, colour)
    objects = []
    step = CANVAS / GRID
    for cell, kind in zip(cells, kinds):
        size = SIZE_NAMES[int(rng.integers(2))]
        col, row = int(cell) % GRID, int(cell) // GRID
        cx = (col + 0.5) * step + rng.uniform(-2.5, 2.5)
        cy = (row + 0.5) * step + rng.uniform(-2.5, 2.5)
        r = RADIUS[size]
        objects.append({"shape": SHAPE_NAMES[int(kind) // len(COLOURS)], "colour": COLOUR_NAMES[int(kind) % len(COLOURS)],
                        "size": size, "cell": [col, row],
                        "box": [round(cx - r, 2), round(cy - r, 2), round(cx + r, 2), round(cy + r, 2)]})
    return objects


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(obj: Mapping[str, Any], rng: np.random.Generator, article: str) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(pick(rng, SIZES[obj["size"]]))
    words.append(pick(rng, COLOURS[obj["colour"]][1]))
    words.append(pick(rng, SHAPES[obj["shape"]]))
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article] + words)


def relation(a: Mapping[str, Any], b: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A true spatial relation of a to b (their grid cells differ)."""
    (ca, ra), (cb, rb) = a["cell"], b["cell"]
    options = ([("left" if ca < cb else "right")] if ca != cb else []) + \
              ([("above" if ra < rb else "below")] if ra != rb else [])
    return pick(rng, options)


def caption(scene: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> str:
    """One caption from a random template family."""
    i, j = rng.choice(len(scene), size=2, replace=False)
    a, b = scene[int(i)], scene[int(j)]
    rel = relation(a, b, rng)
    family = int(rng.integers(5))
    if family == 0:
        return f"{noun_phrase(a, rng, 'a')} {pick(rng, RELATIONS[rel])} {noun_phrase(b, rng, 'a')}"
    if family == 1:
        # Same fact, other word order: B is <inverse> of A.
        return f"there is {noun_phrase(b, rng, 'a')} {pick(rng, RELATIONS[INVERSE[rel]])} {noun_phrase(a, rng, 'a')}"
    if family == 2:
        return f"{noun_phrase(a, rng, 'the')} is {pick(rng, RELATIONS[rel])} {noun_phrase(b, rng, 'the')}"
    if family == 3:
        order = rng.permutation(len(scene))
        parts = [noun_phrase(scene[int(k)], rng, "a") for k in order]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{pick(rng, ('a picture of', 'an image with', 'a scene showing'))} {listed}"
    return (f"{NUMBERS[len(scene)]} shapes, with {noun_phrase(a, rng, 'a')} "
            f"{pick(rng, RELATIONS[rel])} {noun_phrase(b, rng, 'a')}")


def five_captions(scene: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> List[str]:
    captions: List[str] = []
    while len(captions) < CAPTIONS_PER_IMAGE:
        text = caption(scene, rng)
        if text not in captions:
            captions.append(text)
    return captions


def generate_split(split: str, n: int, seed: int) -> List[Dict[str, Any]]:
    """Karpathy-format image entries of one split (with 'scene'), deterministic in (seed, split)."""
    rng = np.random.default_rng([seed, SPLIT_SEED[split]])
    entries = []
    for k in range(n):
        scene = make_scene(rng)
        captions = five_captions(scene, rng)
        entries.append({"filename": f"{split}_{k:06d}.jpg", "filepath": split, "split": split,
                        "imgid": ID_OFFSET[split] + k, "scene": scene,
                        "sentences": [{"raw": c, "sentid": CAPTIONS_PER_IMAGE * (ID_OFFSET[split] + k) + j}
                                      for j, c in enumerate(captions)]})
    return entries


# --------------------------------------------------------------------------- rendering and regions


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    angles = np.arange(10) * np.pi / 5 - np.pi / 2  # star: alternate outer/inner points
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return [(cx + rr * np.cos(t), cy + rr * np.sin(t)) for rr, t in zip(radii, angles)]


def draw_scene(scene: Sequence[Mapping[str, Any]], rng: np.random.Generator, width: int = CANVAS,
               height: int = CANVAS) -> Image.Image:
    """The scene drawn on a width x height canvas (noisy grey background).

    The 64x64 layout is stretched to the canvas (x by width/64, y by height/64),
    so a square resize of any canvas gives back the 64x64 picture: the web set's
    images of varying size and aspect ratio show the scenes the jpg splits show.
    """
    sx, sy = width / CANVAS, height / CANVAS  # exactly 1.0 for the jpg splits: their bytes do not change
    grey = int(rng.integers(40, 90))
    pixels = (grey + rng.integers(0, 12, (height, width, 3))).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)

    def box(x1: float, y1: float, x2: float, y2: float) -> List[float]:
        return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]

    for obj in scene:
        x1, y1, x2, y2 = obj["box"]
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj["colour"]][0]) + rng.normal(0, 8, 3), 0, 255))
        if obj["shape"] == "circle":
            draw.ellipse(box(x1, y1, x2, y2), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box(x1 + 1, y1 + 1, x2 - 1, y2 - 1), fill=fill)
        elif obj["shape"] == "cross":
            w = r / 3
            draw.rectangle(box(cx - w, y1, cx + w, y2), fill=fill)
            draw.rectangle(box(x1, cy - w, x2, cy + w), fill=fill)
        else:
            draw.polygon([(x * sx, y * sy) for x, y in _polygon(obj["shape"], cx, cy, r)], fill=fill)
    return image


def encode_image(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """The image as JPEG (quality 90), PNG or WEBP (quality 90) bytes."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": 90}))
    return buf.getvalue()


def render(scene: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> bytes:
    """The scene as JPEG bytes (64x64, noisy grey background)."""
    return encode_image(draw_scene(scene, rng))


def attributes(obj: Mapping[str, Any]) -> np.ndarray:
    """(ATTR_DIM,) float32: one-hot shape, colour, size, grid cell, then the box in [0, 1]."""
    a = np.zeros(ATTR_DIM, dtype=np.float32)
    a[SHAPE_NAMES.index(obj["shape"])] = 1
    a[len(SHAPES) + COLOUR_NAMES.index(obj["colour"])] = 1
    a[len(SHAPES) + len(COLOURS) + SIZE_NAMES.index(obj["size"])] = 1
    col, row = obj["cell"]
    a[len(SHAPES) + len(COLOURS) + len(SIZES) + row * GRID + col] = 1
    a[-4:] = np.asarray(obj["box"]) / CANVAS
    return a


def region_features(scene: Sequence[Mapping[str, Any]], projection: np.ndarray,
                    rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Regions (R, F) float16 and boxes (R, 4) float32 of one scene, R = objects + 0..2 extras."""
    attrs, noise = [attributes(o) for o in scene], [0.5] * len(scene)
    for _ in range(int(rng.integers(3))):
        if rng.random() < 0.5:  # a second, shifted and noisier detection of one object
            obj = dict(scene[int(rng.integers(len(scene)))])
            obj["box"] = list(np.asarray(obj["box"]) + rng.uniform(-3, 3, 4))
            attrs.append(attributes(obj))
            noise.append(0.8)
        else:  # background: only a box, no object attributes
            a = np.zeros(ATTR_DIM, dtype=np.float32)
            x, y = rng.uniform(0, 0.7, 2)
            a[-4:] = [x, y, x + 0.3, y + 0.3]
            attrs.append(a)
            noise.append(0.8)
    order = rng.permutation(len(attrs))
    a = np.stack(attrs)[order]
    sigma = np.asarray(noise)[order, None]
    regions = a @ projection + sigma * rng.standard_normal((len(a), projection.shape[1]), dtype=np.float32)
    return regions.astype(np.float16), (a[:, -4:]).astype(np.float32)


def projection_matrix(seed: int, region_dim: int) -> np.ndarray:
    # Scaled so that a region (about 4 active attributes) has features of unit-order size.
    return np.random.default_rng([seed, 0]).standard_normal((ATTR_DIM, region_dim), dtype=np.float32) / 2.0


# --------------------------------------------------------------------------- building


def _existing(out_dir: str, params: Mapping[str, Any], skip_existing: bool) -> bool:
    """True when out_dir holds a complete build of the same params and skip_existing is set."""
    path = os.path.join(out_dir, MANIFEST)
    if not (skip_existing and os.path.isfile(path)):
        return False
    with open(path) as f:
        built = json.load(f).get("build", {}).get("synthetic")
    if built != dict(params):
        raise BuildError(f"{out_dir} was built with other parameters ({built}) than asked ({dict(params)}); "
                         "pass --overwrite to rebuild it or choose another --out")
    return True


def write_raw(raw_dir: str, entries: Dict[str, List[Dict[str, Any]]], params: Mapping[str, Any]) -> str:
    """Write raw/dataset_synthetic.json (Karpathy format plus each image's scene); returns its path."""
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, "dataset_synthetic.json")
    atomic_json(path, {"dataset": SOURCE, "build": dict(params),
                       "images": [e for split in SPLITS for e in entries.get(split, [])]},
                indent=None, separators=(",", ":"))
    return path


def build_split(out_dir: str, mode: str, split: str, items: Sequence[Mapping[str, Any]],
                params: Mapping[str, Any], shard_size: int, overwrite: bool) -> None:
    """Write one split's shards in one mode: regions (+ boxes) or jpg."""
    seed, dim = int(params["seed"]), int(params["region_dim"])
    if mode == "regions":
        encoder = SampleEncoder(["regions.npy", "boxes.npy"],
                                {"regions.npy": {"dtype": "float16", "shape": [None, dim]},
                                 "boxes.npy": {"dtype": "float32", "shape": [None, 4]}})
        projection = projection_matrix(seed, dim)
    else:
        encoder = SampleEncoder(["jpg"], {})
    # Separate streams per split and mode: building one mode never changes the other.
    rng = np.random.default_rng([seed, SPLIT_SEED[split], 2 if mode == "regions" else 1])
    with ShardWriter(out_dir, split=split, source=SOURCE, encoder=encoder, shard_size=shard_size,
                     build={"command": "synthetic", "synthetic": dict(params)}, overwrite=overwrite) as writer:
        for k, entry in enumerate(items):
            if mode == "regions":
                regions, boxes = region_features(entry["scene"], projection, rng)
                arrays: Dict[str, Any] = {"regions.npy": regions, "boxes.npy": boxes}
            else:
                arrays = {"jpg": render(entry["scene"], rng)}
            meta = sample_json(entry["imgid"], [c["raw"] for c in entry["sentences"]], split, SOURCE,
                               [c["sentid"] for c in entry["sentences"]])
            writer.add(f"{SOURCE}_{split}_{k:06d}", meta, arrays)


def _build_splits(jobs: Sequence[Tuple[Any, ...]]) -> None:
    for job in jobs:
        build_split(*job)


def build_synthetic(out: str, *, seed: int = 0, train_images: int = DEFAULT_SIZES["train"],
                    val_images: int = DEFAULT_SIZES["val"], test_images: int = DEFAULT_SIZES["test"],
                    region_dim: int = 2048, shard_size: int = 500, modes: Sequence[str] = ("regions", "jpg"),
                    skip_existing: bool = False, overwrite: bool = False) -> List[str]:
    """Build every split in the asked modes; returns the shard folders written or kept."""
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    if any(n < 1 for n in sizes.values()) or region_dim < 1:
        raise BuildError(f"image counts and --region-dim must be positive, got {sizes}, region_dim={region_dim}")
    unknown = set(modes) - {"regions", "jpg"}
    if unknown or not modes:
        raise BuildError(f"--modes must be a non-empty subset of regions,jpg; got {','.join(modes)}")
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "sizes": sizes, "region_dim": region_dim}
    folders = {(m, s): os.path.join(out, "shards", m, s) for m in modes for s in SPLITS}
    todo = [key for key, folder in folders.items() if not _existing(folder, params, skip_existing)]
    if todo:
        entries = {s: generate_split(s, n, seed) for s, n in sizes.items()}
        write_raw(os.path.join(out, "raw"), entries, params)
        # One process per mode: the two modes are independent and each takes about half the time.
        # With --skip-existing, a folder left unfinished by an interrupted build (no manifest) is redone.
        redo = {k: overwrite or (skip_existing and not os.path.isfile(os.path.join(folders[k], MANIFEST)))
                for k in todo}
        jobs = {m: [(folders[m, s], m, s, entries[s], params, shard_size, redo[m, s]) for mm, s in todo if mm == m]
                for m in modes}
        jobs = [j for j in jobs.values() if j]
        if len(jobs) == 1:
            _build_splits(jobs[0])
        else:
            with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("fork")) as pool:
                for done in [pool.submit(_build_splits, j) for j in jobs]:
                    done.result()
    return [folders[k] for k in sorted(folders)]


def register(commands: argparse._SubParsersAction) -> None:
    from data_shards import web_synthetic  # imports this module: not at the top

    p = commands.add_parser("synthetic", help="the built-in synthetic dataset, every split, both modes",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output root (the demo uses data/synthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--val-images", type=int, default=DEFAULT_SIZES["val"], help="1000 for the COCO 1K protocol")
    p.add_argument("--test-images", type=int, default=DEFAULT_SIZES["test"], help="5000 for COCO 1K/5K")
    p.add_argument("--region-dim", type=int, default=2048, help="F of regions.npy (2048 = BUTD features)")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--modes", default="regions,jpg", help="comma list of regions,jpg")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep shard folders already built with the same parameters")
    p.add_argument("--overwrite", action="store_true", help="replace existing shard folders")
    p.add_argument("--web", action="store_true",
                   help="also write DIR/web/{train,extra}: img2dataset-layout tars, one caption per image")
    p.add_argument("--web-train-images", type=int, default=web_synthetic.DEFAULT_IMAGES["train"],
                   help="images of DIR/web/train")
    p.add_argument("--web-extra-images", type=int, default=web_synthetic.DEFAULT_IMAGES["extra"],
                   help="images of DIR/web/extra")
    p.add_argument("--web-shard-size", type=int, default=web_synthetic.DEFAULT_SHARD_SIZE,
                   help=f"images per web tar (at most {web_synthetic.KEYS_PER_SHARD})")

    def run(a: argparse.Namespace) -> None:
        for folder in build_synthetic(a.out, seed=a.seed, train_images=a.train_images, val_images=a.val_images,
                                      test_images=a.test_images, region_dim=a.region_dim,
                                      shard_size=a.shard_size, modes=a.modes.split(","),
                                      skip_existing=a.skip_existing, overwrite=a.overwrite):
            print(folder)
        if a.web:
            for folder in web_synthetic.build_web(
                    os.path.join(a.out, "web"), seed=a.seed, shard_size=a.web_shard_size,
                    images={"train": a.web_train_images, "extra": a.web_extra_images},
                    skip_existing=a.skip_existing, overwrite=a.overwrite):
                print(web_synthetic.brace_pattern(folder))

    p.set_defaults(run=run)
