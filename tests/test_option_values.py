"""What each ``--network_args`` value kind accepts and refuses, spelled out: the whole messages docs/options.md
promises (the key, the value and what is allowed, as typed), the edges of every range, and the values the
layer-selection kinds parse to."""

from __future__ import annotations

import logging

import pytest

from aclora_ext.options import (
    SIZE_ALLOWED,
    ACLoRAConfig,
    OptionError,
    format_size,
    parse_network_args,
    parse_positive,
    parse_size,
)
from aclora_ext.options.declared import BY_NAME
from aclora_ext.options.declared.family_layers import _dim
from aclora_ext.options.option import Option

ALLOWED_KEYS = (
    "conv_dim, conv_alpha, dropout, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, "
    "loraplus_text_encoder_lr_ratio, network_reg_lrs, restart_mode, restart_every, restart_every_steps, energy, "
    "min_rank, fixed_p, ranks_from, min_importance, holdout, holdout_until, seed, save_full_rank, max_file_size, "
    "img_attn_dim, txt_attn_dim, img_mlp_dim, txt_mlp_dim, img_mod_dim, txt_mod_dim, single_dim, single_mod_dim, in_dims, "
    "train_blocks, train_double_block_indices, train_single_block_indices, context_attn_dim, context_mlp_dim, "
    "context_mod_dim, x_attn_dim, x_mlp_dim, x_mod_dim, emb_dims, train_block_indices, attn_dim, mlp_dim, mod_dim, "
    "refiner_dim, embedder_dims, train_llm_adapter, exclude_patterns, include_patterns, train_t5xxl, split_qkv, "
    "network_reg_dims"
)


def refusal(args: dict, **kw) -> str:
    with pytest.raises(OptionError) as caught:
        parse_network_args(args, **kw)
    return str(caught.value)


def parsed(key: str, raw, **kw):
    return getattr(parse_network_args({key: raw}, **kw), key)


# --- what is allowed, as each refusal says it ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, raw, allowed",
    [
        ("restart_mode", "junk", "paper | product | off"),
        ("save_full_rank", "maybe", "true | false"),
        ("conv_dim", "x", "an integer >= 1 (or none)"),
        ("conv_alpha", "0", "a number > 0 (or none)"),
        ("dropout", "1", "a number >= 0 and < 1 (or none)"),
        ("min_importance", "1", "a number >= 0 and < 1"),
        ("seed", "-1", "an integer >= 0"),
        ("fixed_p", "0", "a number > 0 and <= 1 (or none)"),
        ("min_rank", "none", "an integer >= 1"),
        ("ranks_from", "missing.safetensors", "the path of an existing LoRA file (.safetensors, .ckpt, .pt) (or none)"),
        ("in_dims", "1,2", "5 integers >= 0, comma-separated, brackets optional (or none)"),
        (
            "train_block_indices",
            "x",
            "all, none, or block indices and inclusive ranges, comma-separated (e.g. 0,2-5)",
        ),
        (
            "network_reg_dims",
            "a",
            "comma-separated pattern=rank pairs, each pattern a regular expression and each rank an integer >= 0 "
            "(or none)",
        ),
        (
            "network_reg_lrs",
            "a=-1",
            "comma-separated pattern=lr pairs, each pattern a regular expression and each lr a finite number >= 0 "
            "(or none)",
        ),
        (
            "exclude_patterns",
            "[]",
            "a Python literal: a quoted regular expression or a list of them, e.g. ['.*mlp.*'] (or none)",
        ),
    ],
)
def test_a_refusal_names_the_key_the_value_as_given_and_what_is_allowed(key, raw, allowed):
    assert refusal({key: raw}) == f"network_args: {key}={raw!r} is not valid; allowed: {allowed}"


def test_a_required_option_refuses_none_and_an_optional_one_reads_it_as_unset():
    assert refusal({"restart_mode": None}) == (
        "network_args: restart_mode=None is not valid; allowed: paper | product | off"
    )
    assert refusal({"min_rank": " NONE "}) == "network_args: min_rank=' NONE ' is not valid; allowed: an integer >= 1"
    assert parsed("conv_dim", None) is None and parsed("conv_dim", " Null ") is None and parsed("dropout", "") is None


