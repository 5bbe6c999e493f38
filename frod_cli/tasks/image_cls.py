"""Image classification (CIFAR-10/100, Fashion-MNIST, digits, an image folder).

Images may be PIL images (datasets.Image, imagefolder) or arrays (offline sources store uint8 arrays);
grayscale and RGBA become RGB, or grayscale when the processor normalises a single channel. Resizing and normalisation happen in `collate` with the model's (slow,
PIL-based) image processor: materialising float pixel tensors in `encode` would cost ~600 KB per 224px
image on disk. CIFAR's schema is `img`,`label`: set `task.image_field=img`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import datasets
import numpy as np
import torch
from PIL import Image

from .base import register_task
from .common import ClassificationConfig, ClassificationTask, model_config


@dataclass
class ImageClassificationConfig(ClassificationConfig):
    image_field: str = "image"
    image_size: Optional[int] = None  # pixels per side the model sees; None: the model's own


def to_image(x: Any, mode: str = "RGB") -> Image.Image:
    """A PIL image in `mode`: "RGB", or "L" for single-channel models (e.g. a ViT pretrained on Fashion-MNIST)."""
    if isinstance(x, Image.Image):
        return x if x.mode == mode else x.convert(mode)
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        # Float arrays in [0, 1] are scaled; anything else is taken as 0-255 intensities.
        arr = arr * 255.0 if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0 else arr
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert(mode)


@register_task("image_cls", config=ImageClassificationConfig)
class ImageClassification(ClassificationTask):
    auto_class = "AutoModelForImageClassification"
    modality = "image"

    def input_columns(self) -> List[str]:
        return [self.cfg.image_field]

    def normalise(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Images stored without datasets' Image metadata (a parquet written by pandas or pyarrow holds
        {bytes, path} structs; a CSV holds file paths) are read as images; a column of numbers is refused."""
        col, out = self.cfg.image_field, {}
        for split, ds in raw.items():
            feat = ds.features.get(col)
            encoded = isinstance(feat, dict) and "bytes" in feat
            if encoded or (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string", "binary")):
                ds = ds.cast_column(col, datasets.Image())
            elif isinstance(feat, datasets.Value):
                raise ValueError(f"split {split!r} column {col!r} holds {feat.dtype} values, not images (an image "
                                 "feature, encoded image bytes, image file paths or pixel arrays)")
            out[split] = ds
        return datasets.DatasetDict(out)

    def encode(self, data: datasets.DatasetDict, preprocessor: Any) -> datasets.DatasetDict:
        image, label = self.cfg.image_field, self.label_column
        data = data.select_columns([image, label])
        if label != "labels":
            data = data.rename_column(label, "labels")
        return data.rename_column(image, "image") if image != "image" else data

    def collate(self, preprocessor: Any) -> Callable[[list], Dict[str, torch.Tensor]]:
        s = self.cfg.image_size  # None: the processor's own size (the checkpoint's)
        kwargs = {"size": {"height": s, "width": s}} if s else {}

        mean = getattr(preprocessor, "image_mean", None)
        mode = "L" if isinstance(mean, (list, tuple)) and len(mean) == 1 else "RGB"

        def collate_fn(features: list) -> Dict[str, torch.Tensor]:
            pixels = preprocessor([to_image(f["image"], mode) for f in features], return_tensors="pt", **kwargs)["pixel_values"]
            return {"pixel_values": pixels, "labels": self.label_tensor([f["labels"] for f in features])}

        return collate_fn

    def model_inputs(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        # A task.image_size other than the checkpoint's needs interpolated position embeddings (ViT-style).
        native = getattr(model_config(model), "image_size", None)
        if self.cfg.image_size and native and self.cfg.image_size != native:
            return {**batch, "interpolate_pos_encoding": True}
        return batch
