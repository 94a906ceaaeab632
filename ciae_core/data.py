"""COCO-panoptic data → CIAE training batches.

Reads any data set in the COCO panoptic format (an image directory, a directory of panoptic PNGs
with ``id = R + 256 G + 256^2 B`` and 0 = void, and a JSON with ``images``, ``annotations[].
segments_info`` and ``categories`` carrying ``isthing``): COCO itself, and Cityscapes or Mapillary
after their panoptic converters. Also serves synthetic scenes (:mod:`ciae_core.synth`) in memory.

Augmentation works on the image and the panoptic id map *together* (before any mask is built),
so masks, boxes and labels always agree with the pixels: shorter-side resize (bilinear for the
image, nearest for the id map) with optional scale jitter, and horizontal flip. Padding to a
multiple of 32 happens in :func:`collate_panoptic`.

Training ids (docs/DESIGN.md): things first ``0..T-1``, then stuff ``T..T+S-1``, each group in the
JSON's category order; ``dataset.categories`` lists them in that order.
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ciae_core.user_input import quote

from .structures import CategoryInfo

logger = logging.getLogger(__name__)

cv2.setNumThreads(1)  # data loading parallelises over workers, not inside cv2


class DatasetError(ValueError):
    """A user-facing problem with a data set on disk (one line naming the file and the problem)."""


# --------------------------------------------------------------------------------------------
# Categories and the panoptic PNG encoding
# --------------------------------------------------------------------------------------------

def categories_from_json(cats: Sequence[dict]) -> list[CategoryInfo]:
    """COCO ``categories`` entries → ``CategoryInfo`` in training order (things first, then stuff,
    each in the given order). Entries without ``isthing`` raise :class:`DatasetError`."""
    infos = []
    for c in cats:
        if "id" not in c or "isthing" not in c:
            raise DatasetError(f"category entry {quote(c)} lacks 'id' or 'isthing' "
                               "(not a COCO panoptic categories list)")
        color = tuple(int(v) for v in c.get("color", (128, 128, 128)))
        infos.append(CategoryInfo(id=int(c["id"]), name=str(c.get("name", c["id"])), isthing=bool(c["isthing"]),
                                  color=color))
    if len({c.id for c in infos}) != len(infos):
        raise DatasetError("categories list has duplicate ids")
    return [c for c in infos if c.isthing] + [c for c in infos if not c.isthing]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours ``(H, W, 3)`` RGB → ids ``(H, W)`` int32 (``R + 256 G + 256^2 B``)."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_id`: ids ``(H, W)`` → ``(H, W, 3)`` uint8 RGB."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError("panoptic ids must be in [0, 2^24)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str) -> np.ndarray:
    """Read a COCO panoptic PNG → ``(H, W)`` int32 segment ids (0 = void)."""
    if not os.path.isfile(path):
        raise DatasetError(f"panoptic PNG not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot decode panoptic PNG: {path}")
    return rgb_to_id(bgr[..., ::-1])


def read_image_rgb(path: str) -> np.ndarray:
    """Read an image file → ``(H, W, 3)`` uint8 RGB (grey images are expanded to 3 channels)."""
    if not os.path.isfile(path):
        raise DatasetError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot decode image: {path}")
    return np.ascontiguousarray(bgr[..., ::-1])


def resize_id_map(id_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size = (h, w)`` with pixel-centre alignment
    (source pixel of output pixel ``i`` is ``floor((i + 0.5) * in / out)``, the same geometry as the
    bilinear image resize, so labels stay on their pixels). Works for any integer dtype."""
    h, w = int(size[0]), int(size[1])
    ih, iw = id_map.shape[:2]
    if (h, w) == (ih, iw):
        return id_map.copy()
    ys = np.minimum(((np.arange(h) + 0.5) * (ih / h)).astype(np.int64), ih - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * (iw / w)).astype(np.int64), iw - 1)
    return id_map[ys[:, None], xs[None, :]]


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def targets_from_panoptic(pan_ids: np.ndarray, segments_info: Sequence[dict], cat_id_to_train_id: dict[int, int],
                          num_things: int, source: str = "") -> dict[str, torch.Tensor]:
    """Per-segment training targets from a panoptic id map (see "Training batch" in docs/DESIGN.md).

    Args:
        pan_ids: ``(H, W)`` integer segment ids, 0 = void.
        segments_info: COCO ``segments_info`` dicts (``id``, ``category_id``, optional ``iscrowd``).
        cat_id_to_train_id: dataset category id → training id (things ``< num_things``).
        num_things: ``T``; a training id ``< T`` is a thing.
        source: name used in error messages (e.g. the PNG file).

    Returns dict with ``masks`` bool ``(K, H, W)``, ``labels`` int64 ``(K,)``, ``isthing`` bool
    ``(K,)``, ``iscrowd`` bool ``(K,)``, ``boxes`` float32 ``(K, 4)`` xyxy in pixels (tight box,
    exclusive right/bottom edge: ``x1 = max x + 1``), ordered as ``segments_info``.

    Segments listed in ``segments_info`` with no pixels left (e.g. after a resize) are dropped.
    Ids in the map that ``segments_info`` does not list, or unknown categories, raise
    :class:`DatasetError`. Crowd segments are kept with ``iscrowd=True`` (the model ignores them;
    their pixels count as void for the losses).
    """
    ids = np.asarray(pan_ids)
    h, w = ids.shape
    present, inverse = np.unique(ids.ravel(), return_inverse=True)
    info_by_id = {int(s["id"]): s for s in segments_info}
    missing = [int(v) for v in present.tolist() if v != 0 and int(v) not in info_by_id]
    if missing:
        raise DatasetError(f"{source or 'panoptic map'}: segment ids {missing[:5]} are in the PNG but not in "
                           f"the JSON segments_info")
    pos = {int(v): k for k, v in enumerate(present.tolist())}
    inverse = inverse.reshape(h, w)
    order, labels, crowd = [], [], []
    for s in segments_info:
        sid = int(s["id"])
        if sid == 0 or sid not in pos:
            continue
        cat = int(s["category_id"])
        if cat not in cat_id_to_train_id:
            raise DatasetError(f"{source or 'segments_info'}: segment {sid} has category_id {cat}, which is not in "
                               f"the categories list")
        order.append(pos[sid])
        labels.append(cat_id_to_train_id[cat])
        crowd.append(bool(s.get("iscrowd", 0)))
    k = len(order)
    if k:
        masks = inverse[None, :, :] == np.asarray(order)[:, None, None]
        rows, cols = masks.any(axis=2), masks.any(axis=1)
        y0, y1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
        x0, x1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
        boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    else:
        masks = np.zeros((0, h, w), dtype=bool)
        boxes = np.zeros((0, 4), dtype=np.float32)
    labels_t = torch.as_tensor(labels, dtype=torch.int64).reshape(k)
    return {"masks": torch.from_numpy(masks), "labels": labels_t, "isthing": labels_t < num_things,
            "iscrowd": torch.as_tensor(crowd, dtype=torch.bool).reshape(k), "boxes": torch.from_numpy(boxes)}


