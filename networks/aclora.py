"""sd-scripts entry point: ``--network_module=networks.aclora``.

This folder is a namespace package (no ``__init__.py``), so it merges with
sd-scripts' own ``networks/`` folder. The implementation lives in ``aclora_ext``.
"""

from aclora_ext import ACLoRANetwork, attach, create_network, create_network_from_weights

__all__ = ["ACLoRANetwork", "attach", "create_network", "create_network_from_weights"]
