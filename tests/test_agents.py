"""Agents: the rule agents' decisions (hypothesis over random views), sizes, limits, seeding, and `make_agent`."""
import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tradellm.agents import (Agent, BASELINES, BuyAndHoldAgent, DEFAULT_TEACHERS, DoNothingAgent, EMATrendAgent, MACDAgent,
                             MomentumAgent, RSI_RULES, RSIAgent, RandomAgent, TEACHER_RULES, TaskTeachers, make_agent, teacher_spec)
from tradellm.env import MARKET_FEATURES, MarketView, TradingEnv
from tradellm.market import parse_action

RSI, TREND, CLOSE = (MARKET_FEATURES.index(f) for f in ('rsi', 'trend', 'close'))


def make_view(close, rsi, trend, shares, avg_cost, cash, buy_blocked=False):
    n = len(close)
    m = np.zeros((n, len(MARKET_FEATURES)))
    m[:, CLOSE], m[:, RSI], m[:, TREND] = close, rsi, trend
    shares = np.asarray(shares, dtype=np.int64)
    equity = cash + float(shares @ np.asarray(close, float))
    return MarketView(0, 30, '2024-07-01', tuple(f'S{i}' for i in range(n)), m, [[]] * n, shares,
                      np.asarray(avg_cost, float), float(cash), equity, 200_000.0, buy_blocked)


def play(agent, envs, seeds):
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    agent.reset(envs)
    infos = []
    for _ in range(envs[0].task.days):
        acts = agent.act(envs, obs)
        assert len(acts) == len(envs) and all(isinstance(a, str) for a in acts)
        steps = [env.step(a) for env, a in zip(envs, acts)]
        obs = [s[0] for s in steps]
        infos.append([s[4] for s in steps])
    return infos


