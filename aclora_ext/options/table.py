"""The options table of docs/options.md (and ``aclora options``), generated from the declarations."""

from __future__ import annotations

from .declared import FAMILIES, OPTIONS


def markdown_table() -> str:
    """The options table, one row per option of :data:`~aclora_ext.options.declared.OPTIONS`."""
    rows = ["| option | default | allowed | what it does |", "|---|---|---|---|"]
    for o in OPTIONS:
        if o.default is None:
            default = "unset"
        else:
            default = str(o.default).lower() if isinstance(o.default, bool) else str(o.default)
        only = f"{' and '.join(FAMILIES[f] for f in o.families)} only. " if o.families else ""
        rows.append(f"| `{o.name}` | {default} | {o.allowed(separator=', ')} | {only}{o.help} |")
    return "\n".join(rows)
