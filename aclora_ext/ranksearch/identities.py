"""Which image each training item is, from its clean latents (docs/identities.md).

Two per-item summaries are computed on the latents' device, inside the training step, with no host
read: a **fingerprint**, a 64-bit hash of the latents' exact float32 bits (equal for equal tensors,
different otherwise but with probability ~2^-64), and a **descriptor**, the latents average-pooled
to a ``GRID`` x ``GRID`` grid per channel, each channel's mean removed, scaled to unit norm. They are
resolved to image ids later, on the host, by :class:`Recogniser`:

- **exact** (sd-scripts' ``--cache_latents`` / ``--cache_latents_to_disk``: the trainer hands the
  same cached tensor every time it draws the image; colour augmentation and random crops cannot be
  cached): a fingerprint seen before is that image. With ``flip_aug`` an image has a second cached
  tensor, its flipped copy encoded on its own (not a mirror of the first): a new fingerprint whose
  descriptor, mirrored, lies within ``match_distance`` of an image seen once so far is that image's
  flipped view; otherwise it is a new image.
- **nearest** (latents encoded afresh every step: a new VAE sample, and with ``random_crop`` or
  ``color_aug`` a new crop or colour): the item is the known image whose descriptor (compared as it
  is and mirrored) is nearest, if it lies within ``match_distance``; otherwise a new image.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

#: the pooled grid of the descriptor (per channel)
GRID = 4
#: two descriptors (unit vectors) closer than this are views of one image (measured: docs/identities.md)
MATCH_DISTANCE = 0.5
#: an item joins an image only within this share of the distance from that image to any other
MARGIN = 0.5
#: descriptors kept per image for the nearest-neighbour match (its first views)
VIEWS_PER_IMAGE = 8

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in int64 arithmetic (products wrap modulo 2^64)."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def _float_bits(values: Sequence[float]) -> list[int]:
    """Floats as the int64 view of their float64 bits (exact, for an integer buffer)."""
    return torch.tensor(list(values), dtype=torch.float64).view(torch.int64).tolist()


def _from_float_bits(values: Sequence[int]) -> list[float]:
    return torch.tensor(list(values), dtype=torch.int64).view(torch.float64).tolist()


def fingerprint(latents: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of each item's exact values (int64, shape (batch,), on the latents' device).

    Each element's float32 bits are mixed with its position and summed modulo 2^64: equal tensors
    give equal hashes; a changed element changes the hash but with probability 2^-64.
    """
    flat = latents.detach().reshape(latents.shape[0], -1).float().contiguous()
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = _mix(torch.arange(flat.shape[1], device=flat.device, dtype=torch.int64))
    return _mix((_mix(bits ^ weights) * (weights | 1)).sum(dim=1))


