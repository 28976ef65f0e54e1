"""At what scale does diffusers (+ peft) load each module of a kohya-format LoRA whose ranks differ?

Not a pytest test: a probe to run by hand in either venv (it reports; it does not assert):
  /work/main/.venv-ci-pinned/bin/python tests/diffusers_kohya_rank_check.py   # diffusers 0.32.2 (sd-scripts' pin)
  /work/main/.venv/bin/python tests/diffusers_kohya_rank_check.py             # current releases
Options: --only sd1|flux|te3, --json FILE.

For each scenario it writes a kohya file (random up/down, per-module rank and alpha), loads it with
diffusers' own loaders into random-weight models built in process, and compares, per kohya module,
the update peft applies (scaling * lora_B @ lora_A, summed over the layers the module maps to) with the
update every kohya consumer applies, alpha / rank * up @ down: ``scale`` is their ratio (1 = right).

  sd1   a tiny SD1-like UNet2DConditionModel and CLIPTextModel (diffusers names, like sd-scripts' SD1 files);
        kohya alphas reach peft as network_alphas
  flux  a FluxTransformer2DModel of 1 double + 1 single block at FLUX.1's width (diffusers 0.32 splits the
        single blocks' linear1 at the hard-coded 3072/12288 widths); diffusers folds alpha / rank into
        the weights when it converts kohya FLUX files
  te3   what converting a kohya FLUX file with T5 (lora_te3) keys and with the in_dims layers does
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

import torch

RANK, ALPHA = 4, 2.0


def peft_updates(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int, float]]:
    """module path -> (scaling * B @ A, r, alpha) for every peft LoRA layer (one adapter)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            adapter = next(iter(module.lora_A))
            a = module.lora_A[adapter].weight.detach().float()
            b = module.lora_B[adapter].weight.detach().float()
            found[name] = ((b.flatten(1) @ a.flatten(1)) * module.scaling[adapter], module.r[adapter],
                           float(module.lora_alpha[adapter]))
    return found


def kohya_module(shape_out: int, shape_in: int, rank: int, alpha: float, generator, pad_to: int = 0) -> dict:
    """down/up/alpha of one kohya module. With ``pad_to`` > 0 the rank-``rank`` update is stored at rank
    ``pad_to`` with zero rows/columns and up scaled by pad_to/rank; with ``pad_to`` < 0 it is stored at rank
    -pad_to with alpha scaled by -pad_to/rank instead: either way alpha / rank * up @ down is unchanged."""
    down = torch.randn(rank, shape_in, generator=generator) / shape_in ** 0.5
    up = torch.randn(shape_out, rank, generator=generator) / rank ** 0.5
    if pad_to:
        size = abs(pad_to)
        down = torch.cat([down, torch.zeros(size - rank, shape_in)])
        up = torch.cat([up * (size / rank if pad_to > 0 else 1.0), torch.zeros(shape_out, size - rank)], dim=1)
        alpha = alpha if pad_to > 0 else alpha * size / rank
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}


def expected_update(parts: dict) -> torch.Tensor:
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    return (up @ down) * (float(parts["alpha"]) / down.shape[0])


def compare(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> dict:
    rows = {}
    for name, want in expected.items():
        got = loaded.get(name)
        if got is None:
            rows[name] = {"scale": None, "note": "not loaded"}
            continue
        scale = float((got * want).sum() / (want * want).sum())
        rows[name] = {"scale": round(scale, 4),
                      "relative_error_at_that_scale": float((got - scale * want).norm() / (scale * want).norm())
                      if scale else None}
    return rows


# --- SD1 -------------------------------------------------------------------------------------------------
def sd1_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77))
    return unet, te


def sd1_targets(unet, te) -> dict[str, tuple[str, torch.nn.Linear]]:
    """kohya name -> (model part, Linear) for the attention and feed-forward Linears (as kohya's lora.py)."""
    targets = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in path:
            targets["lora_unet_" + path.replace(".", "_")] = ("unet", module)
    te_root = "" if hasattr(te, "text_model") else "text_model."  # transformers 5 dropped the level in paths
    for path, module in te.named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
            targets["lora_te_" + (te_root + path).replace(".", "_")] = ("te", module)
    return targets


def run_sd1(ranks: dict[str, int], alphas: dict[str, float], pads: dict[str, int]) -> dict:
    from diffusers import StableDiffusionPipeline

    unet, te = sd1_models()
    targets = sd1_targets(unet, te)
    generator = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for name, (_, layer) in targets.items():
        parts = kohya_module(layer.out_features, layer.in_features, ranks.get(name, RANK), alphas.get(name, ALPHA),
                             generator, pads.get(name, 0))
        expected[name] = expected_update(parts)
        state.update({f"{name}.{k}": v for k, v in parts.items()})
    converted, network_alphas = StableDiffusionPipeline.lora_state_dict(state)
    StableDiffusionPipeline.load_lora_into_unet(converted, network_alphas, unet=unet, adapter_name="probe")
    StableDiffusionPipeline.load_lora_into_text_encoder(converted, network_alphas, text_encoder=te,
                                                        adapter_name="probe")
    loaded = {}
    te_root = "" if hasattr(te, "text_model") else "text_model."
    for path, (update, _, _) in peft_updates(unet).items():
        loaded["lora_unet_" + path.replace(".", "_")] = update
    for path, (update, _, _) in peft_updates(te).items():
        loaded["lora_te_" + (te_root + path).replace(".", "_")] = update
    return compare(expected, loaded)


