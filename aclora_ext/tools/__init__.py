"""What a user runs beside sd-scripts, behind the ``aclora`` command (``cli``): ``inspect`` (the rank
report of a file), ``resize`` (pick the ranks of an existing file), ``vram`` (the memory of a training
step, counted on the meta device) and ``demo`` (a tiny run on synthetic data)."""
