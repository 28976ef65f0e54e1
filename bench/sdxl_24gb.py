"""SDXL on a 24 GB card: peak VRAM and step time of AC-LoRA against plain LoRA (issue 5, section 4).

The full SDXL architecture with random weights, built in-process from literal
configs (``aclora_ext.harness.architectures.SDXL_UNET_CONFIG`` and the two CLIP text-tower
configs; nothing is downloaded): 1024^2 images as 128x128 latents, batch 1,
base weights in bf16, bf16 autocast, gradient checkpointing, LoRA at rank 128,
fp32 LoRA weights and AdamW (sd-scripts' ``--mixed_precision bf16
--gradient_checkpointing --network_dim 128``). Two set-ups: LoRA on the U-Net
only, and on the U-Net and both text encoders. Variants, each in its own
process so that every peak is its own:

- ``aclora``: AC-LoRA, the default product mode (the RESTART is timed after the steps,
  together with the export of the variable-rank file),
- ``aclora-off``: the same modules with ``restart_mode=off`` (a plain LoRA),
- ``peft``: peft's LoRA on the same layers (an independent plain LoRA).

Peak VRAM is ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
over the training steps (weights, LoRA, optimizer state, activations; the
CUDA context, ~0.3-0.5 GB more on nvidia-smi, is not included). Targets: peak
under 22.5 GB (the paper's RTX 3090 figure) and a step within 2% of plain LoRA.

On CUDA with the real architecture the script also runs ``aclora vram``'s
estimate of each set-up (on the meta device, in this process: about half a
minute each on a CPU) and records its error against the measured
``max_memory_allocated`` (and, with its margin, against ``max_memory_reserved``).

Without a CUDA device the script runs the same code on the tiny SDXL-like
models at a small latent size (a smoke test) and says that it measured no VRAM.

    .venv/bin/python bench/sdxl_24gb.py --device cuda          # the real thing
    .venv/bin/python bench/sdxl_24gb.py                        # CPU smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from bench import common

NAME = "sdxl_24gb"
VARIANTS = ("aclora", "aclora-off", "peft")
SETUPS = ("unet", "unet+te")
TARGET_PEAK_GB = 22.5
TARGET_STEP_RATIO = 1.02
NO_VRAM = "VRAM not measured (no CUDA device)"
NON_REENTRANT = {"use_reentrant": False}


@dataclass(frozen=True)
class Profile:
    models: str  # "sdxl": the real architecture; "tiny": aclora_ext.harness.tiny's SDXL-like models
    latent: int
    seq_len: int
    rank: int
    alpha: float
    steps: int
    warmup: int


PROFILES = {
    "sdxl": Profile("sdxl", 128, 77, 128, 64.0, 10, 3),
    "tiny": Profile("tiny", 16, 8, 8, 4.0, 3, 1),
}


# --- models -------------------------------------------------------------------------------------------------------
def build_models(profile: Profile, device: torch.device, dtype: torch.dtype) -> dict:
    """U-Net and [te1, te2] in ``dtype`` on ``device``, frozen; the real SDXL shapes are built there directly."""
    from aclora_ext.harness import architectures, tiny

    if profile.models == "tiny":
        models = tiny.sdxl_models(seed=0)
        unet, te1, te2 = models["unet"], *models["text_encoders"]
        unet, te1, te2 = (m.to(device=device, dtype=dtype) for m in (unet, te1, te2))
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # no fp32 copy of 2.6B parameters on the way
        try:
            with torch.device(device):
                unet = UNet2DConditionModel(**architectures.SDXL_UNET_CONFIG)
                te1 = CLIPTextModel(CLIPTextConfig(**architectures.SDXL_TE1_CONFIG))
                te2 = CLIPTextModelWithProjection(CLIPTextConfig(**architectures.SDXL_TE2_CONFIG))
        finally:
            torch.set_default_dtype(previous)
    for m in (unet, te1, te2):
        m.requires_grad_(False)
        m.eval()
    return {"unet": unet, "text_encoders": [te1, te2]}


def enable_checkpointing(models: dict, train_te: bool) -> None:
    models["unet"].enable_gradient_checkpointing()
    models["unet"].train()
    if train_te:
        for te in models["text_encoders"]:
            # non-reentrant, so that the LoRA inside gets gradients although the embeddings need none
            # (transformers 5 renamed the method; 4.x only has the old name, reentrant by default)
            if hasattr(te, "activation_checkpointing_enable"):
                te.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
            else:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
            te.train()


def token_ids(models: dict, profile: Profile, device: torch.device) -> torch.Tensor:
    """One caption: BOS, random words, EOS, padding (what the tokenizers would give)."""
    config = models["text_encoders"][0].config
    words = torch.randint(10, min(config.vocab_size, 49000), (profile.seq_len // 2,), generator=torch.Generator().manual_seed(0))
    ids = [config.bos_token_id, *words.tolist(), config.eos_token_id]
    ids += [config.pad_token_id] * (profile.seq_len - len(ids))
    return torch.tensor([ids[:profile.seq_len]], device=device)


# --- adapters -----------------------------------------------------------------------------------------------------------
def attach_aclora(models: dict, profile: Profile, mode: str, train_te: bool):
    """(network, {"unet": params, "te": params}); LoRA weights fp32 (no --full_bf16), built on the GPU directly."""
    from aclora_ext.network.factory import create_network

    te = models["text_encoders"] if train_te else None
    with torch.device(next(models["unet"].parameters()).device):
        network = create_network(1.0, profile.rank, profile.alpha, None, te, models["unet"], restart_mode=mode)
    network.apply_to(te, models["unet"], apply_text_encoder=train_te, apply_unet=True)
    network.prepare_grad_etc(te, models["unet"])
    network.train()
    parts = {"unet": [p for m in network.unet_loras for p in m.parameters()],
             "te": [p for m in network.text_encoder_loras for p in m.parameters()]}
    return network, parts


def attach_peft(models: dict, profile: Profile, train_te: bool) -> dict[str, list[nn.Parameter]]:
    from peft import LoraConfig, inject_adapter_in_model

    from aclora_ext.families.sd import find_text_encoder_targets, find_unet_targets

    parts = [(models["unet"], find_unet_targets(models["unet"], conv3x3=False))]
    if train_te:
        tes = models["text_encoders"]
        targets = find_text_encoder_targets(tes)
        parts += [(te, [t for t in targets if t.part == f"te{i + 1}"]) for i, te in enumerate(tes)]
    params: dict[str, list[nn.Parameter]] = {"unet": [], "te": []}
    for model, targets in parts:
        path_of = {id(module): path for path, module in model.named_modules()}
        config = LoraConfig(r=profile.rank, lora_alpha=profile.alpha, lora_dropout=0.0,
                            target_modules=[path_of[id(t.layer)] for t in targets])
        inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # fp32 LoRA weights, as the AC-LoRA variants have
                p.requires_grad_(True)
                params["unet" if model is models["unet"] else "te"].append(p)
    return params


def with_gradient(params: list[nn.Parameter]) -> int:
    """How many of ``params`` received a non-zero gradient in the last backward."""
    return sum(1 for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))


# --- one variant ---------------------------------------------------------------------------------------------------------
def run_variant(variant: str, setup: str, profile: Profile, device: torch.device) -> dict:
    from accelerate import Accelerator

    from aclora_ext.harness.sdcalls import NUM_TRAIN_TIMESTEPS, add_noise, call_unet, encode_text

    train_te = setup == "unet+te"
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    models = build_models(profile, device, dtype)
    enable_checkpointing(models, train_te)
    # bf16 autocast by hand (what accelerator.autocast() does under --mixed_precision bf16): accelerate's
    # state is a process-wide singleton that an earlier Accelerator may already have fixed
    accelerator = Accelerator(cpu=not cuda)
    autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
    ids = token_ids(models, profile, device)
    latents = torch.randn(1, 4, profile.latent, profile.latent, generator=torch.Generator().manual_seed(0)).to(device)
    network = None
    if variant == "peft":
        parts = attach_peft(models, profile, train_te)
    else:
        network, parts = attach_aclora(models, profile, "off" if variant == "aclora-off" else "product", train_te)
    params = parts["unet"] + parts["te"]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    walls = []
    loss = torch.zeros(())
    total = profile.warmup + profile.steps
    grads: dict[str, int] = {}
    for step in range(total):
        common.synchronize(device)
        start = time.perf_counter()
        if network is not None:
            network.on_step_start(models["text_encoders"], models["unet"])
        with torch.set_grad_enabled(train_te), autocast():
            conds = encode_text(models["text_encoders"], ids, sdxl=True)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), device=device)
        noisy = add_noise(latents, noise, timesteps).requires_grad_(True)  # as sd-scripts does under checkpointing
        with autocast():
            prediction = call_unet(models["unet"], noisy, timesteps, conds, sdxl=True)
        loss = nn.functional.mse_loss(prediction.float(), noise.float())
        accelerator.backward(loss)
        check = 0.0
        if step == total - 1:  # which parameters learn; a host sync per parameter, kept out of the step time
            common.synchronize(device)
            check_start = time.perf_counter()
            grads = {part: with_gradient(ps) for part, ps in parts.items()}
            check = time.perf_counter() - check_start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.synchronize(device)
        if step >= profile.warmup:
            walls.append(time.perf_counter() - start - check)
    result: dict[str, Any] = {
        "variant": variant, "setup": setup, "step_s": walls, "step_median_s": statistics.median(walls),
        "trainable_params": sum(p.numel() for p in params), "final_loss": float(loss.detach()),
        "params_with_gradient": grads, "params": {part: len(ps) for part, ps in parts.items()},
    }
    if cuda:
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    if network is not None and variant == "aclora":
        optimizer.zero_grad(set_to_none=True)
        common.synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        timing = common.time_call(lambda: network.restart(p=0.9), repeats=3, warmup=1, device=device)
        result["restart_s"] = timing.median
        result["restart_ranks"] = sorted(network.ranks().values())[len(network.loras) // 2]
        if cuda:
            result["restart_extra_gb"] = (torch.cuda.max_memory_allocated(device) - before) / 1e9
        export = common.time_call(lambda: network.state_for_export(torch.float16), repeats=1, warmup=0, device=device)
        result["export_s"] = export.median
        result["modules"] = len(network.loras)
    return result


def estimated(setup: str, profile: Profile) -> dict:
    """``aclora vram``'s estimate of one set-up of this benchmark: the same architecture, image size, rank, dtypes
    (bf16 weights and autocast, fp32 LoRA), checkpointing and AdamW; text encoders run every step (frozen for
    "unet"); no gradient clipping, as in ``run_variant``."""
    from aclora_ext.tools import vram

    size = profile.latent * 8
    result = vram.estimate(vram.Setup(
        family="sdxl", width=size, height=size, batch_size=1, rank=profile.rank, alpha=profile.alpha,
        mixed_precision="bf16", gradient_checkpointing=True, train_text_encoder=setup == "unet+te",
        optimizer="AdamW", max_grad_norm=0.0, cache_latents=True, attention="sdpa"))
    return result.as_dict() | {"peak_gb": result.peak_bytes / 1e9, "with_margin_gb": result.with_margin_bytes / 1e9}


def estimate_errors(rows: list[dict], estimates: dict[str, dict]) -> list[dict]:
    """One row per set-up: the estimate against the measured peaks of the AC-LoRA variants (relative errors)."""
    table = []
    for row in rows:
        estimate = estimates.get(row["setup"])
        if estimate is None or row["variant"] == "peft" or row.get("peak_allocated_gb") is None:
            continue
        row["estimate_gb"] = estimate["peak_gb"]
        row["estimate_error"] = (estimate["peak_gb"] - row["peak_allocated_gb"]) / row["peak_allocated_gb"]
        row["estimate_with_margin_error"] = (estimate["with_margin_gb"] - row["peak_reserved_gb"]) / row["peak_reserved_gb"]
        table.append({k: row[k] for k in ("setup", "variant", "estimate_gb", "peak_allocated_gb", "estimate_error",
                                          "peak_reserved_gb", "estimate_with_margin_error")})
    return table


# --- orchestration -------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=tuple(PROFILES), default=None,
                        help="sdxl: the real architecture (CUDA); tiny: the tiny SDXL-like models (default without CUDA)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="run one variant here, print its JSON")
    parser.add_argument("--setup", choices=SETUPS, default="unet")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--latent", type=int, default=None, help="latent size (images are 8x larger)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha stays rank / 2)")
    args = parser.parse_args(argv)
    device = common.setup(args)
    cuda = device.type == "cuda"
    profile = PROFILES[args.profile or ("sdxl" if cuda and not args.smoke else "tiny")]
    overrides = {"steps": args.steps, "warmup": args.warmup, "latent": args.latent, "rank": args.rank}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "rank" in overrides:
        overrides["alpha"] = overrides["rank"] / 2
    profile = Profile(**{**profile.__dict__, **overrides})

    if args.variant:
        print(json.dumps(run_variant(args.variant, args.setup, profile, device)), flush=True)
        return {}

    machine_before = common.machine_info(device)
    print(f"profile {profile.models}: latents {profile.latent}x{profile.latent} (images "
          f"{profile.latent * 8}^2), batch 1, bf16, gradient checkpointing, rank {profile.rank}, alpha "
          f"{profile.alpha:g}; {profile.steps} timed steps after {profile.warmup}; device {device}", flush=True)
    if not cuda:
        models = "the tiny SDXL-like models" if profile.models == "tiny" else "the SDXL architecture"
        print(f"{NO_VRAM}: a CPU run of {models} at {profile.latent}x{profile.latent} latents, which checks the "
              "code path; its step times say nothing about SDXL on a GPU.")
    setups = SETUPS if (args.mode == "full" or cuda) and not args.smoke else ("unet+te",)
    estimates = {}
    if cuda and profile.models == "sdxl":
        for setup in setups:
            estimates[setup] = estimated(setup, profile)
            print(f"  {setup}: aclora vram estimates a peak of {estimates[setup]['peak_gb']:.2f} GB allocated",
                  flush=True)
    rows = []
    for setup in setups:
        for variant in VARIANTS:
            if cuda:
                arguments = ["--variant", variant, "--setup", setup, "--device", args.device,
                             "--profile", profile.models, "--steps", str(profile.steps),
                             "--warmup", str(profile.warmup), "--latent", str(profile.latent),
                             "--rank", str(profile.rank)]
                result = common.run_module_json("bench.sdxl_24gb", arguments, timeout=3600)
            else:
                result = run_variant(variant, setup, profile, device)
            rows.append(result)
            print(f"  {setup} / {variant}: median step {result['step_median_s'] * 1e3:.0f} ms"
                  + (f", peak {result['peak_reserved_gb']:.2f} GB reserved" if cuda else ""), flush=True)
    for row in rows:
        plain = next(r for r in rows if r["setup"] == row["setup"] and r["variant"] == "aclora-off")
        peer = next(r for r in rows if r["setup"] == row["setup"] and r["variant"] == "peft")
        row["x_plain"] = common.ratio(row["step_median_s"], plain["step_median_s"])
        row["x_peft"] = common.ratio(row["step_median_s"], peer["step_median_s"])
        row["step_ms"] = row["step_median_s"] * 1e3
        row["restart_ms"] = row["restart_s"] * 1e3 if "restart_s" in row else None
        row["export_ms"] = row["export_s"] * 1e3 if "export_s" in row else None
        if not cuda:
            row["peak_allocated_gb"] = row["peak_reserved_gb"] = None

    machine = common.machine_info(device)
    vram = "" if cuda else f" — {NO_VRAM}"
    common.print_table(
        f"SDXL-shaped LoRA training ({profile.models} models, rank {profile.rank}) — "
        f"{common.describe_machine(machine)}{vram}", rows,
        ["setup", "variant", "step_ms", "x_plain", "x_peft", "peak_allocated_gb", "peak_reserved_gb",
         "trainable_params", "restart_ms", "export_ms"],
        ["LoRA on", "variant", "step ms (median)", "x plain LoRA (restart off)", "x peft", "peak allocated GB",
         "peak reserved GB", "trainable params", "RESTART ms", "export ms"])
    errors = estimate_errors(rows, estimates)
    if errors:
        common.print_table("aclora vram's estimate against the measured peak", errors,
                           ["setup", "variant", "estimate_gb", "peak_allocated_gb", "estimate_error", "peak_reserved_gb",
                            "estimate_with_margin_error"],
                           ["LoRA on", "variant", "estimate GB", "measured allocated GB", "error",
                            "measured reserved GB", "error of the estimate with its margin"])
    sdxl_step = None
    targets = []
    if cuda and profile.models == "sdxl":
        unet_rows = [r for r in rows if r["setup"] == "unet" and r["variant"] == "aclora"]
        sdxl_step = unet_rows[0]["step_median_s"] if unet_rows else None
        for row in rows:
            if row["variant"] != "aclora":
                continue
            targets.append({"setup": row["setup"],
                            "peak": f"{row['peak_reserved_gb']:.2f} GB reserved (target < {TARGET_PEAK_GB} GB: "
                                    f"{common.verdict(row['peak_reserved_gb'] < TARGET_PEAK_GB)})",
                            "step": f"{row['x_plain']:.3f}x plain, {row['x_peft']:.3f}x peft (target <= "
                                    f"{TARGET_STEP_RATIO}: {common.verdict(max(row['x_plain'], row['x_peft']) <= TARGET_STEP_RATIO)})"})
        common.print_table("Targets", targets, ["setup", "peak", "step"])
    else:
        print(NO_VRAM + "." if not cuda else "Targets apply to --profile sdxl only.")
    result = common.payload(NAME, args, device, profile=profile.__dict__, rows=rows, targets=targets,
                            vram_measured=cuda, sdxl_step_seconds=sdxl_step, machine_before=machine_before,
                            estimates=estimates, estimate_errors=errors)
    common.write_json(NAME, result, args.out)
    return result


if __name__ == "__main__":
    main()
