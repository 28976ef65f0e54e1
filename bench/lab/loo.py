"""Leave-one-out estimates of a cut's generalisation effect (the gain-only quadratic model), as judges for Grow."""
import math, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
import lab


def group_stats(adapters, ctx, keeps, images):
    """Per training image i: the group gain gradient Gamma_i (d loss_i / d c at c=1, where c scales every component
    not in `keeps`) and the loss change of removing them, loss_i(c=0) - loss_i(c=1). Fixed-noise losses."""
    task = ctx["task"]
    c = torch.ones((), requires_grad=True)
    gam, drop = [], []
    for i in images:
        for a in adapters:
            k = keeps[a.name].float()
            a.step_mask = k + c * (a.mask - k)
        with torch.enable_grad():
            li = task.selection_loss([i]).mean()
            gi, = torch.autograd.grad(li, c)
        with torch.no_grad():
            for a in adapters:
                a.step_mask = keeps[a.name].float()
            l0 = task.selection_loss([i]).mean()
        gam.append(float(gi)); drop.append(float(l0 - li))
    for a in adapters:
        a.step_mask = None
    return torch.tensor(gam, dtype=torch.float64), torch.tensor(drop, dtype=torch.float64)


def loo_keep_effect(gam, drop):
    """Estimated LOO loss change (summed over images) of keeping the group rather than cutting it (>0: cut helps).

    Quadratic per-image model in the group gain c (current c = 1): L_i(c) = L_i(1) + G_i (c-1) + h/2 (c-1)^2 with a
    common per-image curvature h = H/n from the total drop B = sum(L_i(0) - L_i(1)) = -sum G + H/2."""
    n = len(gam)
    G = float(gam.sum()); B = float(drop.sum())
    H = max(2.0 * (B + G), 1e-30)
    h = H / n
    delta = -(G - gam) / (H - h)  # c_{-i} - 1
    keep = gam * delta + 0.5 * h * delta ** 2  # L_i(c_{-i}) - L_i(1)
    cut = -gam + 0.5 * h  # L_i(0) - L_i(1)
    return float((keep - cut).sum())


def loo_judge(adapters, ctx, imps, grow):
    images = ctx["train_ids"]
    best_level, best_val, info = math.inf, 0.0, {}
    seen = {}
    for level in lab.LEVELS[1:]:
        keeps = lab.level_keeps(imps, level, grow.min_rank)
        sig = tuple(int(k.sum()) for k in keeps.values())
        if sig in seen or all(bool((keeps[a.name] == a.mask.bool()).all()) for a in adapters):
            continue
        gam, drop = group_stats(adapters, ctx, keeps, images)
        e = loo_keep_effect(gam, drop)
        seen[sig] = e
        if e > best_val:
            best_level, best_val = level, e
    info["effects"] = {sum(k): round(v, 5) for k, v in seen.items()}
    return best_level, info


def direction_judge(iso="gain", scale=1.0):
    """Per-component LOO/TIC estimate with each component's direction fitted too (oracle: images known).

    For component j (after analyse: slot j of each adapter, b_j = B[:, j], a_j = A[j]): per-image gradients of the
    fixed-noise loss wrt a_j and b_j; the curvature along b_j and a_j is taken isotropic, from the curvature along
    the component's gain (second difference of the total training loss in c_j). Optimism
    O_j = sum_i |g_b,i - mean|^2 / h_b + sum_i |g_a,i - mean|^2 / h_a (TIC with the images as units), benefit
    B_j = L(without j) - L(with j) (summed over images). The level with the largest sum of O_j - B_j over the cut
    components is chosen (keep everything when none is positive)."""
    def judge(adapters, ctx, imps, grow):
        task = ctx["task"]
        images = list(ctx["train_ids"])
        # per-image gradients wrt every A, B
        grads = []
        for i in images:
            for a in adapters:
                a.A.grad = None; a.B.grad = None
            with torch.enable_grad():
                li = task.selection_loss([i]).mean()
                li.backward()
            grads.append({a.name: (a.A.grad.detach().clone(), a.B.grad.detach().clone()) for a in adapters})
        for a in adapters:
            a.A.grad = None; a.B.grad = None
        def total_loss():
            with torch.no_grad():
                return float(torch.stack([task.selection_loss([i]).mean() for i in images]).sum())
        base = total_loss()
        value = {}
        eps = 0.5
        for a in adapters:
            k = int(a.mask.sum())
            O = torch.zeros(a.rank, dtype=torch.float64); Bj = torch.zeros(a.rank, dtype=torch.float64)
            for j in range(k):
                m = a.mask.clone()
                m[j] = 0; a.step_mask = m; l0 = total_loss()
                m[j] = 1 + eps; a.step_mask = m; lp = total_loss()
                m[j] = 1 - eps; a.step_mask = m; lm = total_loss()
                a.step_mask = None
                H = max((lp + lm - 2 * base) / eps ** 2, 1e-30)
                gA = torch.stack([g[a.name][0][j] for g in grads]).double()
                gB = torch.stack([g[a.name][1][:, j] for g in grads]).double()
                vA = float((gA - gA.mean(0)).pow(2).sum()); vB = float((gB - gB.mean(0)).pow(2).sum())
                na = float(a.A[j].double().pow(2).sum()); nb = float(a.B[:, j].double().pow(2).sum())
                O[j] = scale * (vA * na + vB * nb) / H
                Bj[j] = l0 - base
            value[a.name] = (O - Bj)
        best_level, best_val, effects = math.inf, 0.0, {}
        for level in lab.LEVELS[1:]:
            keeps = lab.level_keeps(imps, level, grow.min_rank)
            v = sum(float(value[a.name][(~keeps[a.name]) & a.mask.bool()].sum()) for a in adapters)
            effects[sum(int(k.sum()) for k in keeps.values())] = round(v, 5)
            if v > best_val:
                best_level, best_val = level, v
        return best_level, {"effects": effects}
    return judge
