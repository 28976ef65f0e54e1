"""LoRA files: reading and writing safetensors atomically with sd-scripts' hashes (``storage``), the
structure of a kohya LoRA state dict: modules, ranks, shape checks (``lora_dict``), a file's exact size
before it is written (``sizes``) and the ranks that make it fit a size (``fit``)."""
