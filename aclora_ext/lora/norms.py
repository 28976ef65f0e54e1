"""sd-scripts' ``--scale_weight_norms`` on many modules at once (batched by shape)."""

from __future__ import annotations

from typing import Sequence

import torch

from .batching import shape_groups
from .module import ACLoRAModule


def apply_max_norm(modules: Sequence[ACLoRAModule], max_norm_value: float) -> tuple[int, float, float]:
    """sd-scripts' --scale_weight_norms: scale modules whose update norm exceeds ``max_norm_value``.

    ||up @ down||_F is computed from the two R x R Gram matrices, batched by
    shape; one host sync per call. Returns (keys_scaled, mean_norm, max_norm).
    """
    norms = []
    scaled = []
    with torch.no_grad():
        for _, indices in shape_groups(modules).items():
            batch = [modules[i] for i in indices]
            down = torch.stack([m.down_matrix().float() for m in batch])
            up = torch.stack([m.up_matrix().float() for m in batch])
            scale = torch.tensor([m.scale for m in batch], device=down.device)
            gram_up = up.transpose(1, 2) @ up
            gram_down = down @ down.transpose(1, 2)
            norm = (gram_up * gram_down).sum(dim=(1, 2)).clamp(min=0).sqrt() * scale
            clamped = norm.clamp(min=max_norm_value / 2)
            ratio = clamped.clamp(max=max_norm_value) / clamped
            root = ratio.sqrt()
            for m, r in zip(batch, root):
                m.lora_down.weight.mul_(r.to(m.lora_down.weight.dtype))
                m.lora_up.weight.mul_(r.to(m.lora_up.weight.dtype))
            norms.append(norm * ratio)
            scaled.append((ratio < 1).sum())
    all_norms = torch.cat([n.to("cpu") for n in norms])
    keys_scaled = int(sum(int(s) for s in scaled))
    return keys_scaled, float(all_norms.mean()), float(all_norms.max())
