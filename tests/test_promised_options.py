"""The refusals docs/options.md promises, each through create_network's ``network_args`` as sd-scripts passes
them (strings), each failing when its check is removed: the message names the key, the value and what is allowed.
"""

from __future__ import annotations

import pytest

from aclora_ext import OptionError, create_network, parse_network_args


def create(models, network_dim=8, **network_args):
    return create_network(1.0, network_dim, 4.0, None, models["text_encoder"], models["unet"], **network_args)


def test_min_rank_above_conv_dim_is_refused_naming_both(sd1_models):
    with pytest.raises(OptionError) as caught:
        create(sd1_models, network_dim=8, min_rank="4", conv_dim="2")
    message = str(caught.value)
    assert "min_rank=4" in message and "conv_dim=2" in message and "1 .. 2" in message


def test_min_rank_up_to_conv_dim_is_accepted(sd1_models):
    network = create(sd1_models, network_dim=8, min_rank="2", conv_dim="2")
    assert network.config.min_rank == 2 and network.config.conv_dim == 2


def test_a_layer_maximum_rank_below_min_rank_is_refused_naming_the_key(sd1_models):
    with pytest.raises(OptionError) as caught:
        create(sd1_models, network_dim=8, min_rank="4", network_reg_dims="up_blocks=2")
    message = str(caught.value)
    assert "network_reg_dims=up_blocks=2" in message and "min_rank=4" in message
    assert "0 (no LoRA) or ranks >= min_rank" in message


def test_a_layer_rank_of_zero_means_no_lora_and_is_not_below_min_rank(sd1_models):
    network = create(sd1_models, network_dim=8, min_rank="4", network_reg_dims="up_blocks=0")
    assert network.config.network_reg_dims == (("up_blocks", 0),)


@pytest.mark.parametrize(
    "key,value,low", [("single_dim", "2", 2), ("in_dims", "4,2,4,4,4", 2), ("emb_dims", "4,4,3,4,4,4", 3)]
)
def test_the_family_layer_ranks_below_min_rank_are_refused(key, value, low):
    with pytest.raises(OptionError) as caught:
        parse_network_args({key: value, "min_rank": "4"}, max_rank=8)
    message = str(caught.value)
    assert f"{key}={value}" in message and f"maximum rank of {low}" in message and "min_rank=4" in message
