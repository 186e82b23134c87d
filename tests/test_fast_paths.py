"""The environment's one remaining fast path: each episode's windows are read at reset from per-panel tables (a
symbol-major copy of the features, the numeric rows, the breadth), never from the panel day by day. These tests check
that what reset builds is exactly what plain indexing of the panel gives. (The plain-order parser road, the one-stock
window tables, the inlined draw and the list-based equity were removed for tasks 2.0.0: bench_env.py showed the floors
met without them.)"""
import numpy as np
import pytest

from tradellm.env import MARKET_FEATURES, TradingEnv, _panel_features


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


@pytest.mark.parametrize('task', ['easy', 'medium', 'hard'])
def test_windows_match_fancy_indexing_of_the_panel(synth_panel, task):
    "Feature windows read from the symbol-major copy have the values and the memory layout of `feat[a:b, cols]`."
    env = TradingEnv(task, 'test', 'numeric', synth_panel)
    feat, feat32, _ = _panel_features(synth_panel)
    for seed in range(8):
        env.reset(seed=seed)
        a, b, cols = env._start, env._start + env.task.days + 1, env._cols
        for got, want in ((env._market, feat[a:b, cols]), (env._open, synth_panel.open[a:b, cols]),
                          (env._close, synth_panel.close[a:b, cols])):
            assert got.shape == want.shape and got.tobytes() == want.tobytes()
            assert got.strides == want.strides
        assert np.array_equal(env._rows[:, :env._nm], feat32[a:b, cols].reshape(b - a, -1))
