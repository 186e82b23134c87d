"""Fast paths of the environment (issue 3) read and draw exactly what the general code does: the plain-order shortcut
of `parse_action`, the single-stock draw of `TradingEnv.reset`, and the breadth and numeric rows made at reset."""
import re

import numpy as np
import pytest
from gymnasium.utils import seeding
from hypothesis import HealthCheck, given, settings, strategies as st

import tradellm.market as market
from tradellm.env import MARKET_FEATURES, TradingEnv
from tradellm.market import parse_action

SYMS = ('INFY', 'TCS', 'M&M', 'BAJAJ-AUTO', 'ALL', '123')  # 'ALL' is also a size word, '123' looks like a size


def slow_parse(monkeypatch, text, symbols, default):
    "What `parse_action` reads with the plain-order shortcut switched off (every line through the token rules)."
    with monkeypatch.context() as m:
        m.setattr(market, '_PLAIN', re.compile(r'(?!)'))  # a pattern that never matches
        return parse_action(text, symbols, default)


tokens = st.sampled_from(['BUY', 'SELL', 'HOLD', 'buy', 'sell', 'Buy', 'hold', 'BUYING', 'Action: BUY', '1. SELL', '-'])
syms = st.sampled_from(list(SYMS) + ['infy', 'Tcs', 'NOSUCH', 'INFY.NS', 'the', ''])
sizes = st.sampled_from(['0.5', '1', '1.0', '0.25', '.5', '50%', '2', '0', '0.0', '00.5', '1.5', '1e-3', 'nan', 'half', '0.5.',
                         '123', '٠.٥', '9' * 400, ''])
spaces = st.sampled_from([' ', '  ', '\t', ' , ', ''])
line = st.builds(lambda lead, v, s1, sym, s2, size, tail: f'{lead}{v}{s1}{sym}{s2}{size}{tail}',
                 st.sampled_from(['', ' ', '\t', '\r']), tokens, spaces, syms, spaces, sizes, st.sampled_from(['', ' ', '\t', '\r', '.']))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=5), sep=st.sampled_from(['; ', ';', '\n', '\r\n']), think=st.booleans(),
       default=st.sampled_from([None, 'INFY']))
def test_plain_order_shortcut_reads_what_the_token_rules_read(monkeypatch, lines, sep, think, default):
    text = ('<think>maybe BUY TCS 1</think>' if think else '') + sep.join(lines)
    for symbols in (SYMS, list(SYMS[:1])):
        assert parse_action(text, symbols, default) == slow_parse(monkeypatch, text, symbols, default)


@pytest.mark.parametrize('text', ['BUY INFY 0.5', ' SELL TCS 1 ', 'buy m&m 0.25', 'BUY INFY 0.5; SELL TCS 0.3',
                                  'BUY ALL 0.5', 'BUY INFY 123', 'BUY INFY 1.5', 'BUY INFY 0', 'BUY NOSUCH 0.5',
                                  'BUY INFY 0.5\nHOLD', ';'.join(['BUY INFY 0.1'] * 70)])
def test_plain_order_shortcut_examples(monkeypatch, text):
    "Well-formed orders, and the edge cases the shortcut must leave to the token rules (same reasons, same sizes)."
    assert parse_action(text, SYMS) == slow_parse(monkeypatch, text, SYMS, None)


def test_plain_orders_keep_their_line_and_the_episode_spelling():
    r = parse_action(' buy m&m 0.25 ;SELL tcs 1', SYMS)
    assert [(o.side, o.symbol, o.fraction, o.text) for o in r.orders] == [('BUY', 'M&M', 0.25, 'buy m&m 0.25'),
                                                                          ('SELL', 'TCS', 1.0, 'SELL tcs 1')]
    assert r.errors == [] and r.format_ok and r.answer == 'buy m&m 0.25 ;SELL tcs 1'


