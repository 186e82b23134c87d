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
