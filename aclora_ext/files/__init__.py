"""LoRA files: reading and writing safetensors atomically with sd-scripts' hashes (``storage``), and the
structure of a kohya LoRA state dict: modules, ranks, shape checks (``lora_dict``)."""
