"""sd-scripts' anima_train_network.py on the tiny Anima of tests/anima_fixtures.py, in process.

  python tests/run_anima_trainer.py build FOLDER   the checkpoints, Qwen3 folder and images (prints their paths)
  python tests/run_anima_trainer.py train ARGS...  the trainer's own __main__ with ARGS, from sd-scripts' folder

sd-scripts hard-codes Anima's architecture, so ``train`` runs the unmodified script (``runpy``, as
``python anima_train_network.py ARGS`` would) inside ``anima_fixtures.shrunk()``: only the constructor values
of its DiT, LLM adapter and VAE classes change; its own code loads, trains, validates and saves. Run it in
sd-scripts' environment (tests/sd_scripts_fixtures.sd_scripts_environment).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anima_fixtures as af  # noqa: E402
import sd_scripts_fixtures as e2e  # noqa: E402


def main() -> int:
    command, *rest = sys.argv[1:]
    if command == "build":
        print("ANIMA-FIXTURES " + json.dumps(af.build(Path(rest[0]))))
        return 0
    if command == "train":
        script = e2e.SD_SCRIPTS / "anima_train_network.py"
        with af.shrunk():
            sys.argv = [str(script), *rest]
            runpy.run_path(str(script), run_name="__main__")
        return 0
    raise SystemExit(f"unknown command {command!r}; allowed: build, train")


if __name__ == "__main__":
    sys.exit(main())
