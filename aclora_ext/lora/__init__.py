"""One LoRA layer (``module``) and what is done to many of them at once, whatever the model: batching
by shape, the paper's RESTART (``paper_restart``), the product mode's analysis and RESTART (``product_restart``), the
variable-rank export (``export``) and the report of a RESTART (``report``)."""
