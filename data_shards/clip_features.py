"""Add frozen-CLIP features (for CGE) to existing shards, writing new shards.

For every sample of --in, the output sample holds all its members plus
``clip_image.npy`` (D,) and ``clip_text.npy`` (5, D), float16, L2-normalised
outputs of an open_clip model in eval mode. The input is never modified.

Images come from the sample's own ``jpg`` member; region-only shards (e.g.
from ``precomp``) take them from --images-from, a folder of jpg shards of
the same images, matched by image_id.

Resumable: each output shard is renamed into place when complete, so a rerun
with the same arguments skips finished shards; the manifest comes last.
Weights come from a local file (--weights); '' means random init (tests).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from data_shards.writer import (BuildError, CaptionCounts, TarShard, count_captions, encode_npy, prepare_output,
                                write_manifest)
from user_dist.atomic import atomic_json, is_temporary
from user_dist.data_format import (MANIFEST, Manifest, RawSample, ShardInfo, decode_json, iter_raw_samples,
                                   load_manifest, sha256_file, split_member_name)

PARAMS_FILE = ".clip_build.json"
log = logging.getLogger(__name__)


class ClipEncoder:
    """A frozen open_clip model: images (PIL) and captions -> L2-normalised float16 features."""

    def __init__(self, model: str, weights: str, model_config: str = "", device: str = ""):
        import open_clip
        import torch

        if model_config:
            open_clip.add_model_config(model_config)
        if weights and not os.path.isfile(weights):
            raise BuildError(f"--weights {weights} does not exist (pass a local open_clip checkpoint, or '' for "
                             "random init)")
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            # Random init is seeded: a resumed (or repeated) build uses the same model.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=weights or None, device=self.device)
        except RuntimeError as exc:
            raise BuildError(f"cannot build open_clip model '{model}': {exc}") from exc
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    def __call__(self, images: Sequence[Any], captions: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """images: N PIL images, captions: 5N strings -> (N, D) and (5N, D) float16."""
        torch = self.torch
        with torch.no_grad():
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(self.tokenizer(list(captions)).to(self.device), normalize=True)
        return img.float().cpu().numpy().astype(np.float16), txt.float().cpu().numpy().astype(np.float16)


class JpgIndex:
    """image_id -> JPEG bytes, read by offset from a folder of jpg shards."""

    def __init__(self, folder: str):
        manifest = load_manifest(folder)
        if not manifest.has("jpg"):
            raise BuildError(f"--images-from {folder}: these shards have no jpg member")
        self.where: Dict[Any, Tuple[str, int, int]] = {}
        for shard in manifest.shards:
            path = manifest.shard_path(shard)
            with tarfile.open(path) as tar:
                members = {}
                for info in tar.getmembers():
                    key, ext = split_member_name(info.name)
                    members.setdefault(key, {})[ext] = info
                for key, m in members.items():
                    meta = tar.extractfile(m["json"]).read()
                    image_id = json.loads(meta)["image_id"]
                    self.where[image_id] = (path, m["jpg"].offset_data, m["jpg"].size)

    def get(self, image_id: Any, raw: RawSample) -> bytes:
        if image_id not in self.where:
            raise BuildError(f"{raw.shard}: sample '{raw.key}' (image_id {image_id!r}) has no image in --images-from")
        path, offset, size = self.where[image_id]
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)


def _check_resume(out_dir: str, params: Mapping[str, Any], overwrite: bool) -> None:
    """Start fresh, or resume an unfinished build with the same parameters."""
    params_path = os.path.join(out_dir, PARAMS_FILE)
    if os.path.isfile(os.path.join(out_dir, MANIFEST)) or overwrite or not os.path.isfile(params_path):
        prepare_output(out_dir, overwrite)  # refuses a complete build or unknown shards unless overwrite
        atomic_json(params_path, dict(params), indent=None)  # a resumed build reads it back
        return
    with open(params_path) as f:
        previous = json.load(f)
    if previous != dict(params):
        raise BuildError(f"{out_dir} holds an unfinished CLIP build with other arguments ({previous}); "
                         "rerun with those, or pass --overwrite to start again")
    for name in os.listdir(out_dir):
        if is_temporary(name):  # left by a killed run
            os.remove(os.path.join(out_dir, name))


def _encode_shard(manifest: Manifest, shard: ShardInfo, out_dir: str, encoder: ClipEncoder,
                  index: "JpgIndex | None", batch_size: int) -> Tuple[ShardInfo, CaptionCounts]:
    from PIL import Image

    samples: List[Tuple[RawSample, Dict[str, Any]]] = []
    captions = CaptionCounts()
    with TarShard(os.path.join(out_dir, shard.name)) as out:
        def flush() -> None:
            images = []
            for raw, meta in samples:
                data = raw.members["jpg"] if "jpg" in raw.members else index.get(meta["image_id"], raw)
                try:
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                except Exception as exc:
                    raise BuildError(f"{raw.shard}: sample '{raw.key}': unreadable image ({exc})") from exc
            img, txt = encoder(images, [c for _, meta in samples for c in meta["captions"]])
            for k, (raw, _) in enumerate(samples):
                members = dict(raw.members)
                members["clip_image.npy"] = encode_npy(img[k])
                members["clip_text.npy"] = encode_npy(txt[5 * k:5 * k + 5])
                out.add(raw.key, members)
            samples.clear()

        for raw in iter_raw_samples(manifest.shard_path(shard)):
            meta = decode_json(raw)
            # clip_text.npy is declared (5, D): variable caption counts are not supported here yet.
            if len(meta["captions"]) != 5:
                raise BuildError(f"{raw.shard}: sample '{raw.key}' has {len(meta['captions'])} captions; CLIP "
                                 "features are built for 5 captions per image only (build the input with "
                                 "karpathy --first-five)")
            captions.add(len(meta["captions"]))
            samples.append((raw, meta))
            if len(samples) == batch_size:
                flush()
        if samples:
            flush()
        return out.finish(), captions


def build_clip(in_dir: str, out_dir: str, *, model: str = "ViT-B-32", weights: str = "", model_config: str = "",
               images_from: str = "", batch_size: int = 64, overwrite: bool = False, device: str = "") -> str:
    """Write in_dir's samples plus CLIP features to out_dir; returns the manifest path."""
    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise BuildError("--out must differ from --in: shards are never edited in place")
    manifest = load_manifest(in_dir)
    if not manifest.has("jpg") and not images_from:
        raise BuildError(f"{in_dir} has no jpg member; pass --images-from with jpg shards of the same images")
    params = {"in": os.path.abspath(in_dir), "model": model, "weights": weights, "model_config": model_config,
              "images_from": os.path.abspath(images_from) if images_from else ""}
    _check_resume(out_dir, params, overwrite)
    encoder = ClipEncoder(model, weights, model_config, device)
    index = JpgIndex(images_from) if images_from and not manifest.has("jpg") else None
    shards, captions = [], []
    for shard in manifest.shards:
        path = os.path.join(out_dir, shard.name)
        if os.path.isfile(path):  # finished by an earlier run (renamed into place only when complete)
            log.info("kept finished shard %s", path)
            shards.append(ShardInfo(shard.name, shard.num_samples, sha256_file(path), os.path.getsize(path)))
            captions.append(count_captions(path))
            continue
        info, counts = _encode_shard(manifest, shard, out_dir, encoder, index, batch_size)
        shards.append(info)
        captions.append(counts)
        log.info("wrote %s (%d samples)", path, shard.num_samples)
    dim = encoder.dim
    features = dict(manifest.features)
    features["clip_image.npy"] = {"dtype": "float16", "shape": [dim]}
    features["clip_text.npy"] = {"dtype": "float16", "shape": [5, dim]}
    path = write_manifest(out_dir, split=manifest.split, source=manifest.source,
                          members=sorted(set(manifest.members) | {"clip_image.npy", "clip_text.npy"}),
                          features=features, shards=shards, captions=captions,
                          build={"command": "clip", **params, "input_build": manifest.build})
    os.remove(os.path.join(out_dir, PARAMS_FILE))
    return path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("clip", help="add frozen-CLIP features to shards (new output folder)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="in_dir", required=True, help="input shard folder (one split)")
    p.add_argument("--out", required=True, help="output shard folder (must differ from --in)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (512-d: ViT-B-32, ViT-B-16, RN101)")
    p.add_argument("--weights", default="", help="local open_clip checkpoint file; '' = random init (tests only)")
    p.add_argument("--model-config", default="", help="extra open_clip model config JSON (its file name is the model)")
    p.add_argument("--images-from", default="", help="jpg shards of the same images, for region-only --in")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=lambda a: print(build_clip(a.in_dir, a.out, model=a.model, weights=a.weights,
                                                  model_config=a.model_config, images_from=a.images_from,
                                                  batch_size=a.batch_size, overwrite=a.overwrite,
                                                  device=a.device)))
