"""The RESTART math of paper §3.2-3.4 (aclora_ext.functional), checked against
torch.linalg.svd and against the equations themselves.

Shapes follow kohya: lora_down is R x n (rank on the rows), lora_up is n x R
(rank on the columns); every function takes a batch of them.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from aclora_ext import functional as F
from aclora_ext.lora import paper_restart as restart_lib, product_restart as analysis
from aclora_ext.network.factory import attach

R = 16  # maximum rank of the factors below
N = 64  # their large side
SURE_P = 0.99  # a threshold that every planted signal below clears and no noise floor reaches


def planted(rows: int, cols: int, k: int, noise: float = 1e-3, seed: int = 0, dtype=torch.float32,
            strength: float = 1.0) -> torch.Tensor:
    """A rows x cols matrix: a rank-k signal (singular values 2 .. 1 times ``strength``) plus Gaussian noise of std ``noise``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    signal = (u * torch.linspace(2.0, 1.0, k, dtype=torch.float64) * strength) @ v.T
    return (signal + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart-Young: the closest rank-k matrix, from a full float64 SVD."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def no_refill(truncated, sigma, generator):
    """gaussian_refill with sigma = 0: leaves exactly U D' V of Eq. 2."""
    return truncated


def mlp(seed: int = 0) -> nn.Module:
    """Five Linear layers of two shapes (64 -> 48 three times, 48 -> 64 twice)."""
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(64, 48) if i % 2 == 0 else nn.Linear(48, 64) for i in range(5)))


# --- signal count: Eq. 3 -------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 6, 12])
@pytest.mark.parametrize("shape", ["lora_down R x n", "lora_up n x R"])
def test_a_factor_with_a_planted_rank_k_signal_keeps_k_components(k, shape):
    if shape.startswith("lora_down"):
        factor, rank_dim = planted(R, N, k, seed=k), 1
    else:
        factor, rank_dim = planted(N, R, k, seed=k), 2
    s, _ = F.rank_side_svd(factor[None], rank_dim)
    assert F.signal_rank(s, SURE_P).tolist() == [k]


@pytest.mark.parametrize("k", [2, 5, 9])
def test_a_module_with_planted_rank_k_in_both_factors_keeps_k_through_restart_paper(k):
    network = attach(nn.Sequential(nn.Linear(N, 48)), max_rank=R, restart_mode="paper")
    m = network.loras[0]
    with torch.no_grad():
        m.lora_down.weight.copy_(planted(R, N, k, seed=1))
        m.lora_up.weight.copy_(planted(48, R, k, seed=2))
    _, _, ranks = F.restart_paper(m.down_matrix()[None], m.up_matrix()[None], SURE_P, "squared", 1, gen(0))
    assert ranks.tolist() == [k]
    report = network.restart(p=SURE_P)
    assert report.ranks == {m.lora_name: k} == network.ranks()


@pytest.mark.parametrize("k_down, k_up", [(3, 7), (7, 3), (4, 4)])
def test_a_module_keeps_the_larger_of_its_factors_signal_counts_union_rule(k_down, k_up, monkeypatch):
    """Eq. 7: S = union of the layers' signal sets, i.e. the largest count; both factors are cut to it.

    In float64, so that the components cut inside the noise floor are resolved exactly.
    """
    down, up = planted(R, N, k_down, seed=3, dtype=torch.float64), planted(48, R, k_up, seed=4, dtype=torch.float64)
    monkeypatch.setattr(F.paper, "gaussian_refill", no_refill)
    new_down, new_up, k = F.restart_paper(down[None], up[None], SURE_P, "squared", 1, gen(0))
    union = max(k_down, k_up)
    assert k.tolist() == [union]
    assert torch.allclose(new_down[0], best_rank_k(down, union), atol=1e-10)
    assert torch.allclose(new_up[0], best_rank_k(up, union), atol=1e-10)


def test_squared_and_linear_energy_choose_different_counts_on_one_spectrum():
    """Singular values 3,1,1,1,1 with p = 0.6.

    squared: energies 9,1,1,1,1 (total 13): the first component alone holds 9/13 >= 0.6, so 1.
    linear: values 3,1,1,1,1 (total 7): 3/7, 4/7 < 0.6 and 5/7 >= 0.6, so 3.
    """
    s = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0]])
    assert F.signal_rank(s, 0.6, energy="squared").tolist() == [1]
    assert F.signal_rank(s, 0.6, energy="linear").tolist() == [3]


def test_the_component_that_crosses_p_is_kept():
    """Energies 4,3,2,1 (total 10), p = 0.5: the second component takes the sum from 4 to 7, past 5."""
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).sqrt()
    assert F.signal_rank(s, 0.5).tolist() == [2]


def test_a_cumulative_energy_exactly_at_p_needs_no_further_component():
    """Energies 4,3,2,1, p = 0.4: the first component reaches exactly 4 = 0.4 * 10."""
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64).sqrt()
    assert F.signal_rank(s, 0.4).tolist() == [1]


