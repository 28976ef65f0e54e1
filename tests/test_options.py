"""``--network_args`` and create_network's numbers: parsed from the one declaration, validated, documented.

sd-scripts hands every ``--network_args key=value`` over as a string (and adds
``dropout``, usually None); a bad value must name the key, the value and what
is allowed, before any training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
from pathlib import Path

import pytest

from aclora_ext import OPTIONS, ACLoRAConfig, OptionError, create_network, parse_network_args
from aclora_ext.options import markdown_table

REPO = Path(__file__).resolve().parents[1]
NUMERIC = [o for o in OPTIONS if o.kind in ("int", "float")]


def as_command_line(value) -> str:
    """How a default would be typed after ``--network_args``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def below_minimum(option) -> str:
    """A value just outside the option's lower bound."""
    return str(option.minimum - 1 if option.min_inclusive else option.minimum)


def create(models, network_dim=4, network_alpha=1.0, **kwargs):
    return create_network(1.0, network_dim, network_alpha, None, models["text_encoder"], models["unet"], **kwargs)


# --- every declared option --------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_option_parses_its_default_typed_as_a_string(option):
    config = parse_network_args({option.name: as_command_line(option.default)})
    assert getattr(config, option.name) == option.default


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_option_rejects_junk_naming_key_value_and_allowed_values(option):
    with pytest.raises(OptionError) as caught:
        parse_network_args({option.name: "junk?"})
    message = str(caught.value)
    assert option.name in message
    assert "junk?" in message
    assert option.allowed() in message
    for choice in option.choices:
        assert choice in message


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.minimum is not None], ids=lambda o: o.name)
def test_numeric_options_reject_values_below_their_minimum(option):
    value = below_minimum(option)
    with pytest.raises(OptionError, match=re.escape(option.name)) as caught:
        parse_network_args({option.name: value})
    assert value in str(caught.value)


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.maximum is not None], ids=lambda o: o.name)
def test_numeric_options_reject_values_above_their_maximum(option):
    with pytest.raises(OptionError, match=re.escape(option.name)):
        parse_network_args({option.name: str(option.maximum + 1)})


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.kind == "float"], ids=lambda o: o.name)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_float_options_reject_non_finite_numbers(option, value):
    with pytest.raises(OptionError, match=re.escape(option.name)):
        parse_network_args({option.name: value})


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.kind == "int"], ids=lambda o: o.name)
def test_integer_options_reject_fractions_and_accept_integral_spellings(option):
    with pytest.raises(OptionError, match=re.escape(option.name)):
        parse_network_args({option.name: "2.5"})
    assert getattr(parse_network_args({option.name: "4.0"}), option.name) == 4


def test_the_config_has_one_field_per_declared_option_defaulting_to_the_declared_default():
    # the declarations and the dataclass live in different files: a default changed in one only would make the
    # documented default a lie for everyone who leaves the option unset
    fields = {f.name: f.default for f in dataclasses.fields(ACLoRAConfig)}
    assert list(fields) == [o.name for o in OPTIONS]
    assert {name: default for name, default in fields.items()} == {o.name: o.default for o in OPTIONS}
    assert parse_network_args({}) == ACLoRAConfig()


def test_an_unknown_key_is_named_and_every_valid_key_listed():
    with pytest.raises(OptionError) as caught:
        parse_network_args({"conv_dimm": "4"})
    message = str(caught.value)
    assert "conv_dimm" in message
    for option in OPTIONS:
        assert option.name in message


def test_dropout_none_as_sd_scripts_always_passes_it_is_accepted(sd1_models):
    assert parse_network_args({"dropout": None}).dropout is None
    network = create(sd1_models, neuron_dropout=None, dropout=None)
    assert all(m.dropout is None for m in network.loras)


def test_network_dropout_reaches_every_module(sd1_models):
    network = create(sd1_models, neuron_dropout=0.25, dropout=None)
    assert {m.dropout for m in network.loras} == {0.25}


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on"])
def test_boolean_options_accept_true_spellings(text):
    assert parse_network_args({"save_full_rank": text}).save_full_rank is True


@pytest.mark.parametrize("text", ["false", "FALSE", "0", "no", "off"])
def test_boolean_options_accept_false_spellings(text):
    assert parse_network_args({"save_full_rank": text}).save_full_rank is False


def test_choices_are_case_insensitive_and_values_typed():
    config = parse_network_args({"restart_mode": "Product", "conv_dim": "8", "conv_alpha": "2", "seed": "3"})
    assert (config.restart_mode, config.conv_dim, config.conv_alpha, config.seed) == ("product", 8, 2.0, 3)
    assert isinstance(config.conv_dim, int) and isinstance(config.conv_alpha, float)


