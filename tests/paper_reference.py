"""A fixed-seed paper-mode run, pure torch: its final factors and RESTART history.

``tests/data/paper_mode_reference.safetensors`` holds what this run gave at
commit 74c87fa, the last commit before the product mode's rank search, made with
this file against that commit's package::

    git worktree add /tmp/before 74c87fa
    PYTHONPATH=/tmp/before python tests/paper_reference.py tests/data/paper_mode_reference.safetensors

``tests/test_paper_reference.py`` runs it again against the current package.
Only the public API both commits share is used (``attach``, ``set_training_length``,
``on_epoch_start``, ``record_loss``, ``history``).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

WIDTHS = (48, 64, 40)
EPOCHS = 20
STEPS_PER_EPOCH = 4


def run() -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train a 2-layer MLP toward a planted low-rank target in paper mode (RESTART every 4 epochs)."""
    from aclora_ext import attach

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.Tanh(), nn.Linear(WIDTHS[1], WIDTHS[2]))
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(o, 3, generator=g) @ torch.randn(3, i, generator=g) * 0.05
               for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    x = torch.randn(STEPS_PER_EPOCH, 32, WIDTHS[0], generator=g)
    with torch.no_grad():
        y = torch.tanh(x @ (model[0].weight + teacher[0]).T + model[0].bias) @ (model[2].weight + teacher[1]).T \
            + model[2].bias
    unit = float(y.pow(2).mean())  # the loss relative to the targets' mean square: ~0.1, where p = 1 - L^alpha works
    torch.manual_seed(2)
    network = attach(model, max_rank=16, alpha=16.0, restart_mode="paper", restart_every="4")
    network.set_training_length(total_epochs=EPOCHS)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=0.0)
    noise = torch.Generator().manual_seed(3)
    for _ in range(EPOCHS):
        network.on_epoch_start()
        for step in range(STEPS_PER_EPOCH):
            target = y[step] + 0.3 * unit ** 0.5 * torch.randn(y[step].shape, generator=noise)
            loss = (model(x[step]) - target).pow(2).mean() / unit
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            network.record_loss(loss.detach())
    factors = {f"{m.lora_name}.{part}": getattr(m, part).weight.detach().clone()
               for m in network.loras for part in ("lora_down", "lora_up")}
    history = [{"p": h["p"], "ranks": list(h["ranks"])} for h in network.history]
    return factors, history


if __name__ == "__main__":
    from safetensors.torch import save_file

    factors, history = run()
    save_file(factors, sys.argv[1], metadata={"history": json.dumps(history)})
    print(json.dumps(history))
