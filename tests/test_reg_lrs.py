"""network_reg_lrs: a learning rate by module name (as sd-scripts' lora_flux / lora_hunyuan_image /
lora_anima), in every family: its parsing and errors, and the optimizer groups it makes. Against sd-scripts'
own modules: tests/test_flux_sd3_sd_scripts.py and tests/test_anima_sd_scripts.py."""

from __future__ import annotations

import logging

import pytest

from aclora_ext import create_network, parse_network_args
from aclora_ext.options import OptionError
from helpers import named_groups


def test_pairs_parse_to_patterns_and_learning_rates_in_order():
    config = parse_network_args({"network_reg_lrs": " attn1 =1e-5, to_k=0,mid_block=3"})
    assert config.network_reg_lrs == (("attn1", 1e-5), ("to_k", 0.0), ("mid_block", 3.0))
    assert parse_network_args({}).network_reg_lrs is None


@pytest.mark.parametrize("value", ["attn1=abc", "attn1=-1e-4", "attn1=inf", "attn1=nan", "=1e-4", "attn1",
                                   "(=1e-4", ","])
def test_a_malformed_pair_is_refused_naming_the_key_the_value_and_what_is_allowed(value):
    with pytest.raises(OptionError) as error:
        parse_network_args({"network_reg_lrs": value})
    message = str(error.value)
    assert "network_reg_lrs" in message and value in message
    assert "pattern=lr pairs" in message and "finite number >= 0" in message


def groups_of(models, unet_lr=1e-4, text_encoder_lr=5e-5, **network_args):
    network = create_network(1.0, 4, 2.0, None, models["text_encoder"], models["unet"], **network_args)
    groups, descriptions = network.prepare_optimizer_params(text_encoder_lr, unet_lr, 1e-3)
    return network, named_groups(network, groups, descriptions)


def params_of(network, word):
    return frozenset(n for n, _ in network.named_parameters() if word(n.split(".")[0]))


def test_the_first_matching_pattern_sets_a_modules_rate_in_its_own_group_and_0_leaves_it_untrained(sd1_models):
    network, groups = groups_of(sd1_models, network_reg_lrs="text_model.*_q_proj=2e-6,attn1=1e-5,unet.*attn=0")
    by = {d: (lr, names) for d, lr, names in groups}
    assert [d for d, _, _ in groups] == ["textencoder reg_lr_0", "textencoder", "unet reg_lr_1", "unet"]
    assert by["unet reg_lr_1"] == (1e-5, params_of(network, lambda n: n.startswith("lora_unet") and "attn1" in n))
    assert by["textencoder reg_lr_0"][0] == 2e-6
    assert by["textencoder reg_lr_0"][1] == params_of(network, lambda n: n.startswith("lora_te") and "q_proj" in n)
    # attn2 matched "unet.*attn=0" (attn1 matched before): in no group, so never trained
    untrained = params_of(network, lambda n: n.startswith("lora_unet") and "attn" in n and "attn1" not in n)
    assert untrained and not any(untrained & names for _, _, names in groups)
    assert by["unet"][0] == 1e-4 and by["textencoder"][0] == 5e-5
    everything = params_of(network, lambda n: True)
    assert frozenset().union(*(names for _, _, names in groups)) == everything - untrained


def test_loraplus_multiplies_a_patterns_rate_for_lora_up(sd1_models):
    network, groups = groups_of(sd1_models, network_reg_lrs="attn1=1e-5", loraplus_unet_lr_ratio="16")
    by = {d: (lr, names) for d, lr, names in groups}
    assert by["unet reg_lr_0 plus"][0] == pytest.approx(16e-5) and by["unet reg_lr_0"][0] == 1e-5
    assert all(".lora_up." in n for n in by["unet reg_lr_0 plus"][1])
    assert not any(".lora_up." in n for n in by["unet reg_lr_0"][1])
    assert by["unet plus"][0] == pytest.approx(16e-4)


def test_the_start_up_line_counts_the_modules_a_pattern_matched(sd1_models, caplog):
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network, _ = groups_of(sd1_models, network_reg_lrs="attn1=1e-5")
    matched = sum("attn1" in m.lora_name for m in network.loras)
    assert f"learning rates set by network_reg_lrs on {matched} modules" in caplog.text
