"""A stand-in for torchvision, put on the path of the sd-scripts end-to-end tests only.

sd-scripts imports torchvision for a few image transforms (``library/train_util.py``:
``Compose([ToTensor(), Normalize([0.5], [0.5])])`` on every training image).
PyPI's torchvision wheels are built against CUDA torch and do not load beside
the CPU build of torch that CI installs, so the tests give sd-scripts these
transforms instead; anything else of torchvision fails loudly. The tests use
the real torchvision whenever it imports (see ``tests/sd_scripts_fixtures.py``).
"""

from . import transforms

__version__ = "0+aclora.test.stand.in"
__all__ = ["transforms"]