@pytest.mark.parametrize("min_rank, expected", [(1, 1), (3, 3)])
def test_p_zero_keeps_min_rank_components_and_at_least_one(min_rank, expected):
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert F.signal_rank(s, 0.0, min_rank=min_rank).tolist() == [expected]


def test_an_all_zero_factor_keeps_one_component():
    """A fresh lora_up is all zeros: nothing to keep, but a module never drops below one component."""
    s, _ = F.rank_side_svd(torch.zeros(1, N, R), rank_dim=2)
    assert F.signal_rank(s, 0.9).tolist() == [1]


def test_p_one_keeps_every_nonzero_component_and_no_zero_one():
    s = torch.tensor([[3.0, 2.0, 1e-3, 0.0, 0.0]])
    assert F.signal_rank(s, 1.0).tolist() == [3]


def test_min_rank_larger_than_the_factor_keeps_all_of_it():
    s = torch.tensor([[3.0, 2.0, 1.0]])
    assert F.signal_rank(s, 0.1, min_rank=5).tolist() == [3]


def test_each_module_of_a_batch_gets_its_own_count():
    batch = torch.stack([planted(R, N, k, seed=k) for k in (1, 4, 8, 12)])
    s, _ = F.rank_side_svd(batch, rank_dim=1)
    assert F.signal_rank(s, SURE_P).tolist() == [1, 4, 8, 12]


# --- the rank-side SVD and truncation: Eq. 2 --------------------------------------------------

@pytest.mark.parametrize("rank_dim", [1, 2])
def test_rank_side_svd_gives_the_singular_values_and_rank_side_vectors_of_torch_svd(rank_dim):
    g = gen(5)
    factors = torch.randn(3, R, N, generator=g, dtype=torch.float64)
    if rank_dim == 2:
        factors = factors.transpose(1, 2).contiguous()
    s, v = F.rank_side_svd(factors, rank_dim)
    u_ref, s_ref, vh_ref = torch.linalg.svd(factors, full_matrices=False)
    rank_side = u_ref if rank_dim == 1 else vh_ref.transpose(1, 2)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-10)
    # singular vectors are unique up to sign (the random spectra have no repeated values)
    overlap = (v.transpose(1, 2) @ rank_side).abs()
    assert torch.allclose(overlap, torch.eye(R, dtype=torch.float64).expand(3, R, R), atol=1e-8)


@pytest.mark.parametrize("rank_dim", [1, 2])
def test_truncating_a_factor_gives_its_best_rank_k_approximation(rank_dim):
    g = gen(6)
    factor = torch.randn(R, N, generator=g, dtype=torch.float64)
    if rank_dim == 2:
        factor = factor.T.contiguous()
    s, v = F.rank_side_svd(factor[None], rank_dim)
    for k in (1, 5, 11, R):
        kept = F.truncate_factor(factor[None], v, torch.tensor([k]), rank_dim)[0]
        assert torch.allclose(kept, best_rank_k(factor, k), atol=1e-10), k
        dropped = s[0, k:].pow(2).sum().sqrt()
        assert torch.allclose(torch.linalg.matrix_norm(factor - kept), dropped, atol=1e-10)


def test_residual_std_is_the_standard_deviation_of_what_was_removed():
    original = torch.randn(2, R, N, generator=gen(7))
    truncated = original * 0.5
    expected = torch.stack([(o - t).flatten().std() for o, t in zip(original, truncated)])
    assert torch.allclose(F.residual_std(original, truncated), expected)


# --- the Gaussian refill ------------------------------------------------------------------------

def assert_gaussian_with_std(noise: torch.Tensor, sigma: float) -> None:
    """Mean, std and the share within one std of a N(0, sigma^2) sample, each within 5 standard errors."""
    n = noise.numel()
    x = noise.double().flatten()
    assert abs(float(x.mean())) < 5 * sigma / math.sqrt(n)
    # the sample std of n normal values has standard error sigma / sqrt(2 n)
    assert abs(float(x.std()) - sigma) < 5 * sigma / math.sqrt(2 * n)
    inside = float((x.abs() < sigma).double().mean())
    share = math.erf(1 / math.sqrt(2))  # 0.6827 for a Gaussian
    assert abs(inside - share) < 5 * math.sqrt(share * (1 - share) / n)


def test_the_refill_of_each_factor_has_the_std_of_that_factors_removed_residual():
    """Eq. 2: M' = U D' V + G, G ~ N(0, sigma^2), sigma = std(M - U D' V), per factor.

    The factors are large (64 x 8192) so the sample std pins sigma to about 0.1 %;
    their noise floors differ (0.05 and 0.2) so each factor must use its own sigma.
    The signal is strong enough to hold more than 99 % of the energy of such a factor.
    """
    rank, wide, k = 64, 8192, 6
    down = planted(rank, wide, k, noise=0.05, seed=8, strength=1000)
    up = planted(wide, rank, k, noise=0.2, seed=9, strength=1000)
    new_down, new_up, ks = F.restart_paper(down[None], up[None], SURE_P, "squared", 1, gen(0))
    assert ks.tolist() == [k]
    for old, new in ((down, new_down[0]), (up, new_up[0])):
        kept = best_rank_k(old, k)
        sigma = float((old.double() - kept).std())
        assert_gaussian_with_std(new.double() - kept, sigma)