@st.composite
def views(draw):
    n = draw(st.integers(1, 12))
    close = draw(st.lists(st.floats(1, 5_000), min_size=n, max_size=n))
    rsi = draw(st.lists(st.floats(0, 100) | st.just(float('nan')), min_size=n, max_size=n))
    trend = draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))
    held = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    shares = [draw(st.integers(1, 500)) if h else 0 for h in held]
    avg = [c * draw(st.floats(0.9, 1.1)) if h else 0.0 for c, h in zip(close, held)]
    cash = draw(st.floats(0, 300_000))
    return make_view(close, rsi, trend, shares, avg, cash, draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(views(), st.sampled_from([0.15, 0.3, 1.0]), st.integers(1, 10))
def test_rsi_decisions_follow_the_rules(view, cap, limit):
    agent = RSIAgent()
    text, decisions = agent.decide(view, max_position=cap, max_trades=limit)
    assert [d['symbol'] for d in decisions] == list(view.symbols)
    for i, d in enumerate(decisions):
        assert d['rule'] in RSI_RULES
        rsi, trend, pnl, held = view.feature('rsi', i), view.feature('trend', i), view.feature('pnl_pct', i), view.shares[i] > 0
        if d['decision'] == 'SELL':
            assert held and d['rule'] in ('take_profit', 'stop_loss', 'rsi_overbought')
            assert pnl >= 3 or pnl <= -3 or rsi > 65
        if d['decision'] == 'BUY':
            assert not held and rsi < 35 and trend >= 0 and not view.buy_blocked and 0 < d['fraction'] <= 1
        if held and d['decision'] == 'HOLD': assert d['rule'] in ('hold_position', 'trade_limit')
        if not held and d['rule'] == 'no_signal': assert not rsi < 35
        if d['rule'] == 'bearish_trend_veto': assert rsi < 35 and trend < 0
    parsed = parse_action(text, view.symbols)
    assert parsed.format_ok
    acted = [d for d in decisions if d['decision'] != 'HOLD']
    assert len(parsed.orders) == len(acted) <= limit
    sides = [o.side for o in parsed.orders]
    assert sides == sorted(sides, key=lambda s: s != 'SELL')  # sells first
    # buys never ask for more than an equal share of the cash or the cap: simulate the fills at the close
    cash, m = view.cash, int((view.shares == 0).sum())
    for o in parsed.orders:
        if o.side == 'BUY':
            spend = o.fraction * cash
            # (fractions are rounded down to 4 decimals, so a later buy may see up to 1e-4 of the cash more)
            assert spend <= min(view.cash / m, cap * view.equity) + 1e-4 * view.cash * len(parsed.orders) + 1e-9
            cash -= spend


def test_rsi_sizes_by_hand():
    # 3 stocks not held, 90,000 cash: 30,000 each; all oversold in an uptrend; the cheapest RSI first
    v = make_view([100, 100, 100], [30, 20, 25], [1, 1, 1], [0, 0, 0], [0, 0, 0], 90_000)
    text, _ = RSIAgent().decide(v)
    assert text == 'BUY S1 0.3333; BUY S2 0.5; BUY S0 1'
    # a cap of 15% of equity (13,500) binds: 13,500 of 90,000, then of 76,500, then of 63,000
    text, _ = RSIAgent().decide(v, max_position=0.15)
    assert text == f"BUY S1 0.15; BUY S2 {math.floor(13_500 / 76_500 * 1e4) / 1e4:g}; BUY S0 {math.floor(13_500 / 63_000 * 1e4) / 1e4:g}"


def test_rsi_thresholds_are_parameters():
    v = make_view([100], [40], [1], [0], [0], 10_000)
    assert RSIAgent().decide(v)[0] == 'HOLD'
    assert RSIAgent(buy_below=45).decide(v)[0] == 'BUY S0 1'
    held = make_view([102], [50], [1], [10], [100], 0)
    assert RSIAgent().decide(held)[1][0]['rule'] == 'hold_position'
    assert RSIAgent(take_profit=1.5).decide(held)[1][0]['rule'] == 'take_profit'
    assert RSIAgent(take_profit=1.5).config()['take_profit'] == 1.5


def test_rsi_agent_on_episodes_never_breaks_the_limits(synth_panel):
    envs = [TradingEnv('hard', 'test', data=synth_panel) for _ in range(3)]
    agent = RSIAgent()
    for day in play(agent, envs, [0, 1, 2]):
        for info in day:
            assert len(info['orders']) <= 5
            assert not [o for o in info['orders'] if 'limit' in o['reason'] or 'regime' in o['reason']]
    assert len(agent.last_decisions) == 3 and len(agent.last_decisions[0]) == 25


def test_do_nothing_scores_cash(synth_panel):
    envs = [TradingEnv(t, 'test', data=synth_panel) for t in ('easy', 'medium', 'hard')]
    for env in envs:
        infos = play(DoNothingAgent(), [env], [5])
        m = infos[-1][0]['metrics']
        assert (m['total_return'], m['risk_score'], m['trades']) == (0, 0.5, 0)
        assert infos[-1][0]['score'] == pytest.approx(0.5 + 0.15 * min(1, max(0, 0.5 - m['buy_and_hold_return'] / 0.1)), abs=1e-12)


@pytest.mark.parametrize('task', ['easy', 'medium', 'hard'])
def test_buy_and_hold_invests_everything_equally_within_the_rules(synth_panel, task):
    envs = [TradingEnv(task, 'test', data=synth_panel) for _ in range(2)]
    infos = play(BuyAndHoldAgent(), envs, [3, 4])
    for j, env in enumerate(envs):
        t = env.task
        assert (env.pf.shares > 0).all()
        assert env.pf.cash < 0.005 * t.capital
        fills = [f for d, f in env.pf.fills]
        assert all(f.status == 'filled' for f in fills), [f for f in fills if f.status != 'filled']
        assert len(fills) == t.n_stocks
        buy_days = sorted({d for d, f in env.pf.fills})
        blocked = sum(day[j]['buy_blocked'] for day in infos[:len(buy_days) + 5])
        assert len(buy_days) == math.ceil(t.n_stocks / t.max_trades) or blocked
        if len(buy_days) == 1:  # bought on one day at one set of prices: equal money in each stock
            spent = np.array([f.shares * f.price for f in fills])
            assert np.allclose(spent, spent.mean(), rtol=0.03)
        assert all(day[j]['orders'] == [] for day in infos[len(buy_days) + 5:])  # then it holds


def test_buy_and_hold_waits_while_the_gate_is_shut():
    agent = BuyAndHoldAgent()
    env = types.SimpleNamespace(symbols=('A', 'B'), task=types.SimpleNamespace(max_trades=5),
                                view=types.SimpleNamespace(buy_blocked=True))
    agent.reset([env])
    assert agent.act([env], [None]) == ['HOLD']
    env.view.buy_blocked = False
    assert agent.act([env], [None]) == ['BUY A 0.5; BUY B 1']
    assert agent.act([env], [None]) == ['HOLD']


def test_random_agent_is_seeded_per_episode(synth_panel):
    envs = [TradingEnv('medium', 'test', data=synth_panel) for _ in range(3)]
    play(RandomAgent(seed=3), envs, [7, 8, 9])
    first = [list(e.actions) for e in envs]
    play(RandomAgent(seed=3), envs[:2], [9, 7])
    assert [list(e.actions) for e in envs[:2]] == [first[2], first[0]]
    play(RandomAgent(seed=4), envs[:1], [7])
    assert list(envs[0].actions) != first[0]
    acts = [a for a in first[0] if a != 'HOLD']
    assert 0 < len(acts) < 30
    for a in acts:
        side, sym, frac = a.split()
        assert side in ('BUY', 'SELL') and sym in envs[2].symbols or True
        assert float(frac) in RandomAgent.fractions
    play(RandomAgent(seed=3, p_hold=1.0), envs[:1], [7])
    assert set(envs[0].actions) == {'HOLD'}


def test_random_agent_reads_only_what_a_remote_env_offers(synth_panel):
    "No `pf`: holdings come from the public `view`, the seed from the last reset's; the trades are those of the env itself."
    class ViewOnly:  # the parts of an env that `RemoteTradingEnv` has too
        def __init__(self, env): self.env, self.task = env, env.task
        def reset(self, seed): self.episode_seed = seed; return self.env.reset(seed=seed)
        def step(self, a): return self.env.step(a)
        symbols = property(lambda self: self.env.symbols)
        view = property(lambda self: self.env.view)
        actions = property(lambda self: self.env.actions)
    envs = [TradingEnv('medium', 'test', data=synth_panel) for _ in range(2)]
    play(RandomAgent(seed=3), envs, [7, 8])
    direct = [list(e.actions) for e in envs]
    play(RandomAgent(seed=3), [ViewOnly(e) for e in envs], [7, 8])
    assert [list(e.actions) for e in envs] == direct
    assert any(a.startswith('SELL') for a in direct[0])  # it sold what the view showed held


def test_random_agent_without_env_seed_and_bad_p_hold(synth_panel):
    env = TradingEnv('easy', 'test', data=synth_panel)
    env.reset()
    agent = RandomAgent(seed=1)
    agent.reset([env])
    assert len(agent.act([env], [None])) == 1
    with pytest.raises(ValueError, match='p_hold'): RandomAgent(p_hold=1.5)


def test_agent_protocol():
    a = Agent()
    assert a.config() == {'name': 'agent'} and a.obs_mode == 'text'
    a.reset([])
    with pytest.raises(NotImplementedError): a.act([], [])
    assert repr(RSIAgent()).startswith('RSIAgent(name=')


def test_make_agent_specs():
    for spec in BASELINES: assert make_agent(spec).spec == spec and make_agent(spec).name == spec
    assert make_agent(' Do-Nothing ').spec == 'do_nothing'
    r = make_agent('random:42')
    assert (r.seed, r.spec) == (42, 'random:42')
    # one spelling per agent, so evaluate sees two spellings as one agent
    assert [make_agent(s).spec for s in ('RSI', 'random:042', 'random: 42', 'random:0', 'random:-1')] == ['rsi', 'random:42', 'random:42', 'random', 'random:-1']
    agent = RSIAgent()
    assert make_agent(agent) is agent
    for bad, msg in (('rsi:3', 'unknown agent'), ('', 'unknown agent'), ('ppo', 'unknown agent'), ('llm:', 'unknown agent'),
                     ('random:abc', 'must be an integer'), ('gpt5', 'choose from do_nothing')):
        with pytest.raises(ValueError, match=msg): make_agent(bad)


def test_make_agent_delegates_ppo_and_llm(monkeypatch):
    "ppo:, llm: and llm:...@vllm specs reach their modules' registered entry points, with the text after the prefix."
    calls = []
    fake_ppo = types.SimpleNamespace(agent_from_spec=lambda p: calls.append(('ppo', p)) or RSIAgent())
    fake_llm = types.SimpleNamespace(agent_from_spec=lambda a: calls.append(('llm', a)) or DoNothingAgent())
    fake_scale = types.SimpleNamespace(vllm_agent_from_spec=lambda a: calls.append(('vllm', a)) or DoNothingAgent())
    monkeypatch.setitem(sys.modules, 'tradellm.ppo', fake_ppo)
    monkeypatch.setitem(sys.modules, 'tradellm.llm', fake_llm)
    monkeypatch.setitem(sys.modules, 'tradellm.scale', fake_scale)
    assert make_agent('ppo:models/easy').spec == 'ppo:models/easy'
    assert make_agent('llm:smollm2').spec == 'llm:smollm2'
    make_agent('llm:Qwen/Qwen2.5-0.5B-Instruct+adapters/sft')
    assert make_agent('llm:smollm2+a@vllm').spec == 'llm:smollm2+a@vllm'
    make_agent('llm:odd@name')  # an '@' that names no registered engine stays part of the model name
    assert calls == [('ppo', 'models/easy'), ('llm', 'smollm2'), ('llm', 'Qwen/Qwen2.5-0.5B-Instruct+adapters/sft'),
                     ('vllm', 'smollm2+a'), ('llm', 'odd@name')]


# ---- the teacher families

FEATS = {f: MARKET_FEATURES.index(f) for f in ('trend', 'macd', 'macd_signal', 'macd_hist', 'momentum')}


@st.composite
def family_views(draw):
    "A view of 1 to 12 stocks with random trend, MACD and momentum (NaN sometimes), some held at a gain or loss."
    v = draw(views())
    n = len(v.symbols)
    val = lambda lo, hi: draw(st.lists(st.floats(lo, hi) | st.just(float('nan')), min_size=n, max_size=n))
    v.market[:, FEATS['momentum']] = val(-15, 15)
    macd, sig = val(-20, 20), draw(st.lists(st.floats(-20, 20), min_size=n, max_size=n))
    v.market[:, FEATS['macd']], v.market[:, FEATS['macd_signal']] = macd, sig
    v.market[:, FEATS['macd_hist']] = np.array(macd) - np.array(sig)
    return v


@settings(max_examples=150, deadline=None)
@given(family_views(), st.sampled_from([
    EMATrendAgent(0.5, 0.0), EMATrendAgent(0.0, -1.0, stop_loss=5, max_buys=0), MACDAgent(), MACDAgent(zero_line=True, stop_loss=3),
    MomentumAgent(2.0, 0.0), MomentumAgent(4.0, -2.0, max_buys=1)]), st.sampled_from([0.3, 1.0]), st.integers(1, 10))
def test_family_decisions_follow_their_rules(view, agent, cap, limit):
    "Each decision's rule is the family's, its recorded inputs are the view's, and the orders are the decisions (sells first, within the limits)."
    text, decisions = agent.decide(view, max_position=cap, max_trades=limit)
    f = agent.family
    assert [d['symbol'] for d in decisions] == list(view.symbols)
    new = 0
    for i, d in enumerate(decisions):
        assert d['rule'] in TEACHER_RULES and (d['rule'].startswith(f + '_') or d['rule'] in ('stop_loss', 'buy_limit', 'regime_gate', 'no_cash', 'trade_limit'))
        for k in agent.inputs: assert d[k] == view.feature(k, i) or (math.isnan(d[k]) and math.isnan(view.feature(k, i)))
        held, pnl = view.shares[i] > 0, view.feature('pnl_pct', i)
        if d['decision'] == 'SELL':
            assert held and (d['rule'] == f + '_exit' and agent.exit(d) or d['rule'] == 'stop_loss' and pnl <= -agent.stop_loss)
        if d['decision'] == 'BUY':
            assert not held and d['rule'] == f + '_entry' and agent.entry(d) and not view.buy_blocked
            new += 1
        if d['rule'] == f + '_keep': assert held and not agent.exit(d) and d['decision'] == 'HOLD'
        if d['rule'] == f + '_no_entry': assert not held and not agent.entry(d)
        if d['rule'] == 'buy_limit': assert agent.entry(d) and agent.max_buys
    assert not agent.max_buys or new <= agent.max_buys
    parsed = parse_action(text, view.symbols)
    assert parsed.format_ok
    acted = [d for d in decisions if d['decision'] != 'HOLD']
    assert sorted((o.side, o.symbol) for o in parsed.orders) == sorted((d['decision'], d['symbol']) for d in acted) and len(acted) <= limit
    assert [o.side for o in parsed.orders] == sorted((o.side for o in parsed.orders), key=lambda s: s != 'SELL')  # sells first


def test_family_specs_round_trip():
    for spec in ('teacher:ema:enter=1,exit=-0.5', 'teacher:macd:zero_line=1,stop_loss=3', 'teacher:momentum:enter=4,exit=-2,max_buys=2',
                 'teacher:rsi:buy_below=40,trend_veto=-3'):
        a = make_agent(spec)
        assert a.spec == teacher_spec(a) and make_agent(a.spec).config() == a.config() and make_agent(a.spec).spec == a.spec
    assert make_agent('teacher:momentum').config() == MomentumAgent().config()
    for bad, msg in (('teacher:ema:enter', 'NAME=VALUE'), ('teacher:bollinger', 'unknown teacher family'), ('teacher:ema:exit=2', 'must not be above')):
        with pytest.raises(ValueError, match=msg): make_agent(bad)


def test_task_teachers_trade_each_task_with_its_own(synth_panel):
    t = make_agent('teacher')
    assert isinstance(t, TaskTeachers) and t.spec == 'teacher' and t.config() == {'name': 'teacher', **DEFAULT_TEACHERS}
    envs = [TradingEnv('easy', 'test', data=synth_panel), TradingEnv('medium', 'test', data=synth_panel)]
    play(t, envs, [0, 1])
    assert len(t.last_decisions[0]) == 1 and len(t.last_decisions[1]) == 10
    medium = make_agent(DEFAULT_TEACHERS['medium'])
    assert {d['rule'] for d in t.last_decisions[1]} <= set(TEACHER_RULES) | set(RSI_RULES)
    env = TradingEnv('medium', 'test', data=synth_panel)
    play(medium, [env], [1])
    assert env.actions[:len(envs[1].actions)] == envs[1].actions  # the medium episode was traded by the medium teacher (play runs easy's 20 days)
