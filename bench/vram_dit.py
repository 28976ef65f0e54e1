"""``aclora vram``'s count of FLUX.1 dev and SD3.5 medium LoRA runs (issue 16): the tables of docs/vram.md.

Every run is sd-scripts' flux_train_network.py / sd3_train_network.py with --network_module networks.aclora
(rank 32, alpha 16), --gradient_checkpointing, --cache_latents, --cache_text_encoder_outputs,
--network_train_unet_only, --mixed_precision bf16, batch 1, counted on the meta device (no GPU):

- FLUX.1 dev at 512² and 1024² (T5 512 tokens), DiT in bf16 or --fp8_base, --blocks_to_swap 0 / 8 / 16,
  AdamW or Adafactor (AdamW8bit needs bitsandbytes installed to be counted);
- SD3.5 medium at 1024² (T5 256 tokens), AdamW and Adafactor, and with the text encoders on the GPU.

    .venv/bin/python bench/vram_dit.py            # every row (~15 minutes on a 2-core CPU)
    .venv/bin/python bench/vram_dit.py --smoke    # one FLUX.1 row at 512²

Not a timing: the numbers are the estimate (peak allocated, and with the margin for what is not
counted), the phase the peak falls in, and the largest card size of 8/12/16/24/32/48/80 GiB it fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools
from typing import Optional, Sequence

from aclora_ext.tools import vram
from bench import common

NAME = "vram_dit"
COMMON = dict(rank=32, alpha=16.0, mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
              cache_text_encoder_outputs=True, train_text_encoder=False, batch_size=1)
ADAFACTOR_ARGS = (("relative_step", "False"), ("scale_parameter", "False"), ("warmup_init", "False"))


def runs(smoke: bool) -> list[tuple[str, vram.Setup]]:
    found = []
    sizes, precisions, swaps, optimizers = ((512,), (False,), (0,), ("AdamW",)) if smoke else (
        (512, 1024), (False, True), (0, 8, 16), ("AdamW", "Adafactor"))
    for size, fp8, swap, optimizer in itertools.product(sizes, precisions, swaps, optimizers):
        args = ADAFACTOR_ARGS if optimizer == "Adafactor" else ()
        setup = vram.Setup(family="flux", width=size, height=size, fp8_base=fp8, blocks_to_swap=swap,
                           optimizer=optimizer, optimizer_args=args, **COMMON)
        found.append((f"FLUX.1 dev {size}², {'fp8_base' if fp8 else 'bf16'}, blocks_to_swap {swap}, {optimizer}",
                      setup))
    if not smoke:
        for optimizer, cached in (("AdamW", True), ("Adafactor", True), ("AdamW", False)):
            args = ADAFACTOR_ARGS if optimizer == "Adafactor" else ()
            settings = {**COMMON, "cache_text_encoder_outputs": cached}
            setup = vram.Setup(family="sd3", variant="5-medium", width=1024, height=1024, optimizer=optimizer,
                               optimizer_args=args, **settings)
            found.append((f"SD3.5 medium 1024², bf16, {optimizer}"
                          + ("" if cached else ", text encoders on the GPU (not cached)"), setup))
    return found


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = common.setup(args)
    rows = []
    for label, setup in runs(args.smoke):
        result = vram.estimate(setup, measure_restart=False)
        fits = [c for c in vram.CARD_SIZES_GIB if result.fits(c)]
        rows.append({"run": label, "peak_gib": round(result.peak_bytes / vram.GiB, 2),
                     "with_margin_gib": round(result.with_margin_bytes / vram.GiB, 2), "peak_phase": result.peak_phase,
                     "frozen_gib": round(result.breakdown.get(vram.FROZEN_UNET, 0) / vram.GiB, 2),
                     "smallest_card_gib": fits[0] if fits else None, "lora_parameters": result.lora_parameters,
                     "modules": result.modules, "seconds": round(result.seconds, 1), "setup": setup.describe()})
        print(f"{label}: {rows[-1]['peak_gib']} GiB, {rows[-1]['with_margin_gib']} with the margin", flush=True)
    common.print_table("aclora vram, FLUX.1 dev and SD3.5 medium (meta device; rank 32, checkpointing, cached "
                       "latents and text-encoder outputs, DiT only, batch 1)", rows,
                       ["run", "peak_gib", "with_margin_gib", "peak_phase", "smallest_card_gib"],
                       ["run", "peak GiB", "with the margin", "the peak falls in", "fits (GiB, with the margin)"])
    result = common.payload(NAME, args, device, rows=rows, not_counted=vram.NOT_COUNTED)
    common.write_json(NAME, result, args.out)
    return result


if __name__ == "__main__":
    main()