def test_an_option_without_bounds_says_only_integer_or_number():
    assert Option("n", "float", None, "").allowed() == "a number (or none)"
    assert Option("n", "int", 1, "", optional=False).allowed() == "an integer"
    assert Option("n", "float", None, "", maximum=2, max_inclusive=False).allowed() == "a number < 2 (or none)"
    assert Option("n", "int", None, "", maximum=8).allowed() == "an integer <= 8 (or none)"
    assert Option("n", "choice", "a", "", choices=("a", "b")).allowed(separator=", ") == "a, b"


def test_a_per_layer_rank_is_declared_as_an_optional_integer_from_zero_for_its_families():
    # the FLUX.1 / SD3 / Lumina 2 rank options are made by one helper; what it makes is what the table documents
    assert _dim("x_dim", "x layers", ("flux", "sd3")) == Option(
        "x_dim",
        "int",
        None,
        "Maximum rank of the x layers (unset: network_dim; 0: no LoRA there).",
        minimum=0,
        families=("flux", "sd3"),
    )
    assert BY_NAME["single_dim"] == _dim("single_dim", "single blocks' linear1 and linear2", ("flux",))


# --- the edges of every range ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, raw, value",
    [
        ("conv_dim", "1", 1),  # inclusive minimum
        ("min_rank", "1", 1),
        ("seed", "0", 0),
        ("dropout", "0", 0.0),
        ("fixed_p", "1", 1.0),  # inclusive maximum
        ("min_importance", "0", 0.0),
        ("loraplus_lr_ratio", "1e-9", 1e-9),  # just above an exclusive minimum
        ("dropout", "0.999", 0.999),  # just below an exclusive maximum
    ],
)
def test_a_value_on_an_inclusive_edge_or_just_inside_an_exclusive_one_is_accepted(key, raw, value):
    assert parsed(key, raw) == value


@pytest.mark.parametrize(
    "key, raw",
    [("conv_alpha", "0"), ("loraplus_lr_ratio", "0"), ("fixed_p", "0"), ("dropout", "1"), ("rank_dropout", "1")],
)
def test_a_value_on_an_exclusive_edge_is_refused(key, raw):
    assert refusal({key: raw}).startswith(f"network_args: {key}={raw!r} is not valid; allowed: ")


# --- the value kinds -------------------------------------------------------------------------------------------


def test_surrounding_spaces_and_case_do_not_matter_for_choices_numbers_and_booleans():
    config = parse_network_args({"restart_mode": " OFF ", "conv_dim": " 4 ", "save_full_rank": " Yes "})
    assert (config.restart_mode, config.conv_dim, config.save_full_rank) == ("off", 4, True)


def test_python_values_from_the_api_keep_their_meaning_and_a_bool_is_no_number():
    config = parse_network_args({"save_full_rank": True, "conv_dim": 8, "conv_alpha": 2, "train_t5xxl": 0})
    assert (config.save_full_rank, config.conv_dim, config.conv_alpha, config.train_t5xxl) == (True, 8, 2.0, False)
    assert refusal({"conv_dim": True}) == "network_args: conv_dim=True is not valid; allowed: an integer >= 1 (or none)"
    assert refusal({"conv_alpha": False}).startswith("network_args: conv_alpha=False is not valid")


def test_an_infinite_integer_is_refused():
    assert refusal({"restart_every": "inf"}).startswith("network_args: restart_every='inf' is not valid")


def test_ranks_from_takes_an_existing_lora_file_whatever_the_case_of_its_suffix(tmp_path):
    for name in ("a.safetensors", "b.CKPT", "c.pt"):
        (tmp_path / name).write_bytes(b"")
        assert parsed("ranks_from", str(tmp_path / name)) == str(tmp_path / name)
    (tmp_path / "d.txt").write_bytes(b"")
    (tmp_path / "e.safetensors").mkdir()
    for bad in (tmp_path / "d.txt", tmp_path / "e.safetensors", tmp_path / "missing.safetensors"):
        assert refusal({"ranks_from": str(bad)}).startswith(f"network_args: ranks_from={str(bad)!r} is not valid")


