"""Per-step cost of held slots: one LoRA module's forward + backward with and without a slot mask (CPU, 1 thread)."""
import sys, os, time, statistics
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from torch import nn
from aclora_ext.module import ACLoRAModule
torch.set_num_threads(1)
layer = nn.Linear(640, 640)
m = ACLoRAModule("lora_test", layer, 32, 16.0)
m.apply_to()
layer.requires_grad_(False)
x = torch.randn(2, 1024, 640)
def step():
    y = layer(x)
    y.pow(2).mean().backward()
times = {"all slots": [], "12 of 32 held": []}
for r in range(7):
    for label in times:
        m.hold_slots(None if label == "all slots" else torch.arange(32) >= 20)
        start = time.process_time()
        for _ in range(20):
            step()
        times[label].append((time.process_time() - start) / 20)
for label, t in times.items():
    print(f"{label}: {1000 * statistics.median(t):.2f} ms per forward+backward (incl. the frozen 640x640 layer)")
