"""Training-step time and memory of AC-LoRA against peft's LoRA on the same U-Net (issue 5, section 2).

One diffusers ``UNet2DConditionModel`` with SDXL's block layout (no attention
at the first level, linear projections, more transformer layers deeper down),
small enough for a CPU. The LoRA goes on the same layers in every variant: the
Linear layers inside its Transformer2DModel blocks (kohya's U-Net target set),
at the same rank and alpha. A step is sd-scripts' inner loop: (AC-LoRA only)
``network.on_step_start``, forward, epsilon-prediction MSE loss,
``accelerator.backward``, AdamW step, ``zero_grad``.

Variants, each in its own process (peak RSS is per process, and our class-level
``Accelerator.backward`` capture must not reach the peer):

- ``peft``: ``peft.inject_adapter_in_model(LoraConfig(r, lora_alpha, target_modules=...))``,
- ``aclora-off``: AC-LoRA with ``restart_mode=off`` (plain LoRA, loss capture on),
- ``aclora``: AC-LoRA with its defaults (product mode: forward hooks record
  each module's LoRA activations h h^T and its output's mean square for the
  component importance) and a RESTART every ``--restart-every`` steps; steps
  that ran a RESTART are left out of the step time (their cost is reported on
  its own line).

Rounds alternate the variants (peft, off, aclora, peft, ...) and the step
times of all rounds are pooled. Memory comes from separate, shorter runs (long
enough for one RESTART) in processes whose glibc maps every allocation of 64 KiB
or more on its own and unmaps it when freed, so that the peak RSS follows the
live tensors: the growth of the peak RSS over the RSS before the adapter is
attached (adapter, optimizer state, gradients, activations, the RESTART's
transients). On CUDA, ``torch.cuda.max_memory_allocated`` over the same phase.
An in-process run (``--smoke``, ``--in-process``) has no such memory figures
worth comparing. The per-step cost of
the loss capture is measured apart: ``Accelerator.backward`` on a tiny graph
through our wrapper and through the original method, and ``LossMeter.add``.

Targets: AC-LoRA step time <= 1.05x peft's, no extra memory beyond peft's.

    .venv/bin/python bench/step_overhead.py --quick
    .venv/bin/python bench/step_overhead.py --full --threads 1
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

from bench import common, rule_before

NAME = "step_overhead"
VARIANTS = ("peft", "aclora-off", "aclora")
TARGET_STEP_RATIO = 1.05


@dataclass(frozen=True)
class Size:
    """A U-Net size and the batch it trains on."""

    channels: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    latent: int
    batch: int
    context_len: int
    context_dim: int
    rank: int
    alpha: float
    steps: int
    warmup: int
    rounds: int
    restart_every: int


SIZES = {
    # a few milliseconds per step: only checks that the code runs
    "smoke": Size((32, 32, 64), (1, 1, 1), 8, 1, 8, 32, 4, 2.0, 3, 1, 1, 2),
    # ~0.1 s per step on one core
    "quick": Size((32, 64, 128), (1, 1, 2), 16, 2, 16, 64, 16, 8.0, 12, 2, 1, 5),
    # ~0.5 s per step on one core
    "full": Size((64, 128, 256), (1, 2, 2), 32, 2, 16, 128, 32, 16.0, 30, 3, 3, 8),
}


# --- the model and the adapters ---------------------------------------------------------------------------
def build_unet(size: Size, seed: int = 0) -> nn.Module:
    """SDXL's block layout at a CPU-friendly width (random weights, frozen, like a base model)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size.latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=size.channels,
        layers_per_block=1,
        transformer_layers_per_block=size.transformer_layers,
        norm_num_groups=min(32, size.channels[0]),
        cross_attention_dim=size.context_dim,
        attention_head_dim=tuple(max(1, c // 32) for c in size.channels),
        use_linear_projection=True,
    )
    unet.requires_grad_(False)
    return unet


def target_paths(unet: nn.Module) -> list[str]:
    """Module paths of the layers kohya's LoRA adapts in this U-Net (our target finder)."""
    from aclora_ext.families.sd import find_unet_targets

    path_of = {id(module): path for path, module in unet.named_modules()}
    return [path_of[id(t.layer)] for t in find_unet_targets(unet, conv3x3=False)]


def attach_peft(unet: nn.Module, size: Size) -> list[nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=size.rank, lora_alpha=size.alpha, lora_dropout=0.0, target_modules=target_paths(unet))
    inject_adapter_in_model(config, unet)
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def attach_aclora(unet: nn.Module, size: Size, mode: str, total_steps: int):
    from aclora_ext.network.factory import create_network

    options: dict[str, Any] = {"restart_mode": mode}
    if mode != "off":
        options["restart_every_steps"] = size.restart_every
    network = create_network(1.0, size.rank, size.alpha, None, None, unet, **options)
    if mode == "product":  # the RESTART's work is what is measured (no held-out loss here): cut at each one
        rule_before.use(network, cut_without_heldout=True)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.set_training_length(total_steps=total_steps)
    network.prepare_grad_etc(None, unet)
    network.train()
    return network, list(network.get_trainable_params())


def make_batch(size: Size, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(size.batch, 4, size.latent, size.latent, generator=gen)
    context = torch.randn(size.batch, size.context_len, size.context_dim, generator=gen)
    return {"latents": latents.to(device), "context": context.to(device)}


# --- one variant ------------------------------------------------------------------------------------------------
def run_variant(variant: str, size: Size, device: torch.device, memory_pass: bool = False) -> dict:
    """Train ``size.warmup + size.steps`` steps with one adapter; step times and memory of the training phase.

    ``memory_pass``: just long enough for one RESTART (``restart_every + 2``
    steps), for a process started under :data:`common.EXACT_RSS_ENV`, where the
    growth of the peak RSS over the RSS before the adapter is attached is the
    peak of the live tensors the training adds, to a few pages.
    """
    from accelerate import Accelerator

    from aclora_ext.harness.sdcalls import NUM_TRAIN_TIMESTEPS, add_noise

    unet = build_unet(size).to(device)
    adapted_layers = len(target_paths(unet))
    batch = make_batch(size, device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    common.release_memory()
    rss_before, max_rss_before = common.rss_bytes(), common.max_rss_bytes()
    total = size.restart_every + 2 if memory_pass else size.warmup + size.steps
    warmup = 0 if memory_pass else size.warmup
    with common.PeakMemory(device, interval=0.002) as mem:
        network = None
        if variant == "peft":
            params = attach_peft(unet, size)
        else:
            network, params = attach_aclora(unet, size, "off" if variant == "aclora-off" else "product", total)
        unet.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(1)
        walls, cpus, restart_seconds = [], [], []
        for step in range(total):
            restarts_before = network.clock.restarts if network is not None else 0
            common.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            if network is not None:
                network.on_step_start(None, unet)
            noise = torch.randn(batch["latents"].shape, generator=gen, device=device)
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (size.batch,), generator=gen, device=device)
            prediction = unet(add_noise(batch["latents"], noise, timesteps), timesteps, batch["context"]).sample
            loss = nn.functional.mse_loss(prediction.float(), noise.float())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.synchronize(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            restarted = network is not None and network.clock.restarts != restarts_before
            if restarted:
                restart_seconds.append(network.history[-1]["seconds"])
            elif step >= warmup:
                walls.append(wall)
                cpus.append(cpu)
    return {
        "variant": variant,
        "step_wall_s": walls,
        "step_cpu_s": cpus,
        "restarts": len(restart_seconds),
        "restart_s": restart_seconds,
        "trainable_params": sum(p.numel() for p in params),
        "adapted_layers": adapted_layers,
        "sampled_peak_growth_mb": mem.peak_mb,
        "max_rss_growth_mb": (common.max_rss_bytes() - rss_before) / 2**20,
        "max_rss_before_over_rss_mb": (max_rss_before - rss_before) / 2**20,
        "cuda_peak_growth_mb": mem.peak_mb if device.type == "cuda" else None,
        "final_loss": float(loss.detach()),
    }


# --- loss capture ------------------------------------------------------------------------------------------------
def capture_cost(calls: int = 2000, rounds: int = 5) -> dict:
    """Per-call cost (microseconds) of what our backward wrapper adds, on a graph too small to hide it."""
    from accelerate import Accelerator

    from aclora_ext.network import schedule
    from aclora_ext.network.factory import attach

    model = nn.Sequential(nn.Linear(4, 4))
    network = attach(model, max_rank=2, restart_mode="paper", restart_every_steps=10**9)
    network.train()
    schedule.install_backward_capture()
    accelerator = Accelerator(cpu=True)
    wrapped = type(accelerator).backward
    original = getattr(wrapped, "__wrapped__", wrapped)
    x = torch.randn(2, 4)
    loss_value = torch.tensor(0.5)

    def backward_through(method) -> None:
        for _ in range(calls):
            method(accelerator, model(x).sum())

    def meter_add() -> None:
        for _ in range(calls):
            network.loss_meter.add(loss_value)

    def on_backward() -> None:
        for _ in range(calls):
            network._on_backward(loss_value, accelerator)

    cases = {
        "backward, original": common.Case(lambda: backward_through(original)),
        "backward, with our capture": common.Case(lambda: backward_through(wrapped)),
        "LossMeter.add": common.Case(meter_add),
        "network._on_backward": common.Case(on_backward),
    }
    timings = common.interleaved(cases, rounds=rounds, warmup=1)
    micro = {name: t.median / calls * 1e6 for name, t in timings.items()}
    micro["capture overhead per step"] = micro["backward, with our capture"] - micro["backward, original"]
    schedule.forget(network)
    network.remove_from()
    return micro


# --- orchestration --------------------------------------------------------------------------------------------------
def variant_in_subprocess(variant: str, args, memory_pass: bool = False) -> dict:
    arguments = ["--variant", variant, "--size", args.size, "--device", args.device]
    if args.threads:
        arguments += ["--threads", str(args.threads)]
    env = None
    if memory_pass:
        arguments.append("--memory-pass")
        env = common.EXACT_RSS_ENV if torch.device(args.device).type == "cpu" else None
    return common.run_module_json("bench.step_overhead", arguments, timeout=1800, env_overrides=env)


def peak_growth_mb(result: dict) -> float:
    """The memory figure of one run: CUDA allocator peak, or the exact peak-RSS growth."""
    return result["cuda_peak_growth_mb"] if result["cuda_peak_growth_mb"] is not None else result["max_rss_growth_mb"]


def summarize(runs: dict[str, list[dict]], memory_runs: dict[str, list[dict]], basis: str) -> list[dict]:
    rows = []
    for variant, results in runs.items():
        memory = [peak_growth_mb(r) for r in memory_runs[variant]]
        walls = [t for r in results for t in r["step_wall_s"]]
        cpus = [t for r in results for t in r["step_cpu_s"]]
        restarts = [t for r in results for t in r["restart_s"]]
        rows.append(
            {
                "variant": variant,
                "step_ms": statistics.median(walls) * 1e3,
                "step_cpu_ms": statistics.median(cpus) * 1e3,
                "steps": len(walls),
                "trainable_params": results[0]["trainable_params"],
                "adapted_layers": results[0]["adapted_layers"],
                "peak_growth_mb": statistics.median(memory),
                "memory_runs_mb": memory,
                "restarts": sum(r["restarts"] for r in results),
                "restart_ms": statistics.median(restarts) * 1e3 if restarts else None,
            }
        )
    peer = next(r for r in rows if r["variant"] == "peft")
    key = "step_cpu_ms" if basis == "cpu" else "step_ms"
    for row in rows:
        row["step_x_peft"] = common.ratio(row[key], peer[key])
        row["memory_minus_peft_mb"] = row["peak_growth_mb"] - peer["peak_growth_mb"]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="run one variant in this process and print its JSON (used by the orchestrator)",
    )
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help=argparse_size_help())
    parser.add_argument(
        "--memory-pass",
        action="store_true",
        help="with --variant: the short memory run (start it under common.EXACT_RSS_ENV)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the variants in this process (fast, but memory figures are then not comparable)",
    )
    args = parser.parse_args(argv)
    device = common.setup(args)
    args.size = args.size or ("smoke" if args.smoke else args.mode)
    size = SIZES[args.size]

    if args.variant:
        print(json.dumps(run_variant(args.variant, size, device, args.memory_pass)), flush=True)
        return {}

    machine_before = common.machine_info(device)
    basis = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    in_process = args.in_process or args.smoke
    print(
        f"U-Net channels {size.channels}, latents {size.latent}x{size.latent}, batch {size.batch}, rank "
        f"{size.rank}, alpha {size.alpha:g}; {size.rounds} round(s) x {size.steps} steps per variant; "
        f"{'in-process' if in_process else 'one process per variant'}; ratios from "
        f"{'CPU time (1 thread)' if basis == 'cpu' else 'wall time'}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(size.rounds):
        for variant in VARIANTS:
            result = run_variant(variant, size, device) if in_process else variant_in_subprocess(variant, args)
            runs[variant].append(result)
            print(f"  {variant}: median step {statistics.median(result['step_wall_s']) * 1e3:.1f} ms", flush=True)
    memory_runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(1 if args.smoke or args.mode == "quick" else 2):
        for variant in VARIANTS:
            result = (
                run_variant(variant, size, device, memory_pass=True)
                if in_process
                else variant_in_subprocess(variant, args, memory_pass=True)
            )
            memory_runs[variant].append(result)
            print(f"  {variant}: peak memory growth {peak_growth_mb(result):.1f} MiB", flush=True)
    rows = summarize(runs, memory_runs, basis)
    capture = capture_cost(calls=200 if args.smoke else 2000, rounds=1 if args.smoke else 5)
    aclora = next(r for r in rows if r["variant"] == "aclora")
    capture_share = capture["capture overhead per step"] / (aclora["step_ms"] * 1e3)

    machine = common.machine_info(device)
    memory_label = "CUDA max allocated growth MiB" if device.type == "cuda" else "peak RSS growth MiB (exact pass)"
    common.print_table(
        f"Step time and memory, U-Net LoRA at rank {size.rank} — {common.describe_machine(machine)}",
        rows,
        [
            "variant",
            "step_ms",
            "step_cpu_ms",
            "step_x_peft",
            "steps",
            "peak_growth_mb",
            "memory_minus_peft_mb",
            "trainable_params",
            "adapted_layers",
            "restarts",
            "restart_ms",
        ],
        [
            "variant",
            "step ms (median wall)",
            "step ms (median CPU)",
            "x peft",
            "steps timed",
            memory_label,
            "vs peft MiB",
            "trainable params",
            "adapted layers",
            "RESTARTs (left out)",
            "RESTART ms",
        ],
    )
    capture_rows = [{"what": k, "us": v} for k, v in capture.items()]
    common.print_table("Loss capture, per call", capture_rows, ["what", "us"], ["what", "microseconds"])
    print(
        f"Capture overhead: {capture['capture overhead per step']:.1f} us per step = {capture_share:.3%} of an "
        f"AC-LoRA step here."
    )
    targets = []
    for row in rows:
        if row["variant"] != "peft":
            ok_time = row["step_x_peft"] <= TARGET_STEP_RATIO
            ok_memory = row["memory_minus_peft_mb"] <= 0.0
            targets.append(
                {
                    "variant": row["variant"],
                    "step time": f"{row['step_x_peft']:.3f}x peft (target <= {TARGET_STEP_RATIO}: "
                    f"{common.verdict(ok_time)})",
                    "memory": f"{row['memory_minus_peft_mb']:+.1f} MiB vs peft (target <= 0: "
                    f"{common.verdict(ok_memory)})",
                }
            )
    common.print_table("Targets", targets, ["variant", "step time", "memory"])
    if in_process:
        print("In-process run (smoke or --in-process): memory figures are not comparable between variants.")
    result = common.payload(
        NAME,
        args,
        device,
        size=size.__dict__,
        rows=rows,
        runs=runs,
        memory_runs=memory_runs,
        capture_us=capture,
        capture_share_of_step=capture_share,
        ratio_basis=basis,
        targets=targets,
        in_process=in_process,
        machine_before=machine_before,
    )
    common.write_json(NAME, result, args.out)
    return result


def argparse_size_help() -> str:
    return "model/batch size: " + "; ".join(
        f"{k}: channels {s.channels}, latents {s.latent}^2, batch {s.batch}, rank {s.rank}" for k, s in SIZES.items()
    )


if __name__ == "__main__":
    main()
