"""``Compose``, ``ToTensor``, ``Normalize`` and ``functional.resize`` (nearest only: Anima's DiT resizes its padding
mask with it) with torchvision's documented semantics; nothing else."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch


class Compose:
    """Apply the transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, value):
        for transform in self.transforms:
            value = transform(value)
        return value


class ToTensor:
    """A PIL image or an HxWxC array to a CxHxW float tensor; uint8 values are scaled to [0, 1]."""

    def __call__(self, picture) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if tensor.dtype == torch.uint8:
            return tensor.to(torch.get_default_dtype()).div(255)
        return tensor


class Normalize:
    """(x - mean) / std per channel."""

    def __init__(self, mean, std):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std


class InterpolationMode:
    NEAREST = "nearest"


class _Missing(ModuleType):
    """``transforms.functional``: sd-scripts uses only ``resize`` (nearest) of it in LoRA training."""

    @staticmethod
    def resize(tensor: torch.Tensor, size, interpolation=InterpolationMode.NEAREST) -> torch.Tensor:
        """A ...xHxW tensor resized to ``size`` (h, w) by nearest neighbour, as torchvision does for tensors."""
        if interpolation != InterpolationMode.NEAREST:
            raise NotImplementedError(f"resize with {interpolation!r} is not part of the test stand-in")
        lead = tensor.shape[:-2]
        flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
        resized = torch.nn.functional.interpolate(flat.float(), size=list(size), mode="nearest").to(tensor.dtype)
        return resized.reshape(*lead, *resized.shape[-2:])

    def __getattr__(self, name: str):
        raise NotImplementedError(f"torchvision.transforms.functional.{name} is not part of the test stand-in for "
                                  "torchvision; install a torchvision that imports beside this torch")


functional = _Missing("torchvision.transforms.functional")