def test_single_stock_draw_is_numpys_choice(synth_panel):
    "reset draws the start and the one stock of an easy episode as `integers` then `choice(replace=False)` would."
    env = TradingEnv('easy', 'train', 'numeric', synth_panel)
    for seed in range(300):
        env.reset(seed=seed)
        rng = seeding.np_random(seed)[0]
        k = int(rng.integers(len(env._starts)))
        col = rng.choice(np.flatnonzero(env._full[k]), size=1, replace=False).tolist()
        assert (env._start, env._cols) == (int(env._starts[k]), col)
        assert env.np_random.bit_generator.state == rng.bit_generator.state  # the generator is left where choice leaves it
        assert env.np_random.random() == rng.random()


@pytest.mark.parametrize('task', ['easy', 'medium', 'hard'])
def test_breadth_and_numeric_globals_at_reset(synth_panel, task):
    "Stocks up and down, the mean change (as `mean` computes it) and the gate, in the view and every numeric row."
    env = TradingEnv(task, 'test', 'numeric', synth_panel)
    g = len(env.feature_names) - 9
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        ch = env._market[:, :, MARKET_FEATURES.index('change')]
        up, down, mean = (ch > 0).sum(1), (ch < 0).sum(1), ch.mean(1)
        assert env.view.breadth == (int(up[0]), int(down[0]), float(mean[0]))
        assert np.array_equal(env._rows[:, g + 5:g + 8], np.stack([up, down, mean], 1).astype(np.float32))
        assert np.array_equal(env._rows[:, g + 8], env._blocked.astype(np.float32))
        assert np.array_equal(env._rows[:, g], np.arange(1, env.task.days + 2))
        # the first observation is row 0 with the capital as cash and equity, in an array of its own
        assert np.array_equal(obs[:g + 2], env._rows[0, :g + 2]) and np.array_equal(obs[g + 5:], env._rows[0, g + 5:])
        assert list(obs[g + 2:g + 5]) == [env.task.capital, env.task.capital, 0.0] and not np.shares_memory(obs, env._rows)


# --- the score's reductions, the one-stock breadth and the symbol-major feature windows (issue 3, numeric easy) ---

from tradellm.env import _breadth_one, _panel_features  # noqa: E402

SPECIAL = [0.0, -0.0, 1e-300, -1e-300, 1e300, np.inf, -np.inf, np.nan]


def same_float(a, b) -> bool:
    "The same value bit for bit (NaN matches NaN), and the same type."
    return type(a) is type(b) and np.float64(a).tobytes() == np.float64(b).tobytes()


def test_breadth_of_one_stock_is_the_sum_over_stocks():
    "For one stock, up/down counts and the mean change are what the sums over the stock axis give (-0.0 becomes 0.0)."
    rng = np.random.default_rng(5)
    for _ in range(200):
        ch = rng.choice(SPECIAL + list(rng.normal(0, 2, 8)), (int(rng.integers(1, 45)), 1))
        ch = np.asfortranarray(ch) if rng.random() < 0.5 else ch
        got = _breadth_one(ch[:, 0])
        want = ((ch > 0).sum(1), (ch < 0).sum(1), ch.sum(1) / 1)
        for g, w in zip(got, want): assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


@pytest.mark.parametrize('task', ['easy', 'medium', 'hard'])
def test_windows_match_fancy_indexing_of_the_panel(synth_panel, task):
    """Feature windows read from the symbol-major copy have the values of `feat[a:b, cols]` and, when sums run over more
    than one stock, its memory layout too (one-stock windows are views of tables made once per panel)."""
    env = TradingEnv(task, 'test', 'numeric', synth_panel)
    feat, feat32, _ = _panel_features(synth_panel)
    for seed in range(8):
        env.reset(seed=seed)
        a, b, cols = env._start, env._start + env.task.days + 1, env._cols
        for got, want in ((env._market, feat[a:b, cols]), (env._open, synth_panel.open[a:b, cols]),
                          (env._close, synth_panel.close[a:b, cols])):
            assert got.shape == want.shape and got.tobytes() == want.tobytes()
            if env.task.n_stocks > 1: assert got.strides == want.strides
        assert np.array_equal(env._rows[:, :env._nm], feat32[a:b, cols].reshape(b - a, -1))


