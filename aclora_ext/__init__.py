"""AC-LoRA (Auto Component LoRA) for kohya-ss/sd-scripts.

Train a LoRA at a maximum rank; every few epochs a RESTART keeps, per module,
the components that carry a loss-driven fraction of the energy and refills the
rest with noise, so every module ends with its own rank. sd-scripts loads it
with ``--network_module=networks.aclora``; other code can use :func:`attach`.
"""

from .factory import attach, create_network, create_network_from_weights
from .files import LoRAFileError
from .network import ACLoRANetwork, __version__
from .options import OPTIONS, ACLoRAConfig, OptionError, parse_network_args
from .resize import resize_file, resize_state_dict
from .restart import RestartReport

__all__ = [
    "attach", "create_network", "create_network_from_weights", "ACLoRANetwork", "ACLoRAConfig", "OPTIONS",
    "OptionError", "LoRAFileError", "RestartReport", "parse_network_args", "__version__", "resize_file",
    "resize_state_dict",
]