# --- FLUX ------------------------------------------------------------------------------------------------
HIDDEN = 3072
# BFL module (kohya name without lora_unet_) -> diffusers modules whose updates, concatenated on the output
# dimension, make it up (diffusers' kohya FLUX conversion)
FLUX_DOUBLE = {"img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn_proj": ["attn.to_out.0"],
               "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"], "img_mod_lin": ["norm1.linear"],
               "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               "txt_attn_proj": ["attn.to_add_out"], "txt_mlp_0": ["ff_context.net.0.proj"],
               "txt_mlp_2": ["ff_context.net.2"], "txt_mod_lin": ["norm1_context.linear"]}
FLUX_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
               "modulation_lin": ["norm.linear"]}
FLUX_SHAPES = {"img_attn_qkv": (3 * HIDDEN, HIDDEN), "img_attn_proj": (HIDDEN, HIDDEN),
               "img_mlp_0": (4 * HIDDEN, HIDDEN), "img_mlp_2": (HIDDEN, 4 * HIDDEN),
               "img_mod_lin": (6 * HIDDEN, HIDDEN), "linear1": (7 * HIDDEN, HIDDEN), "linear2": (HIDDEN, 5 * HIDDEN),
               "modulation_lin": (3 * HIDDEN, HIDDEN)}
FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
                   axes_dims_rope=(16, 56, 56))


def flux_kohya_modules() -> dict[str, tuple[tuple[int, int], list[str]]]:
    modules = {}
    for short, parts in FLUX_DOUBLE.items():
        shape = FLUX_SHAPES[short.replace("txt_", "img_")]
        modules[f"lora_unet_double_blocks_0_{short}"] = (shape, [f"transformer_blocks.0.{p}" for p in parts])
    for short, parts in FLUX_SINGLE.items():
        modules[f"lora_unet_single_blocks_0_{short}"] = (FLUX_SHAPES[short],
                                                          [f"single_transformer_blocks.0.{p}" for p in parts])
    return modules


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_CONFIG)
    return model.to_empty(device="cpu")  # base weights are never used here: only the LoRA layers are read


def run_flux(ranks: dict[str, int], alphas: dict[str, float], pads: dict[str, int]) -> dict:
    from diffusers import FluxPipeline

    modules = flux_kohya_modules()
    generator = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for name, ((out_dim, in_dim), _) in modules.items():
        parts = kohya_module(out_dim, in_dim, ranks.get(name, RANK), alphas.get(name, ALPHA), generator,
                             pads.get(name, 0))
        expected[name] = expected_update(parts)
        state.update({f"{name}.{k}": v for k, v in parts.items()})
    converted = FluxPipeline.lora_state_dict(state)
    converted, network_alphas = converted if isinstance(converted, tuple) else (converted, None)
    first_lora_b = next(k for k in converted if "lora_B" in k)
    transformer = flux_transformer()
    FluxPipeline.load_lora_into_transformer(converted, network_alphas=network_alphas, transformer=transformer,
                                            adapter_name="probe")
    updates = {path: u for path, (u, _, _) in peft_updates(transformer).items()}
    loaded = {}
    for name, (_, paths) in modules.items():
        if all(p in updates for p in paths):
            loaded[name] = torch.cat([updates[p] for p in paths], dim=0)
    rows = compare(expected, loaded)
    rows["_first_lora_B_key"] = first_lora_b
    rows["_network_alphas"] = None if network_alphas is None else len(network_alphas)
    del transformer
    return rows


