"""What runs inside sd-scripts: the network (kohya's network-module contract), when it RESTARTs and the
loss it reads (``schedule``), what a RESTART does to it (``restart_runner``), its files (``saving``), its
resumable state (``state``), and how sd-scripts builds it (``factory``)."""