# --- arguments the kohya_ss GUI wraps in quotes ---------------------------------------------


def as_sd_scripts_splits(*arguments: str, quote=shlex.quote) -> dict:
    """The kwargs sd-scripts' train_network.py builds from ``--network_args`` pieces the kohya_ss GUI quoted
    (each one through shlex.quote, run without a shell): split on the first "=", dropout added when absent."""
    kwargs = dict(quote(argument).split("=", 1) for argument in arguments)
    kwargs.setdefault("dropout", None)
    return kwargs


def test_a_path_with_backslashes_the_gui_wrapped_in_quotes_is_read_as_written_with_a_warning(tmp_path, caplog):
    lora = tmp_path / "runs\\first.safetensors"  # a backslash in the name, as in a Windows path
    lora.write_bytes(b"")
    kwargs = as_sd_scripts_splits(f"ranks_from={lora}")
    assert "'ranks_from" in kwargs  # what sd-scripts hands over
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        config = parse_network_args(kwargs)
    assert config.ranks_from == str(lora)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "quotes" in warnings[0] and f"ranks_from={lora}" in warnings[0]


@pytest.mark.parametrize("quote", ["'", '"'])
def test_every_quoted_argument_is_unwrapped_and_the_warning_given_once(quote, caplog):
    kwargs = as_sd_scripts_splits(
        "min_importance=0.05",
        "network_reg_dims=_\\d+_=4",
        "dropout=0.1",
        quote=lambda argument: f"{quote}{argument}{quote}",
    )
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        config = parse_network_args(kwargs)
    # sd-scripts added dropout=None beside the quoted dropout it did not recognise: the quoted one is the user's
    assert (config.min_importance, config.network_reg_dims, config.dropout) == (0.05, (("_\\d+_", 4),), 0.1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in ("min_importance", "network_reg_dims", "dropout"))


def test_a_quoted_regex_reaches_the_network_through_create_network(sd1_models):
    # \d makes shlex.quote (the GUI) wrap the argument; the regex must still give every matching module rank 2
    network = create(sd1_models, network_dim=4, **as_sd_scripts_splits("network_reg_dims=_\\d+_attn1=2"))
    ranks = {m.lora_name: m.rank for m in network.loras}
    assert {rank for name, rank in ranks.items() if re.search(r"_\d+_attn1", name)} == {2}
    assert {rank for name, rank in ranks.items() if not re.search(r"_\d+_attn1", name)} == {4}


@pytest.mark.parametrize(
    "key, value",
    [("'ranks_from", "out/x.safetensors"), ("'ranks_from", 'out/x.safetensors"'), ('"min_rank', "2'")],
    ids=["no-closing-quote", "other-closing-quote", "single-closing-double-opening"],
)
def test_a_quote_without_its_match_is_an_unknown_key_named_with_its_value_and_every_allowed_key(key, value):
    with pytest.raises(OptionError) as caught:
        parse_network_args({key: value})
    message = str(caught.value)
    assert repr(key) in message and repr(value) in message and "quote" in message
    assert all(option.name in message for option in OPTIONS)


def test_a_quoted_unknown_key_is_named_with_its_value_the_argument_and_every_allowed_key():
    with pytest.raises(OptionError) as caught:
        parse_network_args(as_sd_scripts_splits("ranks_frm=C:\\runs\\x.safetensors"))
    message = str(caught.value)
    assert "unknown key 'ranks_frm'" in message and repr("C:\\runs\\x.safetensors") in message
    assert repr("'ranks_frm=C:\\runs\\x.safetensors'") in message
    assert all(option.name in message for option in OPTIONS)


def test_a_quoted_bad_value_names_the_key_the_value_and_what_is_allowed():
    option = next(o for o in OPTIONS if o.name == "min_importance")
    with pytest.raises(OptionError) as caught:
        parse_network_args({"'min_importance": "2'"})
    assert "min_importance='2'" in str(caught.value) and option.allowed() in str(caught.value)


def test_an_option_given_plainly_and_quoted_is_refused_naming_both():
    with pytest.raises(OptionError) as caught:
        parse_network_args({"conv_dim": "4", "'conv_dim": "8 '"})
    message = str(caught.value)
    assert "conv_dim=4" in message and "'conv_dim=8 '" in message and "twice" in message


def test_a_python_value_under_a_quoted_key_is_not_unwrapped():
    with pytest.raises(OptionError, match='unknown key "\'seed"'):
        parse_network_args({"'seed": 3})


