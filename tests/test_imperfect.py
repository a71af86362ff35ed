"""tgtfast.imperfect: the teacher-reliability estimate, weighted distillation, SLaM and robust active selection,
each against an independent computation (scikit-learn's isotonic regression, hand-written formulas, the eager
reference, the linear programme solved by scipy and its closed form) and on synthetic teachers where the right answer is known."""

import math

import numpy as np
import pytest
import torch

import tgtfast
from tgtfast import imperfect as I
from tgtfast import reference as R


# ----------------------------------------------------------------------------------------------- synthetic teachers
def teacher_with_margin_curve(n, classes=5, seed=0, curve=lambda m: 0.3 + 0.7 * m):
    """Teacher logits whose top-1 margin is spread over [0, 1], and labels that equal the teacher's top class
    with probability ``curve(margin)`` (else another class at random): the true accuracy curve is ``curve``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    top = p.topk(2, -1)
    margin = top.values[:, 0] - top.values[:, 1]
    right = torch.rand(n, generator=g, dtype=torch.float64) < curve(margin)
    other = (top.indices[:, 0] + torch.randint(1, classes, (n,), generator=g)) % classes
    labels = torch.where(right, top.indices[:, 0], other)
    return logits, labels, margin, right


# ----------------------------------------------------------------------------------------------- reliability
def test_isotonic_curve_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(0)
    x = np.round(rng.random(400), 2)  # ties
    y = (rng.random(400) < x**2).astype(np.float64)
    curve = I.MonotoneCurve.fit(x, y, method="isotonic")
    iso = sklearn.IsotonicRegression(out_of_bounds="clip").fit(x, y)
    new = np.concatenate([rng.random(200) * 1.4 - 0.2, x[:50]])
    got = curve(torch.from_numpy(new)).numpy()
    np.testing.assert_allclose(got, iso.predict(new), rtol=0, atol=1e-12)
    assert np.all(np.diff(curve(torch.linspace(-1, 2, 300, dtype=torch.float64)).numpy()) >= 0)


@pytest.mark.parametrize("method", ["isotonic", "binned"])
def test_reliability_recovers_the_true_accuracy_curve(method):
    logits, labels, _, _ = teacher_with_margin_curve(6000, seed=1)
    rel = I.TeacherReliability.fit(logits, labels, method=method, score="margin", bins=10)
    test_logits, _, margin, _ = teacher_with_margin_curve(2000, seed=2)
    alpha = rel.accuracy(test_logits).double()
    truth = 0.3 + 0.7 * margin
    inner = (margin > 0.1) & (margin < 0.9)  # away from the ends, where a monotone fit is biased by clipping
    assert (alpha - truth)[inner].abs().max() < 0.12
    assert (alpha - truth).abs().mean() < 0.04
    order = margin.argsort()
    assert torch.all(alpha[order].diff() >= 0)  # monotone in the margin
    assert rel.num_examples == 6000


def test_teacher_wrong_exactly_where_uncertain_gives_a_step():
    logits, _, margin, _ = teacher_with_margin_curve(3000, seed=3)
    top = logits.argmax(-1)
    labels = torch.where(margin > 0.4, top, (top + 1) % 5)  # wrong exactly below a margin of 0.4
    rel = I.TeacherReliability.fit(logits, labels, method="isotonic")
    alpha = rel.accuracy(logits).double()
    assert alpha[margin < 0.35].max() < 0.05 and alpha[margin > 0.45].min() > 0.95
    weights = I.debiasing_weights(logits, rel).double()
    wrong = labels != top
    # unweighted, 1 in 2.5 labels is wrong; weighted, the wrong ones carry almost nothing
    assert weights[wrong].sum() / weights.sum() < 0.02 < wrong.double().mean()


def _ece_by_hand(conf, correct, bins):
    # tgtfast.metrics' bins: (b / B, (b + 1) / B], bin 0 also holding a confidence of 0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi or (b == 0 and conf[i] == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


def test_ece_against_a_hand_computation_and_calibrated_vs_overconfident():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1500, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)  # calibrated by construction
    rel = I.TeacherReliability.fit(logits, labels, bins=10)
    p = torch.softmax(logits, -1)
    conf = p.amax(-1).tolist()
    correct = (p.argmax(-1) == labels).tolist()
    assert rel.ece == pytest.approx(_ece_by_hand(conf, correct, 10), abs=1e-12)
    assert rel.ece < 0.05
    overconfident = I.TeacherReliability.fit(logits * 4, labels, bins=10)  # same ranking, sharper probabilities
    assert overconfident.ece > 0.1


def test_slam_k_is_the_smallest_k_covering_the_true_class():
    logits, _, margin, _ = teacher_with_margin_curve(3000, classes=6, seed=5)
    ranks = logits.argsort(-1, descending=True)
    g = torch.Generator().manual_seed(6)
    pick = torch.randint(0, 3, (3000,), generator=g)
    low = margin < 0.5
    # uncertain rows: the true class is uniform over the teacher's top 3; confident rows: the teacher's top 2
    labels = torch.where(low, ranks.gather(1, pick.unsqueeze(1)).squeeze(1),
                         ranks.gather(1, (pick % 2).unsqueeze(1)).squeeze(1))
    rel = I.TeacherReliability.fit(logits, labels, coverage=0.9, max_k=5)
    k = rel.k(logits)
    assert k.dtype == torch.int64
    assert torch.all(k[margin < 0.4] == 3) and torch.all(k[margin > 0.6] == 2)
    top3 = rel.topk_accuracy(logits, 3)
    assert top3.min() > 0.95


def test_reliability_bad_input():
    logits, labels, _, _ = teacher_with_margin_curve(100, seed=7)
    with pytest.raises(ValueError, match=r"needs at least 250 labelled examples .*got 100.*bins=4"):
        I.TeacherReliability.fit(logits, labels, bins=10)
    with pytest.raises(ValueError, match=r"needs at least 50 labelled examples .*got 10"):
        I.TeacherReliability.fit(logits[:10], labels[:10], bins=2)
    I.TeacherReliability.fit(logits, labels, bins=4)  # 25 per bin: enough
    bad = logits.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits must not contain NaN"):
        I.TeacherReliability.fit(bad, labels, bins=2)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        I.TeacherReliability.fit(logits, torch.where(labels == 0, 7, labels), bins=2)
    with pytest.raises(ValueError, match="labels shape"):
        I.TeacherReliability.fit(logits, labels[:50], bins=2)
    with pytest.raises(ValueError, match="method must be one of"):
        I.TeacherReliability.fit(logits, labels, bins=2, method="platt")
    ignored = labels.clone()
    ignored[:60] = -100  # 40 rows left: too few for 2 bins
    with pytest.raises(ValueError, match="got 40"):
        I.TeacherReliability.fit(logits, ignored, bins=2)


# ----------------------------------------------------------------------------------------------- weighted
def test_weighted_loss_is_distill_loss_with_alpha_weights():
    logits, labels, _, _ = teacher_with_margin_curve(500, seed=8)
    rel = I.TeacherReliability.fit(logits, labels, bins=4)
    g = torch.Generator().manual_seed(9)
    s = torch.randn(500, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = rel.accuracy(logits).double()
    got = I.weighted_distill_loss(s, logits, rel, "jsd", beta=0.3, temperature=2.0)
    want = R.distill_loss(s, logits, "jsd", param_a=0.3, temperature=2.0, weight=w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # alpha is float32
    module = I.WeightedDistillLoss(rel, "jsd", beta=0.3, temperature=2.0)
    torch.testing.assert_close(module(s, logits), got)
    norm = I.weighted_distill_loss(s, logits, rel, "jsd", beta=0.3, temperature=2.0, normalize=True)
    torch.testing.assert_close(norm, got / w.mean(), rtol=1e-6, atol=1e-9)
    with pytest.raises(TypeError, match="reliability must be a TeacherReliability"):
        I.weighted_distill_loss(s, logits, object())


def test_weighted_loss_estimates_the_loss_on_correct_labels():
    """Debiasing: on fresh data, mean(w l) estimates mean(1{teacher right} l), unweighted mean(l) does not."""
    logits, labels, _, _ = teacher_with_margin_curve(6000, seed=10)
    rel = I.TeacherReliability.fit(logits, labels)
    fresh, fresh_labels, _, right = teacher_with_margin_curve(20000, seed=11)
    g = torch.Generator().manual_seed(12)
    student = fresh + torch.randn(fresh.shape, generator=g, dtype=torch.float64)
    rows = tgtfast.distill_loss(student, fresh, reduction="none")
    w = I.debiasing_weights(fresh, rel).double()
    on_correct = (rows * right).mean()
    assert abs((rows * w).mean() / on_correct - 1) < 0.05
    assert rows.mean() / on_correct - 1 > 0.2
    wrong_share = 1 - right.double().mean()
    assert (w * ~right).sum() / w.sum() < 0.85 * wrong_share  # less effective weight on the wrong labels (0.23 vs 0.30)


# ----------------------------------------------------------------------------------------------- SLaM
def test_slam_hand_computed():
    """f = (0.5, 0.3, 0.2), teacher y = (0.7, 0.2, 0.1), alpha = 0.8, k = 2: top = {0, 1}, (1 - alpha)/(k - 1) = 0.2,
    mix = (0.8*0.5 + 0.2*0.5, 0.8*0.3 + 0.2*0.7, 0.8*0.2) = (0.5, 0.38, 0.16)."""
    s = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    t = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64).log()
    want = -(0.7 * math.log(0.5) + 0.2 * math.log(0.38) + 0.1 * math.log(0.16))
    assert float(I.slam_loss(s, t, 0.8, 2)) == pytest.approx(want, rel=1e-12)
    # unnormalised (Remark B.1) with k = 3: mix = 0.8 f + 0.2 (1 - f) on every class
    want3 = -sum(y * math.log(0.8 * f + 0.2 * (1 - f)) for y, f in zip((0.7, 0.2, 0.1), (0.5, 0.3, 0.2)))
    assert float(I.slam_loss(s, t, 0.8, 3, normalize=False)) == pytest.approx(want3, rel=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_slam_matches_reference_float64(normalize, reduction):
    g = torch.Generator().manual_seed(13)
    n, v = 7, 9
    s = (2 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    alpha = torch.rand(n, generator=g, dtype=torch.float64)
    k = torch.randint(2, v + 1, (n,), generator=g)
    got = I.slam_loss(s, t, alpha, k, temperature=1.5, normalize=normalize, reduction=reduction)
    want = R.slam_loss(s, t, alpha, k, temperature=1.5, normalize=normalize, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    up = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    torch.testing.assert_close(torch.autograd.grad((got * up).sum(), s)[0],
                               torch.autograd.grad((want * up).sum(), s)[0], rtol=1e-9, atol=1e-12)
    # float32 against the float64 reference
    got32 = I.slam_loss(s.detach().float(), t.float(), alpha.float(), k, temperature=1.5, normalize=normalize,
                        reduction=reduction)
    torch.testing.assert_close(got32.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_slam_expected_loss_is_minimised_at_the_true_distribution():
    """The paper's noise model: the teacher's label is the true class with probability alpha, else uniform over
    the other classes of its top k. The expected label is mix(p*), so the soft teacher mix(p*) gives the expected
    loss; SLaM's minimiser is p*, plain cross-entropy's is the noisy mix(p*)."""
    alpha, k, v = 0.6, 3, 5
    p_star = torch.tensor([0.55, 0.3, 0.15, 0.0, 0.0], dtype=torch.float64)
    top = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    noisy = alpha * p_star + (1 - alpha) * (1 - p_star) * top / (k - 1)
    assert noisy.sum() == pytest.approx(1.0)
    teacher = noisy.log().unsqueeze(0)  # -inf outside the top 3: no teacher probability there
    z = torch.zeros(1, v, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = I.slam_loss(z, teacher, alpha, k)
        loss.backward()
        return loss

    opt.step(closure)
    f = torch.softmax(z.detach(), -1).squeeze(0)
    torch.testing.assert_close(f[:3], p_star[:3], atol=2e-3, rtol=0)
    assert f[3:].sum() < 1e-3
    assert (noisy - p_star).abs().max() > 0.1  # what plain distillation would converge to instead


def test_slam_module_reads_the_reliability():
    logits, labels, _, _ = teacher_with_margin_curve(500, seed=14)
    rel = I.TeacherReliability.fit(logits, labels, bins=4, max_k=4)
    s = torch.randn(500, 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    got = I.SLaMLoss(rel)(s, logits)
    want = R.slam_loss(s, logits, rel.accuracy(logits).double(), rel.k(logits))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(I.SLaMLoss()(s, logits, alpha=0.7, k=2), R.slam_loss(s, logits, 0.7, 2))
    with pytest.raises(ValueError, match="needs alpha"):
        I.SLaMLoss()(s, logits)


def test_slam_extreme_alpha_stays_finite():
    s = torch.randn(4, 6, generator=torch.Generator().manual_seed(16), requires_grad=True)
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(17))
    for alpha in (0.0, 1.0):
        loss = I.slam_loss(s, t, alpha, 2)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # alpha = 1 is plain cross-entropy to the teacher's soft label
    ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(I.slam_loss(s, t, 1.0, 3), ce)


def test_slam_bad_input():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        I.slam_loss(s, t, 1.5, 2)
    with pytest.raises(ValueError, match=r"k must be in \[2, 4\]"):
        I.slam_loss(s, t, 0.5, 1)
    with pytest.raises(ValueError, match=r"k must be in \[2, 4\]"):
        I.slam_loss(s, t, 0.5, torch.tensor([2, 5, 3]))
    with pytest.raises(ValueError, match="one value per row"):
        I.slam_loss(s, t, torch.rand(2), 2)
    with pytest.raises(TypeError, match="k must be an int"):
        I.slam_loss(s, t, 0.5, torch.tensor([2.0, 2.0, 2.0]))
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits must not contain NaN"):
        I.slam_loss(s, bad, 0.5, 2)
    with pytest.raises(ValueError, match="shape"):
        I.slam_loss(s, torch.randn(3, 5), 0.5, 2)


# ----------------------------------------------------------------------------------------------- active selection
def _worst_case(pi, g, q):
    """The adversary's best reply, by hand: in each group of equal q, spoil the largest pi*g first."""
    total = 0.0
    for value in np.unique(q):
        members = q == value
        budget = float((1 - q[members]).sum())
        for a in sorted((pi * g)[members], reverse=True):
            take = min(1.0, budget)
            total += a * (1 - take)
            budget -= take
    return total