def test_gaussian_refill_draws_noise_of_the_given_std_per_matrix():
    truncated = torch.zeros(2, 64, 4096)
    sigma = torch.tensor([0.5, 2.0])
    refilled = F.gaussian_refill(truncated, sigma, gen(1))
    for noise, s in zip(refilled, sigma.tolist()):
        assert_gaussian_with_std(noise, s)


def test_the_refill_noise_is_the_same_for_the_same_seed_and_differs_for_another():
    down, up = planted(R, N, 4, noise=0.05, seed=10)[None], planted(48, R, 4, noise=0.05, seed=11)[None]
    first = F.restart_paper(down, up, 0.9, "squared", 1, gen(123))
    again = F.restart_paper(down, up, 0.9, "squared", 1, gen(123))
    other = F.restart_paper(down, up, 0.9, "squared", 1, gen(124))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(first[2], other[2])  # the same ranks: only the noise depends on the seed
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


# --- the threshold: Eq. 5-6 ------------------------------------------------------------------------

@pytest.mark.parametrize("loss, progress", [(0.5, 0.0), (0.5, 0.5), (0.5, 1.0), (0.1, 0.3), (0.9, 0.9), (0.02, 0.1)])
def test_threshold_p_is_one_minus_the_loss_to_the_power_one_plus_progress(loss, progress):
    p, alpha = F.threshold_p(loss, progress)
    assert alpha == pytest.approx(1.0 + progress)
    assert p == pytest.approx(1.0 - loss ** (1.0 + progress))


def test_threshold_p_rises_as_training_progresses_at_a_fixed_loss():
    ps = [F.threshold_p(0.3, e / 10)[0] for e in range(11)]
    assert ps == sorted(ps) and ps[0] == pytest.approx(0.7) and ps[-1] == pytest.approx(1 - 0.3**2)


def test_threshold_p_clamps_to_zero_for_a_loss_above_one_and_to_one_for_zero_loss():
    assert F.threshold_p(1.5, 0.4) == (0.0, pytest.approx(1.4))
    assert F.threshold_p(0.0, 0.4)[0] == 1.0


@pytest.mark.parametrize("progress, alpha", [(-0.5, 1.0), (2.0, 2.0)])
def test_alpha_stays_between_one_and_two(progress, alpha):
    assert F.threshold_p(0.5, progress) == (pytest.approx(1 - 0.5**alpha), pytest.approx(alpha))


def test_a_huge_loss_gives_p_zero_flagged_clamped_in_the_report_and_logged(caplog):
    network = attach(mlp(), max_rank=8, restart_mode="paper")
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        report = network.restart(loss=1.5, progress=0.3)
    assert report.p == 0.0 and report.p_clamped and report.loss == 1.5
    assert set(report.ranks.values()) == {1}  # p = 0 keeps min_rank
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "clamped" in r.getMessage()]
    assert len(warnings) == 1
    assert report.line() in caplog.text and "clamped" in report.line()


# --- product mode -----------------------------------------------------------------------------------

def planted_module(k: int, out_dim: int = 48, in_dim: int = N, noise: float = 1e-4, seed: int = 0):
    """(down R x in, up out x R) with a random full-rank down and an up chosen so up @ down has rank k (+ noise)."""
    g = gen(seed)
    down = torch.randn(R, in_dim, generator=g) / math.sqrt(in_dim)
    up = torch.randn(out_dim, k, generator=g) @ torch.randn(k, R, generator=g) + noise * torch.randn(out_dim, R, generator=g)
    return down, up


def product_restart(down: torch.Tensor, up: torch.Tensor, keep_of, seed: int = 0):
    """One module's product-mode RESTART composed from the pure functions, as restart.restart_product runs
    them: the factors rebased on their update's SVD (every component in its own slot), then the keep mask."""
    s, to_up, to_down = F.product_core(down[None], up[None])
    keep = keep_of(s)
    every = torch.ones_like(s, dtype=torch.bool)
    rebased_down, rebased_up = F.component_factors(down[None], up[None], s, to_up, to_down, every, down.shape[0])
    row_sq = down.pow(2).sum(dim=1).mean()[None]
    new_down, new_up = F.restart_slots(rebased_down, rebased_up, keep, row_sq, F.row_std(down[None]), gen(seed))
    return new_down[0], new_up[0], keep[0]


def energy_keep(p: float):
    return lambda s: F.as_keep(F.signal_rank(s, p), s.shape[-1])


@pytest.mark.parametrize("k", [1, 4, 9])
def test_product_mode_keeps_the_planted_rank_of_the_update_and_truncates_it_exactly(k):
    down, up = planted_module(k, seed=k)
    new_down, new_up, keep = product_restart(down, up, energy_keep(SURE_P))
    assert int(keep.sum()) == k
    # the module's update is the best rank-k approximation of the old one: no noise reaches the product
    assert torch.allclose((new_up @ new_down).double(), best_rank_k(up @ down, k), atol=1e-5)