# --- contradictions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        ({"restart_every": "2", "restart_every_steps": "50"}, ("restart_every", "restart_every_steps")),
        ({"restart_mode": "off", "restart_every": "2"}, ("restart_every", "restart_mode=off")),
        ({"restart_mode": "off", "restart_every_steps": "20"}, ("restart_every_steps", "restart_mode=off")),
        ({"restart_mode": "off", "fixed_p": "0.5"}, ("fixed_p", "restart_mode=off")),
        ({"conv_alpha": "4"}, ("conv_alpha", "conv_dim")),
    ],
    ids=["epochs-and-steps", "off-with-every", "off-with-every-steps", "off-with-fixed-p", "conv-alpha-alone"],
)
def test_contradicting_options_are_rejected_naming_both_sides(args, named):
    with pytest.raises(OptionError) as caught:
        parse_network_args(args)
    for text in named:
        assert text in str(caught.value)


def test_min_rank_above_network_dim_is_rejected(sd1_models):
    with pytest.raises(OptionError) as caught:
        create(sd1_models, network_dim=4, min_rank="8")
    assert "min_rank=8" in str(caught.value) and "network_dim=4" in str(caught.value)


def test_min_rank_up_to_network_dim_is_accepted(sd1_models):
    assert create(sd1_models, network_dim=4, min_rank="4").config.min_rank == 4


# --- network_dim and network_alpha ------------------------------------------------------------


@pytest.mark.parametrize("argument", ["network_dim", "network_alpha"])
@pytest.mark.parametrize("value", ["abc", "-4", -2, "nan"])
def test_bad_network_dim_or_alpha_is_rejected_naming_it(sd1_models, argument, value):
    numbers = {"network_dim": 4, "network_alpha": 1.0, argument: value}
    with pytest.raises(OptionError) as caught:
        create(sd1_models, **numbers)
    message = str(caught.value)
    assert argument in message and repr(value) in message and "allowed" in message


def test_zero_network_dim_is_rejected(sd1_models):
    with pytest.raises(OptionError, match="network_dim='0'.*positive integer"):
        create(sd1_models, network_dim="0")


def test_zero_network_alpha_means_alpha_equals_rank_like_networks_lora(sd1_models):
    network = create(sd1_models, network_dim=6, network_alpha="0")
    assert {(m.rank, float(m.alpha)) for m in network.loras} == {(6, 6.0)}


def test_fractional_network_dim_is_rejected(sd1_models):
    with pytest.raises(OptionError, match="network_dim"):
        create(sd1_models, network_dim="4.5")


def test_numeric_strings_are_accepted_for_network_dim_and_alpha(sd1_models):
    network = create(sd1_models, network_dim="6", network_alpha="3")
    assert {(m.rank, float(m.alpha)) for m in network.loras} == {(6, 3.0)}


def test_missing_network_dim_uses_the_default_rank_and_says_so(sd1_models, caplog):
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network = create(sd1_models, network_dim=None)
    assert {m.rank for m in network.loras} == {64}
    assert any("network_dim" in r.getMessage() and "64" in r.getMessage() for r in caplog.records)


def test_missing_network_alpha_uses_alpha_one_like_networks_lora(sd1_models):
    network = create(sd1_models, network_dim=4, network_alpha=None)
    assert {float(m.alpha) for m in network.loras} == {1.0}


# --- the documented table ------------------------------------------------------------------------------------


def test_the_documented_options_table_matches_the_declarations():
    text = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    generated = markdown_table().splitlines()
    missing = [row for row in generated if row not in text.splitlines()]
    assert not missing, (
        "docs/options.md's options table is out of date; regenerate it with "
        "`aclora options`. Rows missing or different:\n" + "\n".join(missing)
    )
    documented = set(re.findall(r"^\|\s*`([a-z_0-9]+)`\s*\|", options_table(text), flags=re.MULTILINE))
    stale = documented - {o.name for o in OPTIONS}
    assert not stale, f"docs/options.md's options table lists options that do not exist: {sorted(stale)}"


def options_table(text: str) -> str:
    """The documented options table: from its header row to the first line that is not a table row."""
    header = markdown_table().splitlines()[0]
    lines = text.splitlines()
    start = lines.index(header) if header in lines else len(lines)
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def test_aclora_options_prints_the_table_generated_from_the_declarations(capsys):
    from aclora_ext.tools.cli import main

    assert main(["options"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == markdown_table().strip()
    assert all(f"| `{option.name}` |" in printed for option in OPTIONS)