def test_single_group_budget_one_is_the_closed_form():
    """Only the accuracy known (one group), one query: the optimum puts pi_i proportional to 1/g_i on the top-m
    points, m maximising (m - k) / sum_{i <= m} 1/g_i, with k the expected number of mistakes."""
    g = torch.tensor([0.9, 0.8, 0.75, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    acc = 0.7
    k = len(g) * (1 - acc)
    gs = sorted(g.tolist(), reverse=True)
    best = max((m - k) / sum(1 / x for x in gs[:m]) for m in range(1, len(gs) + 1))
    pi = I.robust_query_probabilities(g, acc, 1).numpy()
    assert _worst_case(pi, g.numpy(), np.full(7, acc)) == pytest.approx(best, abs=1e-7)
    support = pi > 1e-9
    np.testing.assert_allclose((pi * g.numpy())[support], (pi * g.numpy())[support][0], rtol=1e-6)
    assert not support[-1] and support[0]  # the least informative points are left out


def test_robust_probabilities_beat_random_feasible_ones():
    rng = np.random.default_rng(18)
    g = rng.random(30)
    q = np.repeat([0.9, 0.6, 0.3], 10)
    pi = I.robust_query_probabilities(torch.from_numpy(g), torch.from_numpy(q), 6).numpy()
    assert pi.sum() == pytest.approx(6) and pi.min() >= 0 and pi.max() <= 1
    value = _worst_case(pi, g, q)
    for _ in range(300):
        r = rng.random(30) ** 3
        r = r / r.sum() * 6
        if r.max() <= 1:
            assert _worst_case(r, g, q) <= value + 1e-7
    assert pi[:10].sum() > pi[20:].sum()  # the group the teacher labels best gets more queries


def test_fast_solver_reaches_the_linear_programme_s_value():
    """The bisection on the budget's price against the game solved as one LP (scipy's HiGHS): one group, level
    sets, one point per group, ties and zero informativeness; the same worst-case value, a feasible pi."""
    pytest.importorskip("scipy")
    from tgtfast.imperfect import active as A

    rng = np.random.default_rng(5)
    for trial in range(120):
        n = int(rng.integers(2, 30))
        g = rng.random(n) * (3.0 if trial % 2 else 1.0)
        if trial % 5 == 0:
            g = np.round(g, 1)  # ties
        if trial % 7 == 0:
            g[rng.random(n) < 0.3] = 0.0
        if g.max() == 0:
            continue
        kind = trial % 3
        q = np.full(n, rng.random()) if kind == 0 else (np.round(rng.random(n) * 3) / 3 if kind == 1
                                                       else rng.random(n))
        budget = int(rng.integers(1, n))
        fast, lp = A._max_min_probabilities(g, q, budget), A._lp_probabilities(g, q, budget)
        assert fast.sum() == pytest.approx(budget, abs=1e-9) and fast.min() >= -1e-12 and fast.max() <= 1 + 1e-12
        assert _worst_case(fast, g, q) == pytest.approx(_worst_case(lp, g, q), rel=1e-9, abs=1e-12)


def test_distinct_correctness_takes_the_best_expected_gain():
    g = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    q = torch.tensor([0.2, 0.9, 0.95, 0.3, 0.99, 0.5], dtype=torch.float64)
    chosen = I.select_queries(g, q, 3, generator=torch.Generator().manual_seed(0))
    want = torch.argsort(g * q, descending=True)[:3].sort().values
    assert torch.equal(chosen, want)


def test_select_queries_draws_with_the_inclusion_probabilities():
    g = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.6, 0.4, 0.2, 0.1], dtype=torch.float64)
    from tgtfast.imperfect.active import _systematic  # the draw select_queries makes from these probabilities

    pi = I.robust_query_probabilities(g, 0.75, 3)
    gen = torch.Generator().manual_seed(19)
    idx = I.select_queries(g, 0.75, 3, generator=gen)
    assert idx.numel() == 3 and idx.unique().numel() == 3
    counts = torch.zeros(8, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        idx = _systematic(pi.numpy(), 3, gen)
        assert idx.numel() == 3 and idx.unique().numel() == 3
        counts[idx] += 1
    torch.testing.assert_close(counts / draws, pi, atol=0.03, rtol=0)


def test_selection_prefers_informative_and_correct_points():
    informative = torch.tensor([0.9] * 20 + [0.1] * 20, dtype=torch.float64)
    correct = torch.tensor(([0.95] * 10 + [0.4] * 10) * 2, dtype=torch.float64)
    pi = I.robust_query_probabilities(informative, correct, 8)
    both, info_only, corr_only, neither = pi[:10].sum(), pi[10:20].sum(), pi[20:30].sum(), pi[30:].sum()
    assert both > info_only and both > corr_only and both > neither
    assert pi.sum() == pytest.approx(8)


def test_budget_errors():
    g = torch.rand(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"budget=6 is larger than the 5 candidate points"):
        I.select_queries(g, 0.9, 6)
    with pytest.raises(ValueError, match="correctness_prob must be in"):
        I.select_queries(g, 1.5, 2)
    with pytest.raises(ValueError, match="student_scores must be finite and non-negative"):
        I.select_queries(-g, 0.9, 2)
    sel = I.RobustActiveSelector(budget=10, rounds=2)
    with pytest.raises(ValueError, match="budget=10 is larger than the pool of 5"):
        sel.select_from_pool(g, 0.9)


def test_selector_rounds_over_a_fixed_pool():
    gen = torch.Generator().manual_seed(20)
    pool_logits = torch.randn(60, 4, generator=gen)
    sel = I.RobustActiveSelector(budget=10, rounds=3, generator=gen)
    chosen = []
    while not sel.done:
        info = I.student_informativeness(pool_logits)
        chosen.append(sel.select_from_pool(info, lambda logits: torch.full((logits.shape[0],), 0.8),
                                           student_logits=pool_logits))
    assert [c.numel() for c in chosen] == [3, 3, 4]
    every = torch.cat(chosen)
    assert every.unique().numel() == 10 and every.max() < 60
    with pytest.raises(RuntimeError, match="all 3 rounds"):
        sel.select_from_pool(info, 0.8)


def test_selector_over_generated_candidates():
    gen = torch.Generator().manual_seed(21)
    sel = I.RobustActiveSelector(budget=6, rounds=2, generator=gen)

    def propose(n):
        return torch.randn(n, 3, generator=gen)

    def score(x):
        return I.student_informativeness(x), 0.9

    picked = sel.select_generated(propose, score, 20)
    assert picked.shape == (3, 3)
    with pytest.raises(ValueError, match="only num_candidates=2"):
        sel.select_generated(propose, score, 2)


def test_student_informativeness_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(I.student_informativeness(logits), 1 - (p[:, 0] - p[:, 1]))
    ent = -(p * p.log()).sum(-1) / math.log(3)
    torch.testing.assert_close(I.student_informativeness(logits, kind="entropy"), ent)
    torch.testing.assert_close(I.student_informativeness(logits, kind="least_confidence"), 1 - p.amax(-1))