# --------------------------------------------------------------------------------------------
# Augmentation (image and id map together; randomness from torch so DataLoader workers differ)
# --------------------------------------------------------------------------------------------

def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side goes to ``short`` and the longer is capped at ``max_size``."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


@dataclass
class ResizeShortestEdge:
    """Resize so the shorter side is ``short`` (≤ ``max_size`` for the longer side).

    ``min_sizes``: one value = fixed size (paper default 800); several = jitter. ``sample_style``
    ``"choice"`` picks one of the values, ``"range"`` an integer uniformly in ``[min, max]`` (the
    paper's long schedule: shorter side in [640, 800]). Bilinear for the image, nearest (pixel-
    centre aligned) for the id map.
    """

    min_sizes: tuple[int, ...] = (800,)
    max_size: int = 1333
    sample_style: str = "choice"

    def __post_init__(self):
        self.min_sizes = tuple(int(s) for s in (self.min_sizes if isinstance(self.min_sizes, Sequence)
                                                 else (self.min_sizes,)))
        if not self.min_sizes or min(self.min_sizes) <= 0 or self.max_size <= 0:
            raise ValueError(f"min_sizes and max_size must be positive, got {self.min_sizes}, {self.max_size}")
        if self.sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {quote(self.sample_style)}")

    def sample_short(self) -> int:
        if len(self.min_sizes) == 1:
            return self.min_sizes[0]
        if self.sample_style == "range":
            lo, hi = min(self.min_sizes), max(self.min_sizes)
            return int(torch.randint(lo, hi + 1, (1,)).item())
        return self.min_sizes[int(torch.randint(len(self.min_sizes), (1,)).item())]

    def __call__(self, image: np.ndarray, pan_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        nh, nw = shortest_edge_size(h, w, self.sample_short(), self.max_size)
        if (nh, nw) == (h, w):
            return image, pan_ids
        interp = cv2.INTER_AREA if nh < h and nw < w else cv2.INTER_LINEAR
        return cv2.resize(image, (nw, nh), interpolation=interp), resize_id_map(pan_ids, (nh, nw))


@dataclass
class RandomHorizontalFlip:
    """Mirror image and id map left-right with probability ``prob``."""

    prob: float = 0.5

    def __call__(self, image: np.ndarray, pan_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.prob > 0 and torch.rand(()).item() < self.prob:
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(pan_ids[:, ::-1])
        return image, pan_ids


class Compose:
    """Apply ``(image, pan_ids) -> (image, pan_ids)`` transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, pan_ids):
        for t in self.transforms:
            image, pan_ids = t(image, pan_ids)
        return image, pan_ids

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def build_transforms(train: bool, min_sizes: Sequence[int] | int = (800,), max_size: int = 1333,
                     flip_prob: float = 0.5, sample_style: str = "choice") -> Compose:
    """Training: jittered shorter-side resize + horizontal flip; evaluation: resize to
    ``max(min_sizes)`` without flip (decision: evaluate at the largest training scale, as the paper
    tests at 800 after training with [640, 800])."""
    sizes = tuple(min_sizes) if isinstance(min_sizes, Sequence) else (int(min_sizes),)
    if train:
        return Compose([ResizeShortestEdge(sizes, max_size, sample_style), RandomHorizontalFlip(flip_prob)])
    return Compose([ResizeShortestEdge((max(sizes),), max_size)])


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------

class _PanopticSource(Dataset, abc.ABC):
    """Shared item logic: load raw (image, pan_ids, segments_info), transform, build targets.

    Items are ``(image, target)``: ``image`` uint8 ``(3, h, w)`` RGB tensor (collate makes it
    float32), ``target`` the dict of :func:`targets_from_panoptic` plus ``image_id``, ``file_name``
    and ``orig_size`` ``(H, W)`` of the untransformed image.
    """

    categories: list[CategoryInfo]
    transforms: Callable | None

    def _init_categories(self, categories: Sequence[CategoryInfo]):
        self.categories = list(categories)
        self.num_things = sum(c.isthing for c in self.categories)
        if [c.isthing for c in self.categories] != sorted((c.isthing for c in self.categories), reverse=True):
            raise DatasetError("categories must list all thing classes before the stuff classes")
        self.cat_id_to_train_id = {c.id: k for k, c in enumerate(self.categories)}

    @property
    def num_stuff(self) -> int:
        return len(self.categories) - self.num_things

    @abc.abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict], int, str]:
        """Untransformed ``(image HxWx3 uint8 RGB, pan_ids HxW int32, segments_info, image_id, file_name)``."""

    def ground_truth(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """Ground truth at the original resolution for evaluation: ``(pan_ids, segments_info)``."""
        _, pan, infos, _, _ = self.load(index)
        return pan, infos

    def __getitem__(self, index: int):
        image, pan, infos, image_id, file_name = self.load(index)
        orig_size = image.shape[:2]
        if self.transforms is not None:
            image, pan = self.transforms(image, pan)
        target = targets_from_panoptic(pan, infos, self.cat_id_to_train_id, self.num_things, source=file_name)
        target["image_id"] = image_id
        target["file_name"] = file_name
        target["orig_size"] = tuple(int(v) for v in orig_size)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


class CocoPanopticDataset(_PanopticSource):
    """A COCO-panoptic data set on disk.

    Args:
        image_dir: directory of the images (``images[].file_name``).
        panoptic_dir: directory of the panoptic PNGs (``annotations[].file_name``).
        json_path: the panoptic annotation JSON.
        transforms: ``(image, pan_ids) -> (image, pan_ids)``, e.g. :func:`build_transforms`.
        categories: impose this category list/order (e.g. a model's); default: the JSON's
            categories, things first. Every category used by the annotations must be in it.

    ``.categories`` (training order), ``.num_things``, ``.num_stuff``, ``.cat_id_to_train_id``.
    Raises :class:`DatasetError` (one line) for a missing or malformed JSON/directory; missing or
    undecodable files, size mismatches and PNG ids missing from the JSON are reported when the
    item is loaded. JSON segments without pixels are dropped with a warning (decision: harmless
    for training, so they should not stop a long run).
    """

    def __init__(self, image_dir: str, panoptic_dir: str, json_path: str, transforms: Callable | None = None,
                 categories: Sequence[CategoryInfo] | None = None):
        for d, what in ((image_dir, "image"), (panoptic_dir, "panoptic PNG")):
            if not os.path.isdir(d):
                raise DatasetError(f"{what} directory not found: {d}")
        if not os.path.isfile(json_path):
            raise DatasetError(f"panoptic JSON not found: {json_path}")
        try:
            with open(json_path) as f:
                doc = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{json_path} is not valid JSON: {e}") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc, dict) or key not in doc:
                raise DatasetError(f"{json_path} has no '{key}' list (not a COCO panoptic annotation file)")
        self.image_dir, self.panoptic_dir, self.json_path = image_dir, panoptic_dir, json_path
        self.transforms = transforms
        self._init_categories(categories if categories is not None else categories_from_json(doc["categories"]))
        images = {int(im["id"]): im for im in doc["images"]}
        self.entries = []
        for ann in doc["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DatasetError(f"{json_path}: annotation {ann.get('file_name')} refers to image_id {image_id}, "
                                   f"which is not in 'images'")
            for s in ann["segments_info"]:
                if int(s["category_id"]) not in self.cat_id_to_train_id:
                    raise DatasetError(f"{json_path}: image {image_id} segment {s['id']} has category_id "
                                       f"{s['category_id']}, which is not in the categories list")
            self.entries.append((images[image_id], ann))
        if not self.entries:
            raise DatasetError(f"{json_path} has no annotations")

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int):
        im, ann = self.entries[index]
        image = read_image_rgb(os.path.join(self.image_dir, im["file_name"]))
        png = os.path.join(self.panoptic_dir, ann["file_name"])
        pan = read_panoptic_png(png)
        if pan.shape != image.shape[:2]:
            raise DatasetError(f"{png} is {pan.shape[1]}x{pan.shape[0]} but its image {im['file_name']} is "
                               f"{image.shape[1]}x{image.shape[0]}")
        infos = ann["segments_info"]
        listed = {int(s["id"]) for s in infos}
        present = set(np.unique(pan).tolist()) - {0}
        if present - listed:
            raise DatasetError(f"{png}: segment ids {sorted(present - listed)[:5]} are in the PNG but not in the JSON")
        if listed - present:
            # Harmless (nothing to learn from an empty segment) but a sign of a broken converter:
            # warn once per image instead of stopping a long training run.
            logger.warning("%s: segment ids %s are in the JSON but not in the PNG; ignoring them",
                           png, sorted(listed - present)[:5])
            infos = [s for s in infos if int(s["id"]) in present]
        return image, pan, infos, int(im["id"]), im["file_name"]


class SyntheticPanopticDataset(_PanopticSource):
    """Synthetic scenes rendered on the fly (:func:`ciae_core.synth.render_scene`), item ``i`` from
    seed ``(seed, i)`` (identical to ``ciae-synth --seed seed`` image ``i``), no files needed.
    ``render_kwargs`` are passed to ``render_scene``."""

    def __init__(self, num_images: int, height: int = 320, width: int = 320, seed: int = 0,
                 transforms: Callable | None = None, **render_kwargs):
        from .synth import SYNTH_CATEGORIES
        if num_images < 1:
            raise DatasetError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.height, self.width, self.seed = int(num_images), int(height), int(width), int(seed)
        self.render_kwargs = render_kwargs
        self.transforms = transforms
        self._init_categories(SYNTH_CATEGORIES)

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int):
        from .synth import render_scene
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, pan, infos = render_scene((self.seed, int(index)), self.height, self.width, **self.render_kwargs)
        return image, pan, infos, int(index), f"{index:06d}.png"


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------

class PanopticBatch(NamedTuple):
    """A collated batch; unpacks as ``images, targets, image_sizes`` or use the attributes."""

    images: torch.Tensor
    targets: list[dict]
    image_sizes: list[tuple[int, int]]


def collate_panoptic(batch: Sequence[tuple[torch.Tensor, dict]], size_divisibility: int = 32) -> PanopticBatch:
    """Batch items → ``PanopticBatch(images, targets, image_sizes)`` (docs/DESIGN.md "Training batch").

    ``images``: float32 ``(N, 3, Hp, Wp)`` RGB 0..255, zero-padded bottom/right so that ``Hp, Wp``
    are the batch maxima rounded up to ``size_divisibility``; ``targets[i]["masks"]`` padded with
    False to ``(K, Hp, Wp)``; ``image_sizes``: ``(h, w)`` before padding.
    """
    hs = [int(img.shape[1]) for img, _ in batch]
    ws = [int(img.shape[2]) for img, _ in batch]
    d = max(1, int(size_divisibility))
    hp, wp = int(math.ceil(max(hs) / d) * d), int(math.ceil(max(ws) / d) * d)
    images = torch.zeros((len(batch), 3, hp, wp), dtype=torch.float32)
    targets = []
    for i, (img, tgt) in enumerate(batch):
        h, w = hs[i], ws[i]
        images[i, :, :h, :w] = img
        tgt = dict(tgt)
        masks = tgt["masks"]
        padded = torch.zeros((masks.shape[0], hp, wp), dtype=torch.bool)
        padded[:, :h, :w] = masks
        tgt["masks"] = padded
        targets.append(tgt)
    return PanopticBatch(images, targets, [(h, w) for h, w in zip(hs, ws)])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (our transforms draw from torch); numpy/cv2 get a derived seed too.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    cv2.setRNGSeed(int(seed % 2 ** 31))


def build_loader(dataset: Dataset, batch_size: int, num_workers: int = 2, shuffle: bool = True,
                 distributed: bool = False, seed: int = 0, drop_last: bool | None = None,
                 pin_memory: bool | None = None, size_divisibility: int = 32) -> DataLoader:
    """DataLoader over ``dataset`` yielding :class:`PanopticBatch` ``(images, targets, image_sizes)``.

    ``batch_size`` is per process. ``distributed=True`` uses a :class:`DistributedSampler`
    (rank/world size from the initialised process group); call ``loader.sampler.set_epoch(epoch)``
    each epoch for a new shuffle. Shuffling is seeded by ``seed`` (reproducible order; worker
    augmentation seeds derive from it and the rank). ``drop_last`` defaults to ``shuffle`` (training);
    ``pin_memory`` defaults to CUDA availability; workers are persistent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    drop_last = shuffle if drop_last is None else drop_last
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    generator = torch.Generator()
    # Distinct augmentation streams per rank (worker seeds derive from this generator).
    rank = torch.distributed.get_rank() if distributed and torch.distributed.is_initialized() else 0
    generator.manual_seed(int(seed) + 1_000_003 * rank)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=functools.partial(collate_panoptic, size_divisibility=size_divisibility),
                      pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                      worker_init_fn=_seed_worker, persistent_workers=num_workers > 0)
