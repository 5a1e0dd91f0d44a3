"""Image embeddings from a local transformers vision model (ViT, DINOv2, CLIP's vision tower, ...).

Nothing is downloaded: the folder must hold ``config.json`` and the weights (``save_pretrained``
output). Images come as pixel arrays, no torchvision involved:

* with a ``preprocessor_config.json`` in the folder, the folder's image processor resizes and
  normalises them (any size, ``(H, W, C)`` or ``(C, H, W)``, uint8 0..255 or float 0..1);
* without one, images must already be the model's ``image_size``; uint8 is scaled to 0..1, then every
  channel is normalised with mean 0.5 and std 0.5 (ViT's convention).

The embedding is pooled from the last hidden states: ``"cls"`` (the first token, default: what ViT-style
models are trained to summarise into), ``"mean"`` (all tokens) or ``"pooler"`` (the model's pooler output).
The datasets of this project ship precomputed image/audio vectors; this module is for catalogues that
ship pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qarm.errors import ConfigError, DataError
from qarm.progress import progress_bar

Pooling = Literal["cls", "mean", "pooler"]
POOLINGS = ("cls", "mean", "pooler")


class ImageEncoder:
    """A vision backbone and (optionally) its image processor, loaded from a local folder.

    Parameters
    ----------
    path : folder with ``config.json`` and weights, e.g. written by ``ViTModel.save_pretrained``.
    pooling : "cls", "mean" or "pooler" (see the module docstring).
    device : torch device.

    Attributes
    ----------
    model : the transformers vision model (eval mode).
    processor : its image processor, or None when the folder has none.
    dim : embedding width (``hidden_size``).
    """

    def __init__(self, path: str | Path, *, pooling: Pooling = "cls", device: str = "cpu") -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"The 'pooling' parameter of ImageEncoder must be one of {list(POOLINGS)}. "
                              f"Got {pooling!r} instead.")
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"image model folder {str(folder)!r} does not exist")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"image model folder {str(folder)!r} has no config.json; pass a folder written by "
                              "save_pretrained (config.json + weights)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        # A dual encoder (CLIP, SigLIP) keeps its vision tower in .vision_model.
        self.model = getattr(model, "vision_model", model).to(device).eval()
        self.processor = None
        if (folder / "preprocessor_config.json").is_file():
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, use_fast=False)
        config = self.model.config
        self.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "hidden_sizes", [0])[-1])
        self.image_size = getattr(config, "image_size", None)
        self.channels = int(getattr(config, "num_channels", 3))
        self.pooling = pooling
        self.device = device
        self.path = str(folder)

    def pixel_values(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """``(n, C, S, S)`` float tensor ready for the model."""
        if self.processor is not None:
            batch = [np.asarray(image) for image in images]
            return self.processor(images=batch, return_tensors="pt")["pixel_values"]
        array = np.asarray(images)
        if array.ndim != 4:
            raise DataError(f"images must be (n, H, W, C) or (n, C, H, W) arrays, got shape {array.shape}")
        if array.shape[-1] == self.channels and array.shape[1] != self.channels:
            array = array.transpose(0, 3, 1, 2)
        size = self.image_size
        if array.shape[1] != self.channels or (size is not None and tuple(array.shape[2:]) != (size, size)):
            raise DataError(f"images must be {self.channels} x {size} x {size} (this folder has no image processor "
                            f"to resize them), got shape {array.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(array)).float()
        if array.dtype == np.uint8:
            pixels = pixels / 255.0
        return (pixels - 0.5) / 0.5

    @torch.no_grad()
    def encode(self, images: np.ndarray | Sequence[np.ndarray], *, batch_size: int = 32,
               progress: bool = False) -> np.ndarray:
        """Embeddings ``(n, dim)`` float32 of ``images`` (an array ``(n, ...)`` or a sequence of arrays)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"The 'batch_size' parameter of ImageEncoder.encode must be an int >= 1. "
                              f"Got {batch_size!r} instead.")
        n = len(images)
        chunks = []
        with progress_bar(n, "encoding images", progress) as advance:
            for start in range(0, n, batch_size):
                pixels = self.pixel_values(images[start:start + batch_size]).to(self.device)
                chunks.append(self._pool(self.model(pixel_values=pixels)).float().cpu().numpy())
                advance(len(pixels))
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)

    def _pool(self, output: Any) -> torch.Tensor:
        if self.pooling == "pooler":
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                raise ConfigError(f"{type(self.model).__name__} has no pooler output; use pooling='cls' or 'mean'")
            return pooled
        hidden = output.last_hidden_state
        if hidden.ndim == 4:  # convolutional backbones: (n, C, H, W) feature maps
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)


def load_image_encoder(path: str | Path, *, pooling: Pooling = "cls", device: str = "cpu") -> ImageEncoder:
    """:class:`ImageEncoder` from a local folder (a clear error when it is missing or has no config.json)."""
    return ImageEncoder(path, pooling=pooling, device=device)