def test_rebasing_on_the_update_svd_leaves_the_update_unchanged():
    down, up = planted_module(6, noise=0.1, seed=3)
    s, to_up, to_down = F.product_core(down[None], up[None])
    every = torch.ones_like(s, dtype=torch.bool)
    rebased_down, rebased_up = F.component_factors(down[None], up[None], s, to_up, to_down, every, R)
    assert torch.allclose(rebased_up[0] @ rebased_down[0], up @ down, atol=1e-5)
    # one component per slot: slot j alone is s_j u_j v_j^T, and the slots are orthogonal
    u, sv, vh = torch.linalg.svd((up @ down).double())
    j = 2
    component = (rebased_up[0, :, j:j + 1] @ rebased_down[0, j:j + 1]).double()
    assert torch.allclose(component, sv[j] * u[:, j:j + 1] @ vh[j:j + 1], atol=1e-5)


def test_product_mode_restarts_freed_slots_like_a_fresh_lora():
    """Freed lora_up columns are zero; freed lora_down rows are Gaussian with the old lora_down's std."""
    k, wide = 3, 16384
    down, up = planted_module(k, in_dim=wide, seed=12)
    new_down, new_up, keep = product_restart(down, up, energy_keep(SURE_P))
    assert keep.tolist() == [True] * k + [False] * (R - k)
    assert torch.count_nonzero(new_up[:, k:]) == 0
    assert_gaussian_with_std(new_down[k:], float(down.std()))


def test_product_mode_gives_the_kept_lora_down_rows_the_old_rows_mean_norm():
    down, up = planted_module(5, seed=13)
    new_down, _, keep = product_restart(down, up, energy_keep(SURE_P))
    kept = new_down[keep]
    assert torch.allclose(kept.pow(2).sum(1).mean(), down.pow(2).sum(1).mean(), rtol=1e-5)


def test_a_keep_mask_need_not_be_a_prefix_and_freed_slots_are_the_unkept_ones():
    down, up = planted_module(6, noise=0.0, seed=14)
    keep_second_and_fourth = lambda s: torch.tensor([[False, True, False, True] + [False] * (R - 4)])
    new_down, new_up, _ = product_restart(down, up, keep_second_and_fourth)
    u, s, vh = torch.linalg.svd(up @ down)
    expected = sum(s[j] * u[:, j:j + 1] @ vh[j:j + 1] for j in (1, 3))
    # float32 products of entries up to ~10: 1e-5 absolute was below the rounding of some CPUs' SVD
    assert torch.allclose(new_up @ new_down, expected, atol=1e-4)
    assert torch.count_nonzero(new_up[:, [0, 2] + list(range(4, R))]) == 0


def test_product_core_gives_the_singular_values_and_the_components_of_the_explicit_product():
    g = gen(14)
    down, up = torch.randn(4, R, N, generator=g, dtype=torch.float64), torch.randn(4, 48, R, generator=g, dtype=torch.float64)
    s, to_up, to_down = F.product_core(down, up)
    product = up @ down
    assert torch.allclose(s, torch.linalg.svdvals(product)[:, :R], atol=1e-10)
    # t_j = to_down[:, j] maps lora_down to s_j v_j^T, to_up[:, j] maps lora_up to s_j u_j
    u, sv, vh = torch.linalg.svd(product)
    sign = torch.sign(((up @ to_up) * u[:, :, :R]).sum(dim=1))  # singular vectors are defined up to sign
    assert torch.allclose((up @ to_up) * sign[:, None, :], u[:, :, :R] * sv[:, None, :R], atol=1e-8)
    assert torch.allclose((to_down.transpose(1, 2) @ down) * sign[:, :, None], vh[:, :R] * sv[:, :R, None], atol=1e-8)


def test_product_core_of_a_rank_above_the_layer_width_pads_with_zero_components():
    g = gen(15)
    down, up = torch.randn(2, R, 8, generator=g), torch.randn(2, 5, R, generator=g)  # R = 16 > in 8 > out 5
    s, to_up, to_down = F.product_core(down, up)
    assert s.shape == (2, R) and to_up.shape == (2, R, R) and to_down.shape == (2, R, R)
    assert torch.count_nonzero(s[:, 5:]) == 0
    every = torch.ones_like(s, dtype=torch.bool)
    new_down, new_up = F.component_factors(down, up, s, to_up, to_down, every, R)
    assert torch.allclose(new_up @ new_down, up @ down, atol=1e-4)


# --- importance: what a component adds to its layer's output -----------------------------------------

def test_importance_is_the_rms_each_component_adds_to_the_output_computed_from_the_activation_sums():
    g = gen(16)
    down, up = planted_module(7, noise=0.05, seed=16)
    x = torch.randn(500, N, generator=g) * torch.linspace(0.1, 3.0, N)  # anisotropic inputs
    hidden = x @ down.T
    s, _, to_down = F.product_core(down[None], up[None])
    importance = F.component_importance(to_down, (hidden.T @ hidden)[None], torch.tensor([x.shape[0]]))[0]
    u, sv, vh = torch.linalg.svd(up @ down)
    direct = sv[:R] * (x @ vh[:R].T).pow(2).mean(dim=0).sqrt()
    assert torch.allclose(importance[:7], direct[:7], rtol=1e-3)