def te3_conversion() -> dict:
    """Convert (FluxPipeline.lora_state_dict) kohya FLUX files holding, besides one DiT module, T5 keys
    (lora_te3_...), CLIP-L keys (lora_te1_...), and the in_dims layers (lora_unet_img_in, ...)."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(2)
    dit = {f"lora_unet_single_blocks_0_linear2.{k}": v
           for k, v in kohya_module(HIDDEN, 5 * HIDDEN, RANK, ALPHA, generator).items()}
    te1 = {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}": v
           for k, v in kohya_module(768, 768, RANK, ALPHA, generator).items()}
    te3 = {f"lora_te3_encoder_block_0_layer_0_SelfAttention_q.{k}": v
           for k, v in kohya_module(4096, 4096, RANK, ALPHA, generator).items()}
    img_in = {f"lora_unet_img_in.{k}": v for k, v in kohya_module(HIDDEN, 64, RANK, ALPHA, generator).items()}
    report = {}
    cases = (("dit+te1", {**dit, **te1}), ("dit+te3", {**dit, **te3}), ("dit+te1+te3", {**dit, **te1, **te3}),
             ("dit+img_in", {**dit, **img_in}))
    for label, state in cases:
        try:
            converted = FluxPipeline.lora_state_dict(dict(state))
            converted = converted[0] if isinstance(converted, tuple) else converted
            report[label] = {"ok": True, "keys": sorted(converted)}
        except Exception as error:  # noqa: BLE001  (the outcome is the finding)
            report[label] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return report


# --- scenarios --------------------------------------------------------------------------------------------
def scenarios(odd: str, odd2: str, first: str) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (ranks, alphas, pads) for the odd modules; everything else rank RANK, alpha ALPHA."""
    return {
        "uniform": ({}, {}, {}),
        "one module rank 2, alpha equal": ({odd: 2}, {}, {}),
        "one module rank 16, alpha equal": ({odd: 16}, {}, {}),
        "one module rank 1, alpha equal": ({odd: 1}, {}, {}),
        "one module rank 2, alpha 1 (alpha differs, same alpha/rank)": ({odd: 2}, {odd: 1.0}, {}),
        "one module rank 2, alpha = rank": ({odd: 2}, {odd: 2.0}, {}),
        "the first module rank 16, alpha equal": ({first: 16}, {}, {}),
        "two modules rank 2, alpha equal": ({odd: 2, odd2: 2}, {}, {}),
        "two modules rank 2 and 16, alpha equal": ({odd: 2, odd2: 16}, {}, {}),
        "one module rank 2 zero-padded to 4 (up scaled, alpha equal)": ({odd: 2}, {}, {odd: RANK}),
        "one module rank 2 zero-padded to 4 (alpha scaled to 4)": ({odd: 2}, {}, {odd: -RANK}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("sd1", "flux", "te3"), default=None)
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import diffusers
    import peft
    import transformers

    report = {"versions": {"diffusers": diffusers.__version__, "peft": peft.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    print(json.dumps(report["versions"]))
    if args.only in (None, "sd1"):
        unet, te = sd1_models()
        names = list(sd1_targets(unet, te))
        unet_names = [n for n in names if n.startswith("lora_unet_")]
        te_names = [n for n in names if n.startswith("lora_te_")]
        for part, pool in (("unet", unet_names), ("text encoder", te_names)):
            for label, (ranks, alphas, pads) in scenarios(pool[5], pool[-1], pool[0]).items():
                run_scenario(report, f"sd1 {part}: {label}", run_sd1, ranks, alphas, pads)
    if args.only in (None, "flux"):
        odd, odd2 = "lora_unet_single_blocks_0_linear2", "lora_unet_double_blocks_0_txt_mlp_2"
        for label, (ranks, alphas, pads) in scenarios(odd, odd2, "FIRST").items():
            if "FIRST" in ranks:  # the module whose lora_B diffusers lists first (printed as _first_lora_B_key)
                ranks = {"lora_unet_double_blocks_0_img_attn_proj": ranks.pop("FIRST")}
            run_scenario(report, f"flux: {label}", run_flux, ranks, alphas, pads)
        # diffusers 0.32: transformer_blocks.0.attn.to_q is also a substring of single_transformer_blocks.0.attn.to_q,
        # and its rank-pattern disambiguation breaks once two such keys have another rank (the load stops)
        run_scenario(report, "flux: double block img_attn_qkv rank 2 (to_q/to_k/to_v odd)", run_flux,
                     {"lora_unet_double_blocks_0_img_attn_qkv": 2}, {}, {})
    if args.only in (None, "te3"):
        report["te3"] = te3_conversion()
        for label, outcome in report["te3"].items():
            shown = outcome if not outcome.get("ok") else {"ok": True, "keys": len(outcome["keys"]),
                                                            "text_encoder_keys": [k for k in outcome["keys"]
                                                                                  if "text_encoder" in k],
                                                            "img_in": [k for k in outcome["keys"] if "x_embedder" in k]}
            print("te3", label, "->", json.dumps(shown))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 0


def run_scenario(report: dict, key: str, run, ranks: dict, alphas: dict, pads: dict) -> None:
    """``run(ranks, alphas, pads)`` into ``report[key]``, with a one-line summary (or the error) printed."""
    try:
        rows = run(ranks, alphas, pads)
    except Exception as error:  # noqa: BLE001  (an error is an outcome to report)
        report[key] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-800:]}
        print(key, "->", report[key]["error"])
        return
    report[key] = rows
    first = f" | first lora_B: {rows['_first_lora_B_key']}" if "_first_lora_B_key" in rows else ""
    print(key, "->", summary(rows, set(ranks) | set(alphas)) + first)


def summary(rows: dict, odd: set[str]) -> str:
    """The scales of the odd modules, and the range of the others' scales."""
    scales = {k: v["scale"] for k, v in rows.items() if not k.startswith("_")}
    others = [s for k, s in scales.items() if k not in odd and s is not None]
    odd_part = ", ".join(f"{k.replace('lora_unet_', '').replace('lora_te_text_model_encoder_', 'te:')}={scales[k]}"
                         for k in sorted(odd) if k in scales)
    missing = [k for k, s in scales.items() if s is None]
    return (f"odd: [{odd_part}] others: {min(others) if others else None}..{max(others) if others else None}"
            + (f" NOT LOADED: {len(missing)}" if missing else ""))


if __name__ == "__main__":
    sys.exit(main())