def test_block_selections_read_all_none_indices_and_inclusive_ranges():
    key = "train_block_indices"
    assert parsed(key, " ALL ") == "all"
    assert parsed(key, None) == "all"  # a Python None leaves it unset: every block, the default
    assert parsed(key, "none") == () and parsed(key, " None ") == () and parsed(key, "") == ()
    assert parsed(key, "5, 0-2,2") == (0, 1, 2, 5)
    assert parsed(key, "3-3") == (3,)
    assert parsed(key, [4, 1]) == (1, 4)
    for bad in ("3-1", "a", "1,-2", "1-b", "1.5"):
        assert refusal({key: bad}).startswith(f"network_args: {key}={bad!r} is not valid")


def test_rank_lists_have_their_length_and_take_brackets_spaces_or_a_sequence():
    assert parsed("in_dims", "[1, 2,0,3 ,4]") == (1, 2, 0, 3, 4)
    assert parsed("embedder_dims", "4,0,8") == (4, 0, 8)
    assert parsed("in_dims", [1, 2, 0, 3, 4]) == (1, 2, 0, 3, 4)
    assert parsed("in_dims", "none") is None and parsed("in_dims", None) is None
    for bad in ("1,2,0,3", "1,2,0,3,4,5", "[1,2,0,3,4", "[1,2,0,3,45", "11,2,0,3,4]", "1,2,0,3,-4", "1,2,0,3,x"):
        assert refusal({"in_dims": bad}).startswith(f"network_args: in_dims={bad!r} is not valid")
    for bad in ([1, 2, 0, 3, -4], [1, 2, 0, 3, True], [1, 2, 0, 3, 4.0], [1, 2, 0, 3]):
        assert refusal({"in_dims": bad}).startswith(f"network_args: in_dims={bad!r} is not valid")


def test_rank_patterns_read_pattern_rank_pairs_in_order_or_a_mapping():
    key = "network_reg_dims"
    assert parsed(key, " up_blocks =4,,mid=0, ") == (("up_blocks", 4), ("mid", 0))
    assert parsed(key, {"attn1": 2, "ff": "3"}) == (("attn1", 2), ("ff", 3))
    assert parsed(key, "none") is None
    # a pattern ends at its first "=", as sd-scripts splits the pair: "a=b=2" gives pattern a the rank "b=2"
    for bad in ("up_blocks", "=4", "(=4", "a=-1", "a=x", ",", "a=1.5", "a=b=2"):
        assert refusal({key: bad}).startswith(f"network_args: {key}={bad!r} is not valid")
    for bad in ({}, {"a": -1}, {"": 2}, {"a": True}, {"a": 2.0}, 3):
        assert refusal({key: bad}).startswith(f"network_args: {key}={bad!r} is not valid")


def test_learning_rate_patterns_read_finite_rates_of_zero_or_more():
    key = "network_reg_lrs"
    assert parsed(key, "attn=1e-5, ff = 0") == (("attn", 1e-5), ("ff", 0.0))
    assert parsed(key, {"attn": 2}) == (("attn", 2.0),)
    for bad in ("attn=nan", "attn=inf", "attn=-1e-5", "attn=x", "attn"):
        assert refusal({key: bad}).startswith(f"network_args: {key}={bad!r} is not valid")
    assert refusal({key: {"attn": True}}).startswith(f"network_args: {key}={{'attn': True}} is not valid")


def test_patterns_are_a_python_literal_of_one_or_more_non_empty_valid_expressions():
    kw = {"family": "anima"}
    key = "exclude_patterns"
    assert parsed(key, " '.*mlp.*' ", **kw) == (".*mlp.*",)
    assert parsed(key, "['a.*', \"b\"]", **kw) == ("a.*", "b")
    assert parsed(key, ("a", "b"), **kw) == ("a", "b")
    assert parsed(key, "none", **kw) is None
    for bad in (".*mlp.*", "[]", "['']", "[1]", "['(']", "['a', 2]"):
        assert refusal({key: bad}, **kw).startswith(f"network_args: {key}={bad!r} is not valid")


