"""Indicators: properties (hypothesis), the `ta` reference on real and synthetic data, errors and caching."""
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from tradellm.data import DataError, Panel
from tradellm.indicators import (INDICATORS, LABELS, WARMUP, FIRST_DAY, bb_label, compute_indicators, macd_label,
                                 max_reference_error, momentum_label, rsi_label, trend_label, volatility_label,
                                 volume_label, change_label)

NIFTY68 = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'nifty68'
FIELDS = ('open', 'high', 'low', 'close', 'volume')


def make_panel(close, volume=None, start='2022-01-03'):
    "Panel from a (days, symbols) close array; a bar exists where close is not NaN."
    close = np.asarray(close, dtype=np.float64)
    if close.ndim == 1: close = close[:, None]
    if volume is None: volume = np.where(np.isnan(close), np.nan, 1e6)
    volume = np.asarray(volume, dtype=np.float64).reshape(close.shape)
    return Panel(dates=pd.bdate_range(start, periods=len(close)), symbols=[f'S{j}' for j in range(close.shape[1])],
                 open=close, high=close, low=close, close=close, volume=volume)


def random_panel(days, n, seed, tick=0.0, gaps=0.05):
    "Random walks with late listings, early ends and suspended days; prices rounded to `tick` (0: no rounding)."
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, (days, n)), axis=0))
    if tick: close = np.maximum(tick, np.round(close / tick) * tick)
    volume = rng.lognormal(10, 1, (days, n))
    for j in range(n):
        first, stop = rng.integers(0, days // 2 + 1), days - rng.integers(0, days // 3 + 1)
        close[:first, j] = np.nan
        close[stop:, j] = np.nan
    close[rng.random((days, n)) < gaps] = np.nan
    volume[np.isnan(close)] = np.nan
    return make_panel(close, volume)


def garbage_after(panel, t, seed):
    "Copy of `panel` whose bars after day `t` are garbage: extreme prices, new gaps, new bars."
    rng = np.random.default_rng(seed)
    f = {k: getattr(panel, k).copy() for k in FIELDS}
    shape = f['close'][t + 1:].shape
    junk = rng.choice([1e-8, 1e12, np.nan, 7.0], size=shape) * rng.uniform(0.5, 2, shape)
    for k in FIELDS: f[k][t + 1:] = junk
    f['volume'][t + 1:] = np.where(np.isnan(junk), np.nan, rng.uniform(0, 1e12, shape))
    return Panel(dates=panel.dates, symbols=panel.symbols, **f)


def same(a, b):
    "Bit-identical, NaNs in the same places."
    return np.array_equal(a, b, equal_nan=True)


# ---- properties -------------------------------------------------------------------------------------------

panels = st.builds(random_panel, days=st.integers(1, 90), n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
                   tick=st.sampled_from([0.0, 0.0, 0.5, 5.0]), gaps=st.sampled_from([0.0, 0.05, 0.3]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(panel=panels, frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_value_on_day_t_ignores_later_days(panel, frac, seed):
    t = int(frac * (len(panel.dates) - 1))
    now, later = compute_indicators(panel), compute_indicators(garbage_after(panel, t, seed))
    for k in INDICATORS:
        assert same(now[k][:t + 1], later[k][:t + 1]), f"{k} on days <= {t} changed when later prices changed"


@settings(max_examples=40, deadline=None)
@given(panel=panels)
@example(panel=random_panel(days=19, n=3, seed=655, tick=5.0, gaps=0.0))  # once gave RSI 100.00000000000001
def test_ranges_and_where_values_exist(panel):
    ind = compute_indicators(panel)
    nobar = np.isnan(panel.close)
    for k in INDICATORS:
        assert np.isnan(ind[k][nobar]).all(), f"{k} has a value on a day without a bar"
        assert not np.isinf(ind[k]).any(), k
    rsi = ind['rsi'][~np.isnan(ind['rsi'])]
    assert ((rsi >= 0) & (rsi <= 100)).all()
    vr = ind['volume_ratio'][~np.isnan(ind['volume_ratio'])]
    assert ((vr >= 0) & (vr <= 20 + 1e-9)).all()  # today's volume is one of the 20 in the mean
    assert (ind['volatility'][~np.isnan(ind['volatility'])] >= 0).all()
    # each indicator is defined exactly from its FIRST_DAY-th bar of the symbol on (bands: where they have width)
    for j in range(len(panel.symbols)):
        bars = ~nobar[:, j]
        c = panel.close[bars, j]
        for k in INDICATORS:
            defined = ~np.isnan(ind[k][bars, j])
            expect = np.arange(len(c)) >= FIRST_DAY[k]
            if k == 'bb_pctb':
                windows = [c[max(0, i - 19):i + 1] for i in range(len(c))]
                expect &= np.array([w.max() > w.min() for w in windows], dtype=bool)
            assert np.array_equal(defined, expect), f"{k} of symbol {j}: defined on the wrong bars"


def test_warmup_is_the_first_fully_defined_bar():
    panel = random_panel(120, 3, seed=5, gaps=0.1)
    ind = compute_indicators(panel)
    for j in range(3):
        bars = np.flatnonzero(np.isfinite(panel.close[:, j]))
        warm = np.all([np.isfinite(ind[k][bars, j]) for k in INDICATORS], axis=0)
        assert warm.argmax() == WARMUP and warm[WARMUP:].all() and not warm[:WARMUP].any()


# ---- against ta and pandas ----------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_ta_on_synthetic_panels(seed):
    panel = random_panel(400, 5, seed, gaps=0.03)
    assert max_reference_error(panel) < 1e-6


def test_reference_check_catches_a_wrong_value():
    panel = random_panel(100, 2, seed=3, gaps=0.0)
    ind = compute_indicators(panel)
    broken = {k: v.copy() for k, v in ind.items()}
    broken['momentum'][50, 0] += 0.01
    object.__setattr__(panel, '_indicators', (panel.close, panel.volume, broken))
    assert max_reference_error(panel) == pytest.approx(0.01)
    broken['rsi'][5, 0] = 50.0  # a value where the reference has none
    with pytest.raises(AssertionError, match='rsi'): max_reference_error(panel)


def nifty68_panel():
    "The nifty68 CSVs read straight with pandas, aligned by date (independent of tradellm.data's loader)."
    frames = {f.name[:-len('_daily.csv')]: pd.read_csv(f) for f in sorted(NIFTY68.glob('*_daily.csv'))}
    fields = {k: pd.DataFrame({s: pd.Series(df[k].to_numpy(float), index=pd.to_datetime(df['timestamp'].str[:10]))
                               for s, df in frames.items()}).sort_index() for k in FIELDS}
    return Panel(dates=fields['close'].index, symbols=list(frames), **{k: v.to_numpy() for k, v in fields.items()})


@pytest.mark.skipif(not NIFTY68.exists(), reason='needs ../shared/data/nifty68')
def test_nifty68_matches_ta_and_is_fast():
    panel = nifty68_panel()
    assert len(panel.symbols) == 68 and np.isnan(panel.close[0]).sum() == 58  # 58 stocks list later
    start = time.perf_counter()
    ind = compute_indicators(panel)
    assert time.perf_counter() - start < 1.0
    assert max_reference_error(panel) < 1e-6
    # a late starter equals the same stock computed on its own
    j = int(np.flatnonzero(np.isnan(panel.close[0]))[0])
    bars = np.isfinite(panel.close[:, j])
    alone = compute_indicators(make_panel(panel.close[bars, j], panel.volume[bars, j]))
    for k in INDICATORS: assert same(ind[k][bars, j], alone[k][:, 0]), k
    # causality on real data, one cut
    t = 700
    later = compute_indicators(garbage_after(panel, t, seed=0))
    for k in INDICATORS: assert same(ind[k][:t + 1], later[k][:t + 1]), k


# ---- hand-computed values -------------------------------------------------------------------------------------

def test_rsi_by_hand():
    r = 13 / 14
    rsi = compute_indicators(make_panel(np.r_[np.arange(100., 115.), 113.]))['rsi'][:, 0]
    assert np.isnan(rsi[:14]).all() and rsi[14] == 100.0
    assert rsi[15] == pytest.approx(89.3545, abs=1e-4)
    assert rsi[15] == pytest.approx(100 * r * (1 - r**14) / (r * (1 - r**14) + 1 / 14), abs=1e-12)
    zigzag = 100 + np.cumsum(np.r_[0, np.tile([2., -1.], 10)[:19]])
    rsi = compute_indicators(make_panel(zigzag))['rsi'][:, 0]
    assert rsi[14:] == pytest.approx([65.0, 69.8493, 65.0, 69.5528, 65.0, 69.3248], abs=1e-4)


def test_other_indicators_by_hand():
    close = np.r_[np.full(20, 100.0), 110.0, 99.0]
    ind = compute_indicators(make_panel(close, np.r_[np.ones(19), 21.0, 2.0, 2.0]))
    assert ind['change'][20, 0] == pytest.approx(10.0) and ind['change'][21, 0] == pytest.approx(-10.0)
    assert ind['momentum'][20, 0] == pytest.approx(10.0) and ind['momentum'][21, 0] == pytest.approx(-1.0)
    assert ind['volume_ratio'][19, 0] == 10.5 and ind['volume_ratio'][20, 0] == pytest.approx(2 / ((18 + 21 + 2) / 20))
    # volatility on day 20: 19 zero log returns and one of log(1.1); sample std, annualised, percent
    x = np.r_[np.zeros(19), np.log(1.1)]
    assert ind['volatility'][20, 0] == pytest.approx(100 * np.sqrt(252) * x.std(ddof=1))
    # %B on day 20: 19 closes of 100 and one of 110 -> mean 100.5, population sigma sqrt(19*0.25 + 90.25)/sqrt(20)
    sigma = np.sqrt((19 * 0.5**2 + 9.5**2) / 20)
    assert ind['bb_pctb'][20, 0] == pytest.approx((110 - (100.5 - 2 * sigma)) / (4 * sigma))
    assert np.isnan(ind['bb_pctb'][19, 0])  # 20 identical closes: no band width


# ---- errors, caching, labels ---------------------------------------------------------------------------------

def changed(panel, field, at, value):
    "A new panel with one value of `field` changed (a panel's arrays are read-only)."
    a = getattr(panel, field).copy()
    a[at] = value
    return dataclasses.replace(panel, **{field: a})


def test_bad_prices_are_refused_with_symbol_and_date():
    panel = random_panel(50, 2, seed=0, gaps=0.0)
    panel = changed(panel, 'close', (10, 1), -1.0)
    with pytest.raises(DataError, match=r'S1: 1 non-positive or infinite close value\(s\).*first 2022-01-17'):
        compute_indicators(panel)
    panel = random_panel(50, 2, seed=0, gaps=0.0)
    panel = changed(panel, 'close', (3, 0), np.inf)
    with pytest.raises(DataError, match='S0: 1 non-positive or infinite close'): compute_indicators(panel)
    panel = random_panel(50, 2, seed=0, gaps=0.0)
    panel = changed(panel, 'volume', (4, 0), -3)
    with pytest.raises(DataError, match='negative or infinite volume'): compute_indicators(panel)
    with pytest.raises(TypeError, match='needs a tradellm.data.Panel'): compute_indicators(pd.DataFrame())


def test_cached_once_per_panel_and_read_only():
    panel = random_panel(60, 3, seed=1)
    first = compute_indicators(panel)
    assert compute_indicators(panel)['rsi'] is first['rsi']
    first['extra'] = 1  # the returned dict is the caller's own
    assert 'extra' not in compute_indicators(panel)
    with pytest.raises(ValueError, match='read-only'): first['rsi'][0, 0] = 1.0
    panel.close = panel.close * 2  # a new close array is a new computation
    assert compute_indicators(panel)['rsi'] is not first['rsi']


def test_objects_without_attributes_are_computed_but_not_cached():
    class Bars:
        __slots__ = ('dates', 'symbols', 'close', 'volume')
    p, b = random_panel(40, 2, seed=2), Bars()
    for k in Bars.__slots__: setattr(b, k, getattr(p, k))
    one, two = compute_indicators(b), compute_indicators(b)
    assert one['rsi'] is not two['rsi'] and same(one['rsi'], two['rsi'])


def test_labels():
    assert rsi_label(29.9) == 'oversold' and rsi_label(30) == 'neutral' and rsi_label(70.1) == 'overbought'
    assert rsi_label(np.nan) == 'n/a' and isinstance(rsi_label(np.float64(50)), str)
    assert list(macd_label([-1e-9, 0.0, 2.0])) == ['bearish', 'neutral', 'bullish']
    assert list(bb_label([-0.01, 0.0, 0.19, 0.2, 0.8, 0.81, 1.0, 1.01, np.nan])) == [
        'below lower band', 'near lower band', 'near lower band', 'inside bands', 'inside bands', 'near upper band',
        'near upper band', 'above upper band', 'n/a']
    assert list(trend_label([-0.1, 0.0, 0.1])) == ['bearish', 'neutral', 'bullish']
    assert list(volume_label([0.49, 0.5, 1.5, 1.51])) == ['low', 'normal', 'normal', 'high']
    assert list(volatility_label([14.9, 15, 40, 40.1])) == ['low', 'moderate', 'moderate', 'high']
    assert list(momentum_label([-5.1, -5, 0, 5, 5.1])) == ['strong down', 'down', 'flat', 'up', 'strong up']
    assert list(change_label([-1, 0, 1])) == ['down', 'flat', 'up']
    panel = random_panel(80, 4, seed=4)
    ind = compute_indicators(panel)
    for name, label in LABELS.items():
        words = label(ind[name])
        assert words.shape == ind[name].shape
        assert (words[np.isnan(ind[name])] == 'n/a').all() and (words[~np.isnan(ind[name])] != 'n/a').all()


def test_synthetic_panel_of_the_data_module_matches_ta():
    from tradellm.data import synthetic_panel
    panel = synthetic_panel(250, 6, seed=11, first_day={'S02': 35, 'S05': 200})
    assert max_reference_error(panel) < 1e-6
    assert np.isnan(compute_indicators(panel)['macd_hist'][:35 + WARMUP, 2]).all()


@pytest.mark.skipif(not NIFTY68.exists(), reason='needs ../shared/data/nifty68')
def test_load_panel_nifty68_matches_ta():
    from tradellm.data import load_panel
    assert max_reference_error(load_panel(NIFTY68)) < 1e-6