def test_importance_prefers_a_weaker_component_that_the_inputs_excite_over_a_stronger_one_they_do_not():
    """Two components: s = 2 along an input direction of energy 1e-4, s = 1 along one of energy 1."""
    in_dim, out_dim = 12, 10
    basis_in = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen(17)))[0]
    basis_out = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=gen(18)))[0]
    update = 2.0 * basis_out[:, :1] @ basis_in[:, :1].T + 1.0 * basis_out[:, 1:2] @ basis_in[:, 1:2].T
    x = 1e-2 * torch.randn(4000, 1, generator=gen(19)) @ basis_in[:, :1].T + \
        torch.randn(4000, 1, generator=gen(20)) @ basis_in[:, 1:2].T
    down = torch.cat([basis_in[:, :2].T, 1e-3 * torch.randn(2, in_dim, generator=gen(21))])[None]
    up = torch.cat([update @ basis_in[:, :2], torch.zeros(out_dim, 2)], dim=1)[None]
    hidden = x @ down[0].T
    s, _, to_down = F.product_core(down, up)
    importance = F.component_importance(to_down, (hidden.T @ hidden)[None], torch.tensor([4000]))
    assert s[0, 0] > s[0, 1] and importance[0, 1] > 10 * importance[0, 0]
    assert F.keep_above(importance, 0.1 * float(importance.max())).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("min_rank, expected", [(1, [[True, False, False, False]]), (2, [[True, False, True, False]])])
def test_keep_above_keeps_what_clears_the_threshold_and_at_least_min_rank_of_the_most_important(min_rank, expected):
    importance = torch.tensor([[5.0, 0.1, 0.3, 0.0]])
    assert F.keep_above(importance, 1.0, min_rank).tolist() == expected


def test_keep_above_a_zero_threshold_keeps_every_nonzero_component_only():
    assert F.keep_above(torch.tensor([[3.0, 1.0, 0.0, 0.0]]), 0.0).tolist() == [[True, True, False, False]]


def test_the_candidate_levels_span_keeping_everything_to_keeping_only_the_largest():
    assert F.LEVELS[0] == math.inf and F.LEVELS[1] == 4.0 and F.LEVELS[-1] == 0.0 and len(F.LEVELS) == 18
    assert list(F.LEVELS[1:]) == sorted(F.LEVELS[1:], reverse=True)
    importance = torch.tensor([[1.0, 0.9, 0.5]])
    top = float(importance.max())
    assert F.keep_above(importance, top * 10.0 ** -F.LEVELS[-1]).tolist() == [[True, False, False]]


def test_the_fine_levels_are_the_cuts_between_distinct_importances_near_the_coarse_choice():
    importances = [torch.tensor([100.0, 80.0, 10.0]), torch.tensor([60.0, 0.0])]
    # levels below the top (100): 80 -> 0.097, 60 -> 0.222, 10 -> 1.0; cuts at 0.048, 0.159, 0.611
    assert F.refine_levels(importances, 0.0) == pytest.approx([0.0485, 0.1594], abs=1e-3)
    assert F.refine_levels(importances, 0.75) == pytest.approx([0.6109], abs=1e-3)
    assert F.refine_levels(importances, math.inf) == []
    keep = F.keep_above(torch.tensor([[100.0, 80.0, 60.0, 10.0]]), 100.0 * 10 ** -F.refine_levels(importances, 0.0)[1])
    assert keep.tolist() == [[True, True, False, False]]