# --- the rules between options, each message whole --------------------------------------------------------------


@pytest.mark.parametrize(
    "args, max_rank, message",
    [
        (
            {"restart_every": "2", "restart_every_steps": "50"},
            None,
            "restart_every=2 and restart_every_steps=50 contradict each other; set only one (epochs or optimizer "
            "steps)",
        ),
        *[
            (
                {"restart_mode": "off", key: value},
                None,
                f"{key}={shown} has no effect with restart_mode=off; remove it or choose restart_mode=paper|product",
            )
            for key, value, shown in (
                ("restart_every", "3", "3"),
                ("restart_every_steps", "9", "9"),
                ("fixed_p", "0.5", "0.5"),
            )
        ],
        ({"conv_alpha": "4"}, None, "conv_alpha=4.0 needs conv_dim=<rank of the 3x3 conv LoRA>"),
        ({"min_rank": "5"}, 4, "min_rank=5 is larger than the maximum rank network_dim=4; allowed: 1 .. 4"),
        ({"min_rank": "3", "conv_dim": "2"}, 8, "min_rank=3 is larger than conv_dim=2; allowed: 1 .. 2"),
        (
            {"network_reg_dims": "a=0,b=8,c=2,d=3", "min_rank": "4"},
            None,
            "network_reg_dims=a=0,b=8,c=2,d=3 gives a maximum rank of 2, below min_rank=4; allowed: 0 (no LoRA) or "
            "ranks >= min_rank",
        ),
        (
            {"embedder_dims": "0,3,1", "min_rank": "4"},
            None,
            "embedder_dims=0,3,1 gives a maximum rank of 3, below min_rank=4; allowed: 0 (no LoRA) or ranks >= "
            "min_rank",
        ),
        (
            {"attn_dim": "1", "min_rank": "2"},
            None,
            "attn_dim=1 gives a maximum rank of 1, below min_rank=2; allowed: 0 (no LoRA) or ranks >= min_rank",
        ),
    ],
    ids=[
        "epochs-and-steps",
        "off-every",
        "off-every-steps",
        "off-fixed-p",
        "conv-alpha",
        "network-dim",
        "conv-dim",
        "reg-dims",
        "ints",
        "int",
    ],
)
def test_each_contradiction_is_refused_with_its_whole_message(args, max_rank, message):
    assert refusal(args, max_rank=max_rank) == f"network_args: {message}"


def test_ranks_from_with_paper_mode_is_refused_naming_both(tmp_path):
    lora = tmp_path / "first.safetensors"
    lora.write_bytes(b"")
    assert refusal({"ranks_from": str(lora), "restart_mode": "paper"}) == (
        f"network_args: ranks_from={str(lora)!r} needs restart_mode=product or off, not paper; allowed: remove one of "
        "them"
    )
    for mode in ("product", "off"):
        assert parse_network_args({"ranks_from": str(lora), "restart_mode": mode}).ranks_from == str(lora)


def test_min_rank_is_checked_against_network_dim_and_conv_dim_only_when_network_dim_is_known():
    assert parse_network_args({"min_rank": "4"}, max_rank=4).min_rank == 4
    assert parse_network_args({"min_rank": "9"}).min_rank == 9  # the API without network_dim
    assert parse_network_args({"min_rank": "9", "conv_dim": "2"}).conv_dim == 2
    assert parse_network_args({"min_rank": "2", "conv_dim": "2"}, max_rank=4).conv_dim == 2


def test_a_layer_rank_equal_to_min_rank_or_zero_is_accepted():
    config = parse_network_args({"min_rank": "4", "single_dim": "4", "in_dims": "4,0,4,0,8", "network_reg_dims": "a=4"})
    assert (config.single_dim, config.in_dims, config.network_reg_dims) == (4, (4, 0, 4, 0, 8), (("a", 4),))
    assert parse_network_args({"min_rank": "4", "single_dim": "0"}).single_dim == 0


