"""AC-LoRA (Auto Component LoRA) for kohya-ss/sd-scripts.

Train a LoRA at a maximum rank; at every RESTART each module keeps the
components that earn their place and frees the others, so every module ends
with its own rank. sd-scripts loads it with ``--network_module=networks.aclora``;
other code can use :func:`attach`.

The folders, from the bottom up (each depends only on those above it):
``functional`` (pure tensor math), ``files`` (LoRA files), ``lora`` (one LoRA
layer, and operations batched over many), ``families`` (which layers of each
model family get a LoRA, and their names), ``ranksearch`` (the product mode's
rank search), ``network`` (what runs inside sd-scripts: kohya's contract),
``harness`` (sd-scripts' loop replayed and tiny models: tests, demo,
benchmarks), ``tools`` (what a user runs: inspect, resize, vram, demo).
This module is the public facade.
"""

from .files.storage import LoRAFileError
from .lora.report import RestartReport
from .network.factory import attach, create_network, create_network_from_weights
from .network.network import ACLoRANetwork
from .options import OPTIONS, ACLoRAConfig, OptionError, parse_network_args
from .tools.resize import resize_file, resize_state_dict
from .version import __version__

__all__ = [
    "attach",
    "create_network",
    "create_network_from_weights",
    "ACLoRANetwork",
    "ACLoRAConfig",
    "OPTIONS",
    "OptionError",
    "LoRAFileError",
    "RestartReport",
    "parse_network_args",
    "__version__",
    "resize_file",
    "resize_state_dict",
]