def test_after_a_first_choice_only_the_levels_within_a_decade_of_it_are_evaluated_and_keeping_everything():
    assert F.window_levels(None) == list(F.LEVELS)
    assert F.window_levels(2.0) == [math.inf, 3.0, 2.75, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, 1.0]
    assert F.window_levels(math.inf) == list(F.LEVELS)  # keeping everything gives no hint where to cut
    assert F.window_levels(0.1) == [math.inf, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_at_most_the_given_number_of_fine_levels_spread_over_the_window():
    importances = [torch.logspace(0, -0.5, 40)]
    fine = F.refine_levels(importances, 0.25, most=5)
    assert len(fine) == 5 and fine == sorted(fine) and 0.0 < fine[0] and fine[-1] < 0.5


# --- batched over a network vs one module at a time -------------------------------------------------

def planted_network(seed: int = 0):
    """An MLP network at maximum rank 8 whose five modules hold planted signals of ranks 1..5 (+ noise)."""
    network = attach(mlp(seed), max_rank=8)
    with torch.no_grad():
        for i, m in enumerate(network.loras):
            m.lora_down.weight.copy_(planted(8, m.in_dim, i + 1, noise=0.02, seed=10 * seed + i))
            m.lora_up.weight.copy_(planted(m.out_dim, 8, i + 2, noise=0.02, seed=10 * seed + i + 5))
    return network


@pytest.mark.parametrize("chunked", [False, True], ids=["one batch per shape", "chunks of two"])
@pytest.mark.parametrize("mode", ["paper", "product"])
def test_the_batched_restart_equals_restarting_each_module_on_its_own(mode, chunked, monkeypatch):
    """restart_modules / restart_product vs the math on one module at a time with the same p.

    The noise cannot match (one generator per chunk), so it is taken out where
    it lands: paper mode refills with sigma = 0; product mode puts noise only in
    the freed lora_down rows, so lora_up and the kept rows are compared.
    """
    if mode == "paper":
        monkeypatch.setattr(F.paper, "gaussian_refill", no_refill)
    if chunked:
        monkeypatch.setattr(F, "chunk_size", lambda *args, **kwargs: 2)
    network = planted_network()
    before = [(m.down_matrix().detach().clone(), m.up_matrix().detach().clone()) for m in network.loras]
    if mode == "paper":
        ranks, skipped = restart_lib.restart_modules(network.loras, p=0.95, energy="squared", min_rank=1, seed=0)
    else:
        by_energy = lambda spectra: {i: energy_keep(0.95)(sp.s[None])[0] for i, sp in spectra.items()}
        new, skipped = analysis.restart_product(network.loras, {}, by_energy, seed=0)
        ranks = [new[i] for i in range(len(network.loras))]
    assert skipped == []
    for m, (down, up), k in zip(network.loras, before, ranks):
        if mode == "paper":
            one_down, one_up, one_k = F.restart_paper(down[None], up[None], 0.95, "squared", 1, gen(99))
            one_down, one_up, one_k = one_down[0], one_up[0], int(one_k)
        else:  # the energy rule sees the update's singular values with alpha/R applied: scale-free, the same keep
            one_down, one_up, keep = product_restart(down, up, energy_keep(0.95), seed=99)
            one_k = int(keep.sum())
        assert one_k == k
        rows = k if mode == "product" else m.rank
        assert torch.allclose(m.down_matrix()[:rows], one_down[:rows], atol=1e-5)
        assert torch.allclose(m.up_matrix(), one_up, atol=1e-5)
    assert len(set(ranks)) > 1  # the modules really differ


def test_restart_slots_rescales_a_lone_kept_row_of_small_norm_exactly_and_keeps_its_component():
    """Edges of the kept rows' rescaling (mutation survivors): one kept slot, rows whose squared norm is far
    below 1, and a module whose kept rows are all zero (nothing to rescale: left as it is, no division by 0)."""
    from aclora_ext import functional as F

    g = torch.Generator().manual_seed(3)
    down = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 1e-3
    up = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    down[1, 0] = 0.0  # module 1: its one kept row is zero
    keep = torch.tensor([[True, False, False, False], [True, False, False, False]])
    row_sq = torch.tensor([0.25, 0.25], dtype=torch.float64)
    new_down, new_up = F.restart_slots(down, up, keep, row_sq, torch.tensor([0.1, 0.1], dtype=torch.float64), g)
    assert torch.allclose(new_down[0, 0].pow(2).sum(), row_sq[0])  # the old rows' mean square norm, exactly
    assert torch.allclose(torch.outer(new_up[0, :, 0], new_down[0, 0]), torch.outer(up[0, :, 0], down[0, 0]))
    assert torch.equal(new_down[1, 0], down[1, 0]) and torch.equal(new_up[1, :, 0], up[1, :, 0])
    assert bool(torch.isfinite(new_down).all() and torch.isfinite(new_up).all())


# --- exact draws and edges (each pins what a mutation of the math changed unseen) ----------------------------

def test_p_one_keeps_exactly_the_nonzero_components_even_where_the_running_sum_rounds_below_the_total():
    """Eq. 3 at p = 1 over 300 random float32 spectra with zero tails: the energy before a zero component can
    round below the total (cumsum and sum add in different orders); a zero component is never kept."""
    g = gen(40)
    s = torch.rand(300, 12, generator=g)
    nonzero = torch.randint(1, 12, (300,), generator=g)
    s = torch.where(torch.arange(12)[None, :] < nonzero[:, None], s, 0.0).sort(dim=1, descending=True).values
    assert F.signal_rank(s, 1.0).tolist() == nonzero.tolist()


def test_a_per_module_threshold_gives_each_module_the_count_of_its_own_p():
    """p as a (B,) tensor: energies 4,3,2,1 (total 10) in both rows; p = 0.4 keeps 1 (4 reaches 4), p = 0.75
    keeps 3 (4 + 3 = 7 is still below 7.5)."""
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2, dtype=torch.float64).sqrt()
    assert F.signal_rank(s, torch.tensor([0.4, 0.75], dtype=torch.float64)).tolist() == [1, 3]