def test_split_qkv_is_refused_saying_why_and_false_is_accepted():
    assert refusal({"split_qkv": "true"}) == (
        "network_args: split_qkv=True is refused; allowed: false. sd-scripts' split_qkv trains separate q/k/v factors "
        "and saves them merged into one module with alpha unchanged, so every consumer applies a third (FLUX.1 single "
        "blocks: a quarter) of the trained update (Lumina 2's lora_lumina merges with the q/k/v widths of the 2B model "
        "hard-coded, 2304/768/768, and never splits its modules, so its save fails); AC-LoRA gives the fused layer "
        "the rank it needs instead"
    )
    assert parsed("split_qkv", "false") is False


def test_a_config_changed_with_replace_is_validated_again():
    config = parse_network_args({"restart_every": "2"})
    assert config.replace(restart_every=3).restart_every == 3
    with pytest.raises(OptionError, match="restart_every=2 and restart_every_steps=5 contradict"):
        config.replace(restart_every_steps=5)
    with pytest.raises(OptionError, match="single_dim=1 gives a maximum rank of 1, below min_rank=2"):
        ACLoRAConfig(min_rank=2).replace(single_dim=1)


# --- unknown keys, other families' keys, quoted arguments --------------------------------------------------------


def test_an_unknown_key_is_refused_with_its_value_and_every_key_in_the_tables_order():
    assert refusal({"zeta": "1", "conv_dimm": "4"}) == (
        f"network_args: unknown key 'conv_dimm' (value '4'); allowed keys: {ALLOWED_KEYS}"
    )
    assert refusal({"'seed": 3}) == (
        f"network_args: unknown key \"'seed\" (value 3; it starts with a quote, ', that the value does not end "
        f"with); allowed keys: {ALLOWED_KEYS}"
    )


def test_a_quoted_unknown_key_names_the_argument_as_it_arrived():
    assert refusal({"'seeds": "3'"}) == (
        f"network_args: unknown key 'seeds' (value '3', from the quoted argument \"'seeds=3'\"); allowed keys: "
        f"{ALLOWED_KEYS}"
    )


def test_a_quoted_one_letter_key_is_unwrapped_too():
    assert refusal({"'k": "1'"}) == (
        f"network_args: unknown key 'k' (value '1', from the quoted argument \"'k=1'\"); allowed keys: {ALLOWED_KEYS}"
    )


def test_a_lone_quote_as_a_key_is_an_unknown_key():
    assert refusal({"'": "x'"}).startswith('network_args: unknown key "\'" (value "x\'"; it starts with a quote')


def test_another_familys_option_is_refused_naming_both_families_and_this_familys_layer_options():
    assert refusal({"single_dim": "4", "conv_dim": "2"}, family="sd") == (
        "network_args: single_dim='4' is an option for FLUX.1 models, and this model is SD1.x/2.x/SDXL; the layer "
        "options allowed for SD1.x/2.x/SDXL: network_reg_dims"
    )
    assert refusal({"train_t5xxl": "true"}, family="lumina") == (
        "network_args: train_t5xxl='true' is an option for FLUX.1 and SD3/SD3.5 models, and this model is Lumina 2; "
        "the layer options allowed for Lumina 2: train_blocks, attn_dim, mlp_dim, mod_dim, refiner_dim, "
        "embedder_dims, split_qkv, network_reg_dims"
    )
    assert parse_network_args({"single_dim": "4", "conv_dim": "2"}, family="flux").single_dim == 4
    assert parse_network_args({"train_t5xxl": "true"}, family="sd3").train_t5xxl is True


