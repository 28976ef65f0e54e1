"""``aclora demo``: a whole AC-LoRA run on a tiny built-in model, on the CPU, with no downloads.

It builds a tiny SD1.x-like (or SDXL-like) U-Net and CLIP text encoder with
random weights, makes 15 synthetic "style" latents with trigger-token
captions, and trains through the same call sequence sd-scripts uses
(create_network, prepare_network, apply_to, prepare_optimizer_params, per epoch
on_epoch_start, per step on_step_start / accelerator.backward, save_weights).
RESTARTs run every tenth of the run; the file is written and its rank report
printed.

By default the demo runs with the network's ``holdout=0.2`` option (3 of the 15
images held out until ``holdout_until`` = 70% of the run), so its RESTARTs choose
the ranks on a held-out loss, and later ones keep that choice while the held
images train again. The step calls sd-scripts' ``library.train_util`` functions
the option wraps through the replay's stand-in (``harness.train_util``); the
latents are fixed tensors, as cached latents are. The data is the built-in style
(``tiny.style_dataset``): every latent mixes the same 3 patterns plus noise of its
own, so there is a low-rank signal to find; no rank is planted in the model.
``--no-holdout`` runs the network's default without a validation split: every
RESTART is deferred and training is a plain LoRA at ``network_dim``
(docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

#: the demo's default ``holdout=`` share: 3 of its 15 images
HOLDOUT = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aclora demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="aclora-demo", help="folder for the LoRA file (default: ./aclora-demo)")
    parser.add_argument("--sdxl", action="store_true", help="use the SDXL-like tiny model (two text encoders)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20: RESTART every 2)")
    parser.add_argument("--rank", type=int, default=32, help="maximum rank R (network_dim, default 32)")
    parser.add_argument(
        "--mode",
        choices=("product", "paper", "off"),
        default="product",
        help="restart_mode (default: product, the default of the network)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=HOLDOUT,
        help=f"the network's holdout= share of the 15 images (default {HOLDOUT}: 3 of them)",
    )
    parser.add_argument(
        "--no-holdout",
        dest="holdout",
        action="store_const",
        const=None,
        help="no held-out split: the network's default without a validation split (RESTARTs deferred, rank R)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _require_demo_dependencies() -> None:
    missing = []
    for name in ("diffusers", "transformers", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"aclora demo needs {', '.join(missing)} (present in any sd-scripts environment); "
            "install them with: pip install 'aclora[demo]'"
        )


def run(
    out: str,
    sdxl: bool = False,
    epochs: int = 20,
    rank: int = 32,
    mode: str = "product",
    seed: int = 0,
    holdout: Optional[float] = HOLDOUT,
) -> str:
    """Train the tiny model and return the path of the saved LoRA file (``holdout``: the network's
    ``holdout=`` share, None for none)."""
    _require_demo_dependencies()
    import networks.aclora as network_module

    from ..harness import tiny
    from ..harness.replay import NetworkSetup, Saving, Schedule, replay_training
    from ..harness.sdcalls import collate, fixed_batch_loss

    if epochs < 1 or rank < 1:
        raise SystemExit(f"aclora demo: --epochs={epochs} and --rank={rank} must be at least 1")
    # Pre-trained for a few steps so the diffusion loss is in the range it has on real
    # Stable Diffusion (~0.1-0.3), which is what p = 1 - L^alpha is meant for.
    models = tiny.sdxl_models(seed, pretrained=True) if sdxl else tiny.sd1_models(seed, pretrained=True)
    data, held_out = tiny.style_split(n_train=15, n_holdout=5, seed=seed)
    before = fixed_batch_loss(None, models, collate(held_out), sdxl, seed=seed, repeats=8)
    path = os.path.join(out, f"aclora-demo-{'sdxl' if sdxl else 'sd1'}.safetensors")
    print(
        f"AC-LoRA demo: tiny {'SDXL' if sdxl else 'SD1.x'}-like model, 15 synthetic style images, "
        f"{epochs} epochs, maximum rank {rank}, restart_mode={mode}"
    )
    start = time.perf_counter()
    network_args = {"restart_mode": mode, "seed": str(seed)}
    if holdout is not None:
        network_args["holdout"] = str(holdout)
        print(
            f"this demo uses the network's holdout={holdout} option (its own held-out split, about "
            f"{round(holdout * 15)} of the 15 images until 70% of the run) so that its RESTARTs choose ranks on a "
            "held-out loss; the network's default without a validation split is unchanged: a plain LoRA at "
            "network_dim (docs/training.md; aclora demo --no-holdout)"
        )
    setup = NetworkSetup(dim=rank, alpha=rank / 2, args=network_args)
    result = replay_training(
        network_module,
        models,
        data,
        sdxl=sdxl,
        network=setup,
        schedule=Schedule(epochs=epochs, batch_size=3, lr=2e-3, seed=seed),
        saving=Saving(path),
        sd_library=True,
    )
    seconds = time.perf_counter() - start
    network = result.network
    after = fixed_batch_loss(network, models, collate(held_out), sdxl, seed=seed, repeats=8)
    ranks = list(network.ranks().values())
    print(
        f"trained {result.global_step} steps in {seconds:.1f}s; {len(network.history)} RESTARTs; "
        f"ranks now {min(ranks)}..{max(ranks)} of {rank} over {len(ranks)} modules"
    )
    print(f"loss on 5 held-out images of the style (fixed noise): base model {before:.4f}, with the LoRA {after:.4f}")
    print(f"wrote {path}\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    path = run(args.out, args.sdxl, args.epochs, args.rank, args.mode, args.seed, args.holdout)
    from . import inspect

    return inspect.run(path)


if __name__ == "__main__":
    sys.exit(main())