def random_portfolio_days(rng, n_symbols, days=30):
    "A portfolio driven through `days` of random orders by `execute`, yielding it with the day's finite prices."
    syms = [f'S{i}' for i in range(n_symbols)]
    pf = market.Portfolio(syms, 1e5, cost=0.001, slippage=0.002, max_position=float(rng.choice([0.3, 1.0])), max_trades=5)
    for day in range(1, days + 1):
        prices = rng.lognormal(5, 1, n_symbols)
        orders = [market.Order(str(rng.choice(['BUY', 'SELL'])), str(rng.choice(syms)), float(rng.choice([0.1, 0.5, 1.0])))
                  for _ in range(int(rng.integers(0, 4)))]
        market.execute(pf, orders, prices, day)
        yield pf, prices


@pytest.mark.parametrize('n_symbols', [1, 3, 25])
def test_equity_of_finite_prices_is_the_dot_product(n_symbols):
    "`_equity_finite` (no numpy while at most one stock is held) gives the bits of `equity`, and `_held` is the nonzero shares."
    rng = np.random.default_rng(n_symbols)
    seen = set()
    for _ in range(40):
        for pf, prices in random_portfolio_days(rng, n_symbols):
            assert pf._held == {i: int(s) for i, s in enumerate(pf.shares) if s}
            seen.add(min(len(pf._held), 2))
            assert same_float(pf._equity_finite(prices, prices.tolist()), pf.equity(prices))
    assert seen == {0, 1, 2} if n_symbols > 1 else seen == {0, 1}  # no holding, one, and several were all met


def test_fills_with_the_open_as_a_list_are_the_same():
    "`execute(..., open_row=prices.tolist())` (what the env passes) fills exactly as without it."
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        a, b = (market.Portfolio([f'S{i}' for i in range(n)], 5e4, 0.001, 0.002, 0.4, 3) for _ in range(2))
        for day in range(1, 15):
            prices = rng.lognormal(4, 1, n)
            orders = [market.Order(str(rng.choice(['BUY', 'SELL'])), f'S{int(rng.integers(n + 1))}', float(rng.choice([0.2, 1.0])))
                      for _ in range(int(rng.integers(1, 5)))]
            allowed = bool(rng.random() < 0.8)
            fa = market.execute(a, orders, prices, day, allowed)
            fb = market.execute(b, orders, prices, day, allowed, prices.tolist())
            assert fa == fb and a.cash == b.cash and a.shares.tolist() == b.shares.tolist() and a._held == b._held


@pytest.mark.parametrize('regime_gate', [False, True])
def test_one_stock_windows_are_what_the_general_code_makes(synth_panel, monkeypatch, regime_gate):
    "One-stock episodes read their windows from per-panel tables: observations, breadth, gate and fills equal the general code's."
    import dataclasses
    from tradellm.tasks import TASKS
    task = dataclasses.replace(TASKS['easy'], regime_gate=regime_gate)
    fast, slow = TradingEnv(task, 'test', 'numeric', synth_panel), TradingEnv(task, 'test', 'numeric', synth_panel)
    monkeypatch.setattr(slow, '_one_stock_window', lambda c, a, b: None)  # every reset takes the general code
    rng = np.random.default_rng(0)
    blocked_days = 0
    for seed in range(12):
        (of, _), (os_, _) = fast.reset(seed=seed), slow.reset(seed=seed)
        assert of.tobytes() == os_.tobytes() and fast._rows.tobytes() == slow._rows.tobytes()
        assert fast._market.tobytes() == slow._market.tobytes() and fast._blocked.tolist() == slow._blocked.tolist()
        assert fast.view.breadth == slow.view.breadth
        blocked_days += sum(fast._blocked_days)
        for _ in range(task.days):
            a = str(rng.choice(['HOLD', f'BUY {fast.symbols[0]} 0.5', 'SELL 1', 'BUY 1']))
            sf, ss = fast.step(a), slow.step(a)
            assert sf[0].tobytes() == ss[0].tobytes() and sf[1:] == ss[1:]
        assert fast.pf.equity_history == slow.pf.equity_history
    assert blocked_days > 0 or not regime_gate  # the gate shut on some days, so both of its roads were compared