def test_a_quoted_argument_given_twice_is_refused_naming_both_and_the_warning_names_each_as_read(caplog):
    assert refusal({"'seed": "3'", '"seed': '4"'}) == (
        'network_args: seed is given twice, as "\'seed=3\'" and as "seed=4"; allowed: one of them'
    )
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        config = parse_network_args({"'seed": "3'", '"min_rank': '2"', "dropout": None})
    assert (config.seed, config.min_rank) == (3, 2)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "AC-LoRA: network_args 'seed=3', \"min_rank=2\" arrived wrapped in quotes (the kohya_ss GUI quotes an "
        "argument with a backslash or another character special to a shell); read as seed=3, min_rank=2"
    ]


def test_no_warning_when_nothing_arrived_quoted(caplog):
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        parse_network_args({"seed": "3", "dropout": None})
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# --- network_dim and network_alpha -------------------------------------------------------------------------------


def test_network_dim_and_alpha_refusals_say_what_is_allowed():
    def bad(*args, **kw) -> str:
        with pytest.raises(OptionError) as caught:
            parse_positive(*args, **kw)
        return str(caught.value)

    assert bad("network_dim", "abc", 64, int) == "network_dim='abc' is not valid; allowed: a positive integer"
    assert bad("network_dim", "4.5", 64, int) == "network_dim='4.5' is not valid; allowed: a positive integer"
    assert bad("network_dim", "0", 64, int) == "network_dim='0' is not valid; allowed: a positive integer"
    assert bad("network_alpha", "x", 1.0) == "network_alpha='x' is not valid; allowed: a positive number"
    assert bad("network_alpha", "0", 1.0) == "network_alpha='0' is not valid; allowed: a positive number"
    assert bad("network_alpha", "-1", 1.0, allow_zero=True) == "network_alpha='-1' is not valid; allowed: a number >= 0"
    assert bad("network_alpha", "inf", 1.0, allow_zero=True).startswith("network_alpha='inf' is not valid")
    assert parse_positive("network_alpha", "0", 1.0, allow_zero=True) == 0.0
    assert parse_positive("network_dim", None, 64, int) == 64
    assert parse_positive("network_dim", "8.0", 64, int) == 8 and isinstance(parse_positive("n", "8", 1, int), int)
    assert parse_positive("network_alpha", 2, 1.0) == 2.0


# --- sizes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, why",
    [
        ("5XB", "has unit 'XB', which is not known"),
        ("5 M", "has unit 'M', which is not known"),
        ("1.5", "is not a whole number of bytes"),
        ("1.5b", "is not a whole number of bytes"),
        ("0.0001KB", "is less than one byte"),
        ("0", "is less than one byte"),
        ("5,000", "is not valid"),
        (0, "is not valid"),
        (True, "is not valid"),
    ],
)
def test_a_bad_size_says_what_is_wrong_with_it_and_what_is_allowed(text, why):
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert str(caught.value) == f"size {text!r} {why}; allowed: {SIZE_ALLOWED}"
    assert SIZE_ALLOWED == (
        "a size: bytes (123456) or a number with a unit, KB/MB/GB (decimal: 10^3, 10^6, 10^9 bytes) or KiB/MiB/GiB "
        "(binary: 2^10, 2^20, 2^30 bytes), e.g. 50MB"
    )


def test_a_size_of_one_byte_is_the_smallest_accepted():
    assert parse_size(1) == 1 and parse_size("1") == 1 and parse_size("0.001KB") == 1 and parse_size("1.KB") == 1000


@pytest.mark.parametrize(
    "size, text",
    [
        (1, "1 bytes"),
        (999, "999 bytes"),
        (1_000, "1,000 bytes (1.00 KB)"),
        (999_999, "999,999 bytes (1000.00 KB)"),
        (1_000_000, "1,000,000 bytes (1.00 MB)"),
        (999_999_999, "999,999,999 bytes (1000.00 MB)"),
        (1_000_000_000, "1,000,000,000 bytes (1.00 GB)"),
        (12_345_678_901, "12,345,678,901 bytes (12.35 GB)"),
    ],
)
def test_a_size_is_shown_in_bytes_and_in_the_largest_decimal_unit_it_reaches(size, text):
    assert format_size(size) == text
