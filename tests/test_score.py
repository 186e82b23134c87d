"""Properties of the tasks-2.0.0 score under hypothesis-generated curves: DESIGN's formula, written out again here
independently of `tradellm.tasks`, matched to 1e-12; each part in [0, 1]; doing nothing exactly 0.50 + 0.15 clip(0.5 - R_B
/ 0.1); and an agent that loses money (R < 0, mean daily return <= 0) below doing nothing on the same episode."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from tradellm.tasks import TASKS, score_episode


def design_score(E, B, a):
    "DESIGN.md, 'Score (tasks 2.0.0)', line by line, in plain Python."
    r = [E[t] / E[t - 1] - 1 for t in range(1, len(E))]
    b = [B[t] / B[t - 1] - 1 for t in range(1, len(B))]

    def sd(x):
        if len(x) < 2: return 0.0
        m = sum(x) / len(x)
        return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))

    clip = lambda x: min(1.0, max(0.0, x))
    R, R_B = E[-1] / E[0] - 1, B[-1] / B[0] - 1
    A = math.sqrt(252) * (sum(r) / len(r)) / max(sd(r), sd(b), 0.005) if r else 0.0
    peak, mdd = E[0], 0.0
    for e in E:
        peak = max(peak, e)
        mdd = max(mdd, (peak - e) / peak)
    parts = dict(risk=clip(0.5 + A / (2 * a)), pnl=clip(0.5 + R / 0.2), drawdown=1 - clip(mdd / 0.2),
                 alpha=clip(0.5 + (R - R_B) / 0.1))
    return 0.40 * parts['risk'] + 0.30 * parts['pnl'] + 0.15 * parts['drawdown'] + 0.15 * parts['alpha'], parts


daily = st.floats(-0.15, 0.15, allow_nan=False)


@st.composite
def episodes(draw, min_days=1, max_days=40):
    "An equity curve and a buy-and-hold curve over the same closes, from the capital, with daily moves up to 15%."
    n = draw(st.integers(min_days, max_days))
    capital = draw(st.sampled_from([100_000.0, 200_000.0, 500_000.0]))
    r = draw(st.lists(daily | st.just(0.0), min_size=n, max_size=n))
    b = draw(st.lists(daily, min_size=n, max_size=n))
    E, B = [capital], [capital]
    for x, y in zip(r, b):
        E.append(E[-1] * (1 + x)); B.append(B[-1] * (1 + y))
    return E, B


@settings(max_examples=500, deadline=None)
@given(ep=episodes(), task=st.sampled_from(list(TASKS)))
def test_score_is_the_design_formula(ep, task):
    E, B = ep
    want, parts = design_score(E, B, TASKS[task].risk_scale)
    got = score_episode(E, B, task)
    assert got['score'] == pytest.approx(want, abs=1e-12)
    for k, v in parts.items():
        assert got[f'{k}_score'] == pytest.approx(v, abs=1e-12)
        assert 0.0 <= got[f'{k}_score'] <= 1.0
    assert 0.0 <= got['score'] <= 1.0


@settings(max_examples=300, deadline=None)
@given(ep=episodes(), task=st.sampled_from(list(TASKS)))
def test_doing_nothing_scores_its_formula(ep, task):
    _, B = ep
    cash = [B[0]] * len(B)
    R_B = B[-1] / B[0] - 1
    assert score_episode(cash, B, task)['score'] == pytest.approx(0.50 + 0.15 * min(1, max(0, 0.5 - R_B / 0.1)), abs=1e-12)


@settings(max_examples=500, deadline=None)
@given(ep=episodes(min_days=2), task=st.sampled_from(list(TASKS)))
def test_losing_money_scores_below_doing_nothing(ep, task):
    E, B = ep
    R = E[-1] / E[0] - 1
    assume(R < -1e-9 and np.mean(np.diff(E) / np.array(E[:-1])) <= 0)
    assert score_episode(E, B, task)['score'] < score_episode([E[0]] * len(E), B, task)['score']


def test_hand_computed_episode():
    "03_tasks' worked example, part by part: E 100 110 99 121 121 beside B 100 102 101 104 105 on easy."
    s = score_episode([100., 110., 99., 121., 121.], [100., 102., 101., 104., 105.], 'easy', trades=2)
    A = math.sqrt(252) * (0.1 - 0.1 + 22 / 99) / 4 / np.std([0.1, -0.1, 22 / 99, 0.0], ddof=1)
    assert s['risk_adjusted_return'] == pytest.approx(A, abs=1e-12)
    assert (s['pnl_score'], s['drawdown_score'], s['alpha_score']) == pytest.approx((1.0, 0.5, 1.0), abs=1e-12)
    assert s['score'] == pytest.approx(0.4 * min(1, 0.5 + A / (2 * TASKS['easy'].risk_scale)) + 0.3 + 0.075 + 0.15, abs=1e-12)
