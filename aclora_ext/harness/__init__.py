"""Outside sd-scripts: the support that tests, the demo, the benchmarks and ``aclora vram`` share.
``sdcalls`` (sd-scripts' side of a step: args, conditioning, the diffusion objective), ``replay``
(sd-scripts' training loop replayed through a network module), ``tiny`` (tiny random-weight models and
synthetic data), ``architectures`` (the real architectures as literal configs). Nothing that runs inside
sd-scripts imports from here."""