def _grid(latents: torch.Tensor) -> torch.Tensor:
    """(batch, channels, height, width) for any layout: leading dims between batch and the last two
    become channels (a video latent's frames); 1-D latents get a height of 1."""
    x = latents.detach().float()
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    if x.dim() == 3:
        return x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def descriptor(latents: torch.Tensor) -> torch.Tensor:
    """Each item's pooled latents (float32, shape (batch, channels x GRID x GRID), unit norm, on the device).

    The per-channel mean is removed, so a colour or brightness shift moves it little; average pooling
    commutes with a horizontal flip, so a mirrored image's descriptor is (about) the mirror of this.
    """
    pooled = F.adaptive_avg_pool2d(_grid(latents), (GRID, GRID))
    pooled = pooled - pooled.mean(dim=(2, 3), keepdim=True)
    flat = pooled.reshape(pooled.shape[0], -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mirror(descriptors: torch.Tensor) -> torch.Tensor:
    """The descriptors of the horizontally flipped latents."""
    grid = descriptors.reshape(descriptors.shape[0], -1, GRID, GRID)
    return grid.flip(-1).reshape(descriptors.shape[0], -1)


class Recogniser:
    """Image ids for items, from their fingerprints and descriptors (host side; ids count from 0 in the
    order images are first seen).

    ``exact``: the trainer hands cached latents (see the module docstring); False: every item is
    matched to its nearest known image. An item joins its nearest image only when it lies within
    ``match_distance`` of it and within ``margin`` times the distance from that image to any other
    known image (so that in a set of similar images, say faces framed alike, the threshold shrinks).
    """

    def __init__(
        self,
        exact: bool,
        match_distance: float = MATCH_DISTANCE,
        margin: float = MARGIN,
        views_per_image: int = VIEWS_PER_IMAGE,
    ) -> None:
        for name, value in (("match_distance", match_distance), ("margin", margin)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Recogniser: {name}={value!r}; allowed: a positive number")
        self.exact = exact
        self.match_distance = float(match_distance)
        self.margin = float(margin)
        self.views_per_image = views_per_image
        self._known: dict[tuple, int] = {}  # (shape, fingerprint) -> image
        self._descriptors: dict[tuple, list[torch.Tensor]] = {}  # per latent shape: the kept views
        self._owners: dict[tuple, list[int]] = {}  # per latent shape: the image of each kept view
        self._view_count: list[int] = []  # per image: views kept (exact mode: its distinct cached tensors)
        self._gap: list[float] = []  # per image: distance from its views to the nearest view of another image

    @property
    def images(self) -> int:
        """How many distinct images have been seen."""
        return len(self._view_count)

    @property
    def known(self) -> dict[tuple, int]:
        """(latent shape, fingerprint) -> image, of every cached view seen (exact mode)."""
        return self._known

    @property
    def views(self) -> int:
        """How many distinct cached tensors (exact mode) or kept descriptors have been seen."""
        return sum(self._view_count)

    def resolve(self, shape: Sequence[int], fingerprints: Sequence[int], descriptors: torch.Tensor) -> list[int]:
        """The image id of each item of one batch (item order kept); ``shape``: one item's latent shape."""
        return [self._one(tuple(shape), int(f), d) for f, d in zip(fingerprints, descriptors.float().cpu())]

    def _distances(self, shape: tuple, d: torch.Tensor, direct: bool = True) -> torch.Tensor:
        """From ``d`` (and its mirror) to every kept view of this shape."""
        kept = self._descriptors.get(shape)
        if not kept:
            return torch.empty(0)
        stack = torch.stack(kept)
        mirrored = (stack - mirror(d[None])[0]).norm(dim=1)
        return torch.minimum((stack - d).norm(dim=1), mirrored) if direct else mirrored

    def _one(self, shape: tuple, fingerprint_value: int, d: torch.Tensor) -> int:
        key = (shape, fingerprint_value)
        if key in self._known:
            return self._known[key]
        owners = self._owners.get(shape, [])
        # exact mode: a new cached tensor is the flipped view of an image seen once, or a new image
        distances = self._distances(shape, d, direct=not self.exact)
        eligible = [i for i, image in enumerate(owners) if not self.exact or self._view_count[image] == 1]
        image = None
        if eligible:
            row = min(eligible, key=lambda i: float(distances[i]))
            nearest, distance = owners[row], float(distances[row])
            if distance < self.match_distance and distance < self.margin * self._gap[nearest]:
                image = nearest
        if image is None:
            image = len(self._view_count)
            self._view_count.append(0)
            self._gap.append(float("inf"))
        if self._view_count[image] < self.views_per_image:
            self._keep(shape, image, d)
        if self.exact:
            self._known[key] = image
        return image

    # --- the resumable state (network/state.py stores it in an integer buffer) -----------------------
    def state(self) -> list[int]:
        """Everything resolution has learnt, as integers (floats by their bit patterns, so exact): per image
        its view count and gap, every (shape, fingerprint) -> image, every kept descriptor with its owner."""
        shapes = sorted(set(self._descriptors) | {shape for shape, _ in self._known})
        index = {shape: i for i, shape in enumerate(shapes)}
        out = [len(self._view_count), *self._view_count, *_float_bits(self._gap), len(shapes)]
        for shape in shapes:
            out += [len(shape), *shape]
        out.append(len(self._known))
        for (shape, fp), image in self._known.items():
            out += [index[shape], fp, image]
        for shape in shapes:
            kept = self._descriptors.get(shape, [])
            out.append(len(kept))
            for owner, d in zip(self._owners[shape] if kept else [], kept):
                bits = d.float().contiguous().view(torch.int32).tolist()
                out += [owner, len(bits), *bits]
        return out

    def load_state(self, values: Iterator[int]) -> None:
        """Restore what :meth:`state` wrote (``values`` read in order)."""
        images = next(values)
        self._view_count = [next(values) for _ in range(images)]
        self._gap = _from_float_bits([next(values) for _ in range(images)])
        shapes = []
        for _ in range(next(values)):
            shapes.append(tuple(next(values) for _ in range(next(values))))
        self._known = {}
        for _ in range(next(values)):
            shape, fp, image = shapes[next(values)], next(values), next(values)
            self._known[(shape, fp)] = image
        self._descriptors, self._owners = {}, {}
        for shape in shapes:
            for _ in range(next(values)):
                owner = next(values)
                bits = [next(values) for _ in range(next(values))]
                self._owners.setdefault(shape, []).append(owner)
                self._descriptors.setdefault(shape, []).append(
                    torch.tensor(bits, dtype=torch.int32).view(torch.float32)
                )

    def _keep(self, shape: tuple, image: int, d: torch.Tensor) -> None:
        """Keep a view of ``image``, updating the distances between images."""
        owners = self._owners.setdefault(shape, [])
        distances = self._distances(shape, d)
        for row, other in enumerate(owners):
            if other != image:
                distance = float(distances[row])
                self._gap[image] = min(self._gap[image], distance)
                self._gap[other] = min(self._gap[other], distance)
        self._descriptors.setdefault(shape, []).append(d)
        owners.append(image)
        self._view_count[image] += 1