def test_gaussian_refill_adds_the_generators_standard_normal_draws_times_sigma_in_the_factors_dtype():
    """Planted: the refill is truncated + sigma_b * N(0, 1) drawn from the given generator in float64."""
    truncated = torch.randn(2, 5, 7, generator=gen(41), dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    refilled = F.gaussian_refill(truncated, sigma, gen(42))
    expected = truncated + sigma[:, None, None] * torch.randn(2, 5, 7, generator=gen(42), dtype=torch.float64)
    assert refilled.dtype == torch.float64
    assert torch.allclose(refilled, expected, rtol=0, atol=1e-15)


def test_restart_slots_refills_the_freed_rows_with_the_generators_draws_times_std_in_the_factors_dtype():
    """Planted: a freed lora_down row is std * N(0, 1) from the given generator (float64 draws), added, and its
    lora_up column is zero; a kept slot whose row already has the mean square norm is left exactly."""
    down = torch.randn(1, 4, 6, generator=gen(43), dtype=torch.float64)
    up = torch.randn(1, 5, 4, generator=gen(44), dtype=torch.float64)
    keep = torch.tensor([[True, False, True, False]])
    row_sq = down[:, [0, 2]].pow(2).sum(dim=2).mean(dim=1)  # the kept rows' own mean: scale 1
    std = torch.tensor([0.3], dtype=torch.float64)
    new_down, new_up = F.restart_slots(down, up, keep, row_sq, std, gen(45))
    draws = torch.randn(1, 4, 6, generator=gen(45), dtype=torch.float64)
    assert new_down.dtype == torch.float64
    assert torch.allclose(new_down[0, [1, 3]], 0.3 * draws[0, [1, 3]], rtol=0, atol=1e-15)
    assert torch.allclose(new_down[0, [0, 2]], down[0, [0, 2]], rtol=0, atol=1e-14)
    assert torch.count_nonzero(new_up[0, :, [1, 3]]) == 0


def test_the_importance_of_one_recorded_input_is_the_size_of_what_each_component_adds_to_it():
    """count = 1: the mean over one input is that input's square, so importance_j = |t_j . h| (no halving)."""
    down = torch.randn(1, 3, 8, generator=gen(46), dtype=torch.float64)
    up = torch.randn(1, 6, 3, generator=gen(47), dtype=torch.float64)
    x = torch.randn(8, generator=gen(48), dtype=torch.float64)
    h = down[0] @ x
    _, _, to_down = F.product_core(down, up)
    importance = F.component_importance(to_down, torch.outer(h, h)[None], torch.tensor([1]))
    assert torch.allclose(importance[0], (to_down[0].T @ h).abs(), rtol=1e-12)


@pytest.mark.parametrize("poisoned", ["lora_down", "lora_up"])
def test_a_non_finite_float32_restart_is_redone_in_float64_one_module_at_a_time(poisoned, monkeypatch, caplog):
    """Paper mode: a chunk whose float32 RESTART gives a non-finite factor (either one) writes nothing of it; each
    module is redone alone in float64 with the chunk's generator (seed * 1_000_003 + chunk number, continuing
    where the float32 attempt left it), and the log says so. Expected factors: that sequence of calls, here."""
    real = F.restart_paper

    def poisoning(down, up, *args):
        new_down, new_up, k = real(down, up, *args)
        if down.dtype == torch.float32:
            (new_down if poisoned == "lora_down" else new_up)[0, 0, 0] = math.nan
        return new_down, new_up, k

    from aclora_ext.lora.module import ACLoRAModule

    monkeypatch.setattr(F, "restart_paper", poisoning)
    g = torch.Generator().manual_seed(0)
    modules = [ACLoRAModule(f"lora_{i}", nn.Linear(10, 8), rank=4, alpha=4.0) for i in range(2)]
    with torch.no_grad():
        for m in modules:
            m.lora_down.weight.copy_(torch.randn(4, 10, generator=g))
            m.lora_up.weight.copy_(torch.randn(8, 4, generator=g))
    down = torch.stack([m.down_matrix().detach().clone() for m in modules])
    up = torch.stack([m.up_matrix().detach().clone() for m in modules])
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        ranks, skipped = restart_lib.restart_modules(modules, p=0.9, energy="squared", min_rank=1, seed=5)
    chunk = torch.Generator().manual_seed(5 * 1_000_003 + 1)
    real(down, up, 0.9, "squared", 1, chunk)  # the float32 attempt draws from the chunk's generator first
    assert skipped == []
    for j, m in enumerate(modules):
        one_down, one_up, k = real(down[j:j + 1].double(), up[j:j + 1].double(), 0.9, "squared", 1, chunk)
        assert ranks[j] == int(k[0])
        assert torch.allclose(m.down_matrix(), one_down[0].float(), atol=1e-6)
        assert torch.allclose(m.up_matrix(), one_up[0].float(), atol=1e-6)
    assert ("AC-LoRA RESTART: float32 decomposition failed for 2 module(s) (non-finite result); retrying one by one "
            "in float64") in caplog.text


def test_the_product_analysis_measures_each_component_against_its_layers_output_rms():
    """``analyse_modules`` from planted training records: module j's component i has importance
    s_i * RMS(v_i . x) / RMS(layer output), with s_i, v_i the SVD of its update alpha/r * up @ down (computed
    here in float64 from the explicit update) and the RMSs over the inputs and outputs recorded; a module with
    no records keeps its singular values as importances (measured False). Row statistics are the old lora_down's."""
    from aclora_ext.lora.module import ACLoRAModule

    g = torch.Generator().manual_seed(11)
    modules = [ACLoRAModule(f"lora_{i}", nn.Linear(10, 7), rank=4, alpha=2.0) for i in range(3)]
    with torch.no_grad():
        for m in modules:
            m.lora_down.weight.copy_(torch.randn(4, 10, generator=g))
            m.lora_up.weight.copy_(torch.randn(7, 4, generator=g))
    inputs = {m.lora_name: torch.randn(50 + 10 * i, 10, generator=g) for i, m in enumerate(modules[:2])}
    outputs = {"lora_0": (3.7, 35), "lora_1": (2.0 * 3.7, 70)}  # (sum of squares, entries): equal RMS, other counts
    stats = {}
    for name, x in inputs.items():
        h = x @ dict((m.lora_name, m) for m in modules)[name].lora_down.weight.detach().T
        out_sq, numel = outputs[name]
        stats[name] = analysis.InputStats(h.T @ h, x.shape[0], torch.tensor(out_sq), numel)
    spectra, skipped = analysis.analyse_modules(modules, stats, rebase=False)
    assert skipped == []
    for j, m in enumerate(modules):
        down, up = m.down_matrix().detach().double(), m.up_matrix().detach().double()
        _, s, vh = torch.linalg.svd(0.5 * up @ down)
        s = s[:4]
        sp = spectra[j]
        assert torch.allclose(sp.s.double(), s, rtol=1e-5)
        assert sp.row_sq == pytest.approx(float(down.pow(2).sum()) / 4, rel=1e-6)
        assert sp.std == pytest.approx(float(down.std()), rel=1e-5)
        if m.lora_name in inputs:
            x = inputs[m.lora_name].double()
            out_sq, numel = outputs[m.lora_name]
            expected = s * (x @ vh[:4].T).pow(2).mean(dim=0).sqrt() / math.sqrt(out_sq / numel)
            assert sp.measured and torch.allclose(sp.importance.double(), expected, rtol=1e-4)
        else:
            assert not sp.measured and torch.allclose(sp.importance.double(), s, rtol=1e-5)


def test_the_training_records_start_anew_after_a_restart():
    """``InputStats.reset`` (every RESTART, ``RankSearch.reset_stats``): the next importances come from the steps
    that follow only, so every sum and count is zero again (and a record without outputs stays without)."""
    stats = analysis.InputStats(torch.ones(3, 3), 5, torch.tensor(9.0), 12, 4)
    bare = analysis.InputStats(torch.ones(2, 2), 2)
    stats.reset()
    bare.reset()
    assert float(stats.gram.abs().sum()) == 0.0 and float(stats.out_sq) == 0.0
    assert (stats.count, stats.out_numel, stats.out_calls, stats.measured) == (0, 0, 0, False)
    assert bare.out_sq is None and float(bare.gram.abs().sum()) == 0.0 and bare.count == 0


def test_each_chunk_of_a_product_restart_draws_its_own_refill_noise(monkeypatch):
    """Two identical modules restarted in two chunks (one module each): their freed lora_down rows are refilled
    with different noise (one generator per chunk, each of its own seed), their kept slots alike."""
    from aclora_ext.lora.module import ACLoRAModule

    monkeypatch.setattr(F, "chunk_size", lambda *args, **kwargs: 1)
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g)
    modules = [ACLoRAModule(f"lora_{i}", nn.Linear(10, 7), rank=4, alpha=4.0) for i in range(2)]
    with torch.no_grad():
        for m in modules:
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
    keep = torch.tensor([True, True, False, False])
    new, skipped = analysis.restart_product(modules, {}, lambda spectra: {i: keep for i in spectra}, seed=0)
    assert skipped == [] and new == {0: 2, 1: 2}
    first, second = (m.down_matrix().detach() for m in modules)
    assert torch.allclose(first[:2], second[:2]) and torch.allclose(modules[0].up_matrix(), modules[1].up_matrix())
    assert not torch.allclose(first[2:], second[2:])  # the freed rows: noise of two generators


def test_a_product_restart_refills_the_same_noise_for_the_same_seed_whatever_the_global_generator():
    """The ``seed`` option makes a product-mode RESTART reproducible: the same factors and seed give bit-identical
    refills, however torch's global generator was left (the run's own draws never feed them)."""
    from aclora_ext.lora.module import ACLoRAModule

    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g)
    keep = torch.tensor([True, False, True, False])
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        m = ACLoRAModule("lora_0", nn.Linear(10, 7), rank=4, alpha=4.0)
        with torch.no_grad():
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
        analysis.restart_product([m], {}, lambda spectra: {i: keep for i in spectra}, seed=7)
        results.append((m.down_matrix().detach().clone(), m.up_matrix().detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
