"""``aclora vram``: the peak accelerator memory of a LoRA training step, counted on PyTorch's meta device.

The real architectures (the SD1.x, SD2.x or SDXL U-Net, its text encoders and
the VAE, from literal configs) are built on the ``meta`` device, where tensors
have shapes and dtypes but no data: nothing is allocated, nothing is
downloaded, and an SDXL step takes seconds on a CPU. The network is attached
the way sd-scripts attaches it (``create_network`` → ``apply_to`` → optimizer
groups) and a training step runs the way ``train_network.py`` runs it, with
the optimizer state a first step leaves: the network's ``on_step_start``, the
VAE (unless latents are cached), the text encoders (unless their outputs are
cached), the U-Net under autocast, ``accelerator.backward``, gradient clipping
on ``get_trainable_params()``, the optimizer step, ``zero_grad(set_to_none=True)``.

:class:`StorageCounter` (a ``TorchDispatchMode``) sees every storage an
operator creates on the device and when it dies; the largest sum of live
storages during the step, each rounded up to the CUDA caching allocator's
512-byte blocks, estimates ``torch.cuda.max_memory_allocated``. Two things a
CUDA device does that the meta device does not are reproduced by
:class:`CudaPolicy` (a ``TorchFunctionMode``): autocast's cast policy (which
operators run in bf16/fp16, which in fp32, and the cached casts of fp32
weights) and the fused attention kernels that ``scaled_dot_product_attention``
picks (flash, memory-efficient). What is not counted, and the margin assumed
for it, is in :data:`NOT_COUNTED`.

FLUX.1 and SD3/SD3.5 (``dit``, ``dit_step``): sd-scripts' DiT layouts built from literal configs
(``harness.dit``), its LoRA targets with their fused shapes, block swap, the flow-matching step of
flux_train_network.py / sd3_train_network.py; ``family_args`` tells the family from the arguments.
Lumina 2 (``lumina``): our build of sd-scripts' NextDiT (``harness.lumina_dit``), Gemma2 and the step of
lumina_train_network.py.
Anima (``anima``, ``anima_step``, ``anima_setup``): sd-scripts' Anima DiT and LLM adapter (``harness.anima_dit``),
transformers' Qwen3, block swap, the step of anima_train_network.py.

The parts: ``setup`` (one set-up), ``models`` (the frozen models), ``step`` (one training step),
``counter`` (live storages), ``cuda`` (autocast and attention as CUDA does them), ``estimate``,
``config`` (reading sd-scripts' arguments), ``cli`` (the command).
"""

from . import dit
from .cli import arguments_from, build_parser, format_estimate, main
from .config import KEYS, UNSUPPORTED, Key, read_config, setup_from_arguments
from .counter import (
    ACTIVATIONS,
    BLOCK_BYTES,
    CATEGORIES,
    FROZEN_TE,
    FROZEN_UNET,
    FROZEN_VAE,
    GRADIENTS,
    LORA,
    OPTIMIZER_STATE,
    SET_UP,
    Block,
    Replay,
    StorageCounter,
)
from .cuda import CudaPolicy
from .dit import build_dit_models, prepare_dit_models
from .dit_step import DitTrainingStep
from .estimate import (
    CARD_SIZES_GIB,
    MARGIN_FIXED_BYTES,
    MARGIN_FRACTION,
    NOT_COUNTED,
    CountedStep,
    Estimate,
    GiB,
    estimate,
    restart_transient,
)
from .models import Models, build_models, prepare_models
from .setup import (
    ATTENTION,
    DIT_FAMILIES,
    DTYPES,
    FAMILIES,
    MIXED_PRECISION,
    OPTIMIZERS,
    VARIANTS,
    Setup,
    VramError,
    max_blocks_to_swap,
)
from .step import TrainingStep, make_optimizer

__all__ = [
    "dit",
    "arguments_from",
    "build_parser",
    "format_estimate",
    "main",
    "KEYS",
    "UNSUPPORTED",
    "Key",
    "read_config",
    "setup_from_arguments",
    "ACTIVATIONS",
    "BLOCK_BYTES",
    "CATEGORIES",
    "FROZEN_TE",
    "FROZEN_UNET",
    "FROZEN_VAE",
    "GRADIENTS",
    "LORA",
    "OPTIMIZER_STATE",
    "SET_UP",
    "Block",
    "Replay",
    "StorageCounter",
    "CudaPolicy",
    "build_dit_models",
    "prepare_dit_models",
    "DitTrainingStep",
    "CARD_SIZES_GIB",
    "MARGIN_FIXED_BYTES",
    "MARGIN_FRACTION",
    "NOT_COUNTED",
    "CountedStep",
    "Estimate",
    "GiB",
    "estimate",
    "restart_transient",
    "Models",
    "build_models",
    "prepare_models",
    "ATTENTION",
    "DIT_FAMILIES",
    "DTYPES",
    "FAMILIES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "VARIANTS",
    "Setup",
    "VramError",
    "max_blocks_to_swap",
    "TrainingStep",
    "make_optimizer",
]
