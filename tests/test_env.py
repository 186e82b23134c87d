"""TradingEnv: the "Must hold" list of issue 3 (Gymnasium API, do-nothing score, no look-ahead, reproducibility,
full-bar windows inside the split, numeric mode = text mode's numbers, a parser that never raises, caps and limits,
portfolio invariants), on generated panels always and on the real nifty68 data where it is present."""
import json
import math
import os
import random
import re
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings, strategies as st

from tradellm.data import SPLITS, DataError, Panel, split_slice, synthetic_panel
from tradellm.env import GLOBAL_FEATURES, MARKET_FEATURES, POSITION_FEATURES, TradingEnv, demo_panel
from tradellm.market import ParsedAction, parse_action
from tradellm.tasks import ENV_VERSION, REGIME_FALL_SHARE, REGIME_MEAN_CHANGE, TASKS
from tests.conftest import play_episode

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ('open', 'high', 'low', 'close', 'volume')
MODES = ('text', 'numeric')


def random_action(rng, symbols, p_hold=0.35):
    "A HOLD or 1-3 BUY/SELL orders of random sizes: the kind of stream an exploring agent sends."
    if rng.random() < p_hold: return 'HOLD'
    orders = []
    for _ in range(int(rng.integers(1, 4))):
        side = 'BUY' if rng.random() < 0.6 else 'SELL'
        orders.append(f"{side} {symbols[int(rng.integers(len(symbols)))]} {rng.choice([0.05, 0.1, 0.25, 0.5, 1.0]):g}")
    return '; '.join(orders)


def play(env, seed=None, options=None, policy_seed=0, hold=False):
    "One episode of seeded random orders (or HOLD); returns (observations, infos, actions), day 0's observation and info first."
    rng = np.random.default_rng(policy_seed)
    return play_episode(env, lambda env, day: 'HOLD' if hold else random_action(rng, env.symbols), seed, options)


def same_obs(a, b) -> bool:
    if isinstance(a, str): return isinstance(b, str) and a == b
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def day_index(panel, iso_date) -> int:
    "Row of `panel` holding `iso_date`."
    return int(panel.dates.searchsorted(pd.Timestamp(iso_date)))


@lru_cache(maxsize=None)
def _synth():
    return synthetic_panel(n_days=1100, symbols=tuple(f'S{i:02d}' for i in range(30)), start='2021-01-04', seed=7)


# ---------------------------------------------------------------- Gymnasium API

@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('task', list(TASKS))
def test_check_env_passes(synth_panel, task, mode):
    env = TradingEnv(task, 'train', mode, synth_panel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_env(env, skip_render_check=True)  # render: test_render_ansi_is_the_text_observation
    from_gym = [str(w.message) for w in caught if 'gymnasium' in (w.filename or '') or 'WARN' in str(w.message)]
    assert not from_gym, f"check_env warned: {from_gym}"
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    if mode == 'numeric':
        assert obs.dtype == np.float32 and obs.shape == (len(env.feature_names),)
    else:
        assert isinstance(obs, str)


@pytest.mark.parametrize('task', list(TASKS))
def test_numeric_observations_are_fresh_objects(synth_panel, task):
    env = TradingEnv(task, 'train', 'numeric', synth_panel)
    o0, _ = env.reset(seed=1)
    o0_copy = o0.copy()
    o1 = env.step(f'BUY {env.symbols[0]} 0.5')[0]
    o1_copy = o1.copy()
    assert not np.shares_memory(o0, o1)
    o0[:] = -12345.0  # an agent scribbles on the observation it got
    o2 = env.step('HOLD')[0]
    assert not np.shares_memory(o1, o2) and not np.shares_memory(o0, o2)
    assert o1.tobytes() == o1_copy.tobytes(), "changing one observation changed another"
    o2[:] = 7.0
    assert o1.tobytes() == o1_copy.tobytes()
    # the env's own state was not touched either: replaying gives the same observations
    p0, _ = env.reset(seed=1)
    assert p0.tobytes() == o0_copy.tobytes()
    assert env.step(f'BUY {env.symbols[0]} 0.5')[0].tobytes() == o1_copy.tobytes()


def test_info_and_view_are_fresh(synth_panel):
    env = TradingEnv('medium', 'train', 'text', synth_panel)
    _, info = env.reset(seed=2)
    env.step(f'BUY {env.symbols[0]} 0.2')
    v = env.view
    shares_before, cash_before = env.pf.shares.copy(), env.pf.cash
    v.shares[:] = 999
    v.avg_cost[:] = -1
    info['positions'][env.symbols[0]] = 10 ** 6
    info['symbols'].append('XXX')
    assert (env.pf.shares == shares_before).all() and env.pf.cash == cash_before
    assert env.symbols == tuple(env.view.symbols) and 'XXX' not in env.symbols


def test_view_market_is_a_copy(synth_panel):
    env = TradingEnv('medium', 'train', 'text', synth_panel, render_mode='ansi')
    env.reset(seed=2)
    before, text = env.view.market.copy(), env.render()
    env.view.market[:] = 0.0  # e.g. a rule agent normalising prices in place
    assert (env.view.market == before).all() and env.render() == text


# ---------------------------------------------------------------- doing nothing scores 0.50 + 0.15 clip(0.5 - R_B / 0.1)

def do_nothing_score(R_B):
    "DESIGN's score of cash in an episode whose buy-and-hold returned R_B."
    return 0.50 + 0.15 * min(1.0, max(0.0, 0.5 - R_B / 0.1))


@pytest.mark.parametrize('split', list(SPLITS))
@pytest.mark.parametrize('task', list(TASKS))
def test_do_nothing_scores_exactly_its_formula(synth_panel, task, split):
    env = TradingEnv(task, split, 'numeric', synth_panel)
    for seed in (0, 1, 2):
        _, infos, _ = play(env, seed=seed, hold=True)
        m = infos[-1]['metrics']
        assert infos[-1]['score'] == pytest.approx(do_nothing_score(m['buy_and_hold_return']), abs=1e-12), m
        assert (m['risk_score'], m['pnl_score'], m['drawdown_score']) == (0.5, 0.5, 1)
        assert m['seed_score'] == pytest.approx(0.3, abs=1e-12)  # the seed's score of doing nothing
        assert all(i['equity'] == TASKS[task].capital for i in infos) and m['trades'] == 0 and m['exposure'] == 0


def test_empty_or_unreadable_answers_also_do_nothing(synth_panel):
    env = TradingEnv('easy', 'val', 'text', synth_panel)
    env.reset(seed=5)
    texts = ['', 'I am not sure.', '<think>still thinking', None, 'BUY ' + env.symbols[0] + ' nan']
    done, k = False, 0
    while not done:
        _, _, done, _, info = env.step(texts[k % len(texts)])
        assert info['parse_errors'] and info['orders'] == [] and info['format_ok'] is False
        k += 1
    assert info['score'] == pytest.approx(do_nothing_score(info['metrics']['buy_and_hold_return']), abs=1e-12)


@pytest.mark.parametrize('split', list(SPLITS))
@pytest.mark.parametrize('task', list(TASKS))
def test_do_nothing_scores_its_formula_on_real_data(real_panel, task, split):
    env = TradingEnv(task, split, 'numeric', real_panel)
    for seed in range(4):
        _, infos, _ = play(env, seed=seed, hold=True)
        m = infos[-1]['metrics']
        assert infos[-1]['score'] == pytest.approx(do_nothing_score(m['buy_and_hold_return']), abs=1e-12), (seed, m)


# ---------------------------------------------------------------- no look-ahead

def garbage_after(panel, day, seed):
    "A new Panel equal to `panel` up to `day` and random (valid, positive) numbers on every later day."
    rng = np.random.default_rng(seed)
    fields = {}
    for f in FIELDS:
        a = getattr(panel, f).copy()
        later = a[day + 1:]
        junk = rng.uniform(1e-3, 1e9, later.shape) if f == 'volume' else rng.uniform(0.5, 5e4, later.shape)
        a[day + 1:] = np.where(np.isnan(later), np.nan, junk)  # same bars exist, so the same episodes are valid
        fields[f] = a
    return Panel(panel.dates, list(panel.symbols), **fields, source='garbage after day')


@pytest.mark.parametrize('task', list(TASKS))
def test_no_look_ahead(synth_panel, task):
    rng = np.random.default_rng(len(task))
    days = TASKS[task].days
    for trial in range(3):
        seed = int(rng.integers(10_000))
        t = int(rng.integers(0, days + 1))  # the day observed, 0 = the reset observation
        probe = TradingEnv(task, 'train', 'numeric', synth_panel)
        probe.reset(seed=seed)
        start = day_index(synth_panel, probe._dates[0])
        opts = {'start': probe._dates[0], 'symbols': list(probe.symbols)}
        actions = [random_action(rng, probe.symbols) for _ in range(days)]
        junk = garbage_after(synth_panel, start + t, seed=trial)
        assert not np.allclose(junk.close[start + t + 1:], synth_panel.close[start + t + 1:])
        for mode in MODES:
            observations = []
            for panel in (synth_panel, junk):
                env = TradingEnv(task, 'train', mode, panel)
                obs, info = env.reset(seed=seed + 1, options=opts)  # seed differs: options pin the episode
                seen = [(obs, info)]
                for a in actions[:t]:
                    obs, _, _, _, info = env.step(a)
                    seen.append((obs, info))
                observations.append(seen)
            for (oa, ia), (ob, ib) in zip(*observations):
                assert same_obs(oa, ob), f"{task} {mode}: day {t} observation changed when later prices did"
                assert json.dumps(ia, sort_keys=True) == json.dumps(ib, sort_keys=True)


@pytest.mark.parametrize('task', list(TASKS))
def test_orders_fill_at_next_open_with_slippage(synth_panel, task):
    spec = TASKS[task]
    env = TradingEnv(task, 'test', 'numeric', synth_panel)
    rng = np.random.default_rng(4)
    checked = 0
    for seed in range(3):
        env.reset(seed=seed)
        cols = [synth_panel.symbols.index(s) for s in env.symbols]
        done, k = False, 0
        while not done:
            _, _, done, _, info = env.step(random_action(rng, env.symbols, p_hold=0.2))
            day = day_index(synth_panel, env._dates[k + 1])  # placed on day k, filled on day k + 1
            for f in info['orders']:
                if f['status'] == 'rejected' and f['price'] == 0: continue
                o = synth_panel.open[day, cols[env.symbols.index(f['symbol'])]]
                want = o * (1 + spec.slippage) if f['side'] == 'BUY' else o * (1 - spec.slippage)
                assert f['price'] == pytest.approx(want, rel=1e-12), (task, k, f)
                assert f['cost'] == pytest.approx(f['shares'] * f['price'] * spec.cost, rel=1e-12, abs=1e-12)
                checked += f['status'] != 'rejected'
            assert info['date'] == synth_panel.dates[day].date().isoformat()
            k += 1
    assert checked > 10


# ---------------------------------------------------------------- reproducibility

REPLAY = r'''
import hashlib, json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tradellm.data import synthetic_panel
from tradellm.env import TradingEnv
panel = synthetic_panel(n_days=1100, symbols=tuple(f'S{{i:02d}}' for i in range(30)), start='2021-01-04', seed=7)
h = hashlib.sha256()
for task in ('easy', 'medium', 'hard'):
    for mode in ('text', 'numeric'):
        for seed in (0, 11):
            env = TradingEnv(task, 'val', mode, panel)
            obs, info = env.reset(seed=seed)
            rng = np.random.default_rng(seed)
            done = False
            while not done:
                h.update(obs.encode() if isinstance(obs, str) else obs.tobytes())
                syms = env.symbols
                a = '; '.join(f"{{'BUY' if rng.random() < .6 else 'SELL'}} {{syms[rng.integers(len(syms))]}} 0.3"
                              for _ in range(int(rng.integers(0, 3)))) or 'HOLD'
                obs, r, done, _, info = env.step(a)
                h.update(json.dumps([r, info['orders']], sort_keys=True).encode())
            h.update(obs.encode() if isinstance(obs, str) else obs.tobytes())
            h.update(json.dumps([info['score'], info['metrics'], list(env.symbols), env._dates], sort_keys=True).encode())
print(h.hexdigest())
'''


def test_same_seed_same_episode_in_two_processes():
    code = REPLAY.format(root=str(ROOT))
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, 'PYTHONHASHSEED': str(k), 'OMP_NUM_THREADS': '1'}) for k in (1, 2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.strip())
    assert re.fullmatch(r'[0-9a-f]{64}', outs[0])
    assert outs[0] == outs[1], "the same (task, split, seed) gave different episodes in two processes"


@pytest.mark.parametrize('task', list(TASKS))
def test_same_seed_same_episode_in_process(synth_panel, task):
    runs = []
    for _ in range(2):
        env = TradingEnv(task, 'train', 'text', synth_panel)
        obs, infos, _ = play(env, seed=42, policy_seed=3)
        runs.append((obs, json.dumps(infos, sort_keys=True), env.symbols, env._dates))
    assert runs[0] == runs[1]


@pytest.mark.parametrize('task', list(TASKS))
def test_different_seeds_different_episodes(synth_panel, task):
    env = TradingEnv(task, 'train', 'numeric', synth_panel)
    starts, stock_sets = set(), set()
    for seed in range(20):
        env.reset(seed=seed)
        starts.add(env._dates[0])
        stock_sets.add(env.symbols)
    assert len(starts) >= 15, starts
    assert len(stock_sets) >= (10 if task == 'easy' else 18), stock_sets


# ---------------------------------------------------------------- windows: full bars, inside the split

def check_windows(panel, task, split, seeds):
    env = TradingEnv(task, split, 'text', panel)
    sl = split_slice(panel, split)
    lo, hi = SPLITS[split]
    days = TASKS[task].days
    used = set()
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        start = day_index(panel, env._dates[0])
        cols = [panel.symbols.index(s) for s in env.symbols]
        assert len(set(cols)) == TASKS[task].n_stocks
        rows = slice(start, start + days + 1)
        assert sl.start <= start and start + days + 1 <= sl.stop, f"{task} {split} seed {seed} crosses the split"
        assert env._dates[0] >= lo and (hi is None or env._dates[-1] <= hi)
        assert env._dates == [d.date().isoformat() for d in panel.dates[rows]]
        for f in FIELDS:
            a = getattr(panel, f)[rows][:, cols]
            assert np.isfinite(a).all() and (a > 0).all(), f"{task} {split} seed {seed}: a symbol misses {f} bars"
        assert np.isfinite(env._market).all(), "an indicator is undefined inside the window (not enough history)"
        assert 'nan' not in obs
        used.update(env.symbols)
    return used


@pytest.mark.parametrize('split', list(SPLITS))
@pytest.mark.parametrize('task', list(TASKS))
def test_episodes_use_full_windows_inside_split_synthetic(late_panel, task, split):
    used = check_windows(late_panel, task, split, range(40))
    if task != 'easy': assert len(used) > TASKS[task].n_stocks


def pinnable(env, panel, symbol):
    "Day indices of the env's split on which an episode of `symbol` can be pinned."
    sl, ok = split_slice(panel, env.split), []
    for day in range(sl.start, sl.stop):
        try: env.reset(options={'start': day, 'symbols': [symbol]})
        except ValueError: continue
        ok.append(day)
    return ok


def test_late_symbols_are_used_only_where_they_have_bars(late_panel):
    days = TASKS['easy'].days
    for split, sym, listed, hole in (('train', 'S01', 700, None), ('val', 'S02', 800, None), ('test', 'S03', 930, None),
                                     ('train', 'S04', 0, 400), ('val', 'S05', 0, 850), ('test', 'S06', 0, 1000)):
        env = TradingEnv('easy', split, 'numeric', late_panel)
        ok = pinnable(env, late_panel, sym)
        assert ok, f"{sym} never offered in {split}"
        assert min(ok) > listed, f"{sym} offered before it was listed"
        for day in ok:
            assert late_panel.valid[day:day + days + 1, late_panel.symbols.index(sym)].all()
            if hole: assert not day <= hole <= day + days, f"{sym}'s window spans its missing bar"
    env = TradingEnv('easy', 'val', 'numeric', late_panel)
    with pytest.raises(ValueError, match='S02'):  # pinned before its listing: refused, naming the symbol
        env.reset(options={'start': '2024-01-02', 'symbols': ['S02']})


@pytest.mark.parametrize('split', list(SPLITS))
@pytest.mark.parametrize('task', list(TASKS))
def test_episodes_use_full_windows_inside_split_real(real_panel, task, split):
    check_windows(real_panel, task, split, range(25))


# ---------------------------------------------------------------- numeric mode carries text mode's numbers

_NUMBER = re.compile(r'[+-]?\d+(?:\.\d+)?|[+-]?\b(?:nan|inf)\b', re.IGNORECASE)


def text_numbers(text, date):
    "Every number the text observation shows, in order, as (value, decimals); the date is checked and skipped."
    lines = text.split('\n')
    assert f'({date},' in lines[0]
    lines[0] = lines[0].replace(date, 'DATE')
    out, stock_lines = [], []
    for line in lines:
        if re.match(r'^[A-Z0-9&\-_.]+: close ', line):
            sym, line = line.split(': ', 1)
            stock_lines.append(sym)
        for m in _NUMBER.finditer(line):
            s = m.group().lstrip('+')
            out.append((float(s), len(s.split('.')[1]) if '.' in s else 0))
    return out, stock_lines


def expected_layout(env, obs):
    "Names (in env.feature_names) or constants, in the order text mode prints them."
    n, names = len(env.symbols), env.feature_names
    idx = {name: i for i, name in enumerate(names)}
    out = ['day', ('const', env.task.days), 'cash', 'equity', 'return_pct', 'days_left']
    if n > 1: out += ['stocks_up', ('const', n), 'stocks_down', 'mean_change']
    if obs[idx['buy_blocked']]:  # the RISK-OFF line names the rule(s) that shut the gate, with their numbers
        if obs[idx['stocks_down']] / n > REGIME_FALL_SHARE: out += ['stocks_down', ('const', n), ('const', round(REGIME_FALL_SHARE * 100))]
        if obs[idx['mean_change']] < REGIME_MEAN_CHANGE: out += ['mean_change', ('const', REGIME_MEAN_CHANGE)]
    for i in range(n):
        out += [f'stock{i}.{f}' for f in MARKET_FEATURES] + [f'stock{i}.shares']
        if obs[idx[f'stock{i}.shares']] > 0: out += [f'stock{i}.{f}' for f in POSITION_FEATURES[1:]]
    return out, idx


@pytest.mark.parametrize('task', list(TASKS))
def test_numeric_carries_every_number_of_text(synth_panel, task):
    text_env = TradingEnv(task, 'test', 'text', synth_panel)
    num_env = TradingEnv(task, 'test', 'numeric', synth_panel)
    checked = 0
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        t, info = text_env.reset(seed=seed)
        x, _ = num_env.reset(seed=seed)
        done = False
        while not done:
            nums, syms = text_numbers(t, info['date'])
            assert tuple(syms) == text_env.symbols
            layout, idx = expected_layout(num_env, x)
            assert len(nums) == len(layout), f"text shows {len(nums)} numbers, numeric layout explains {len(layout)}"
            v = num_env.view
            for (value, dec), name in zip(nums, layout):
                if isinstance(name, tuple):
                    assert value == name[1]
                    continue
                got = float(x[idx[name]])
                tol = 0.5 * 10 ** -dec * (1 + 1e-9) + abs(got) * 2 ** -23 + 1e-9  # display rounding + float32
                assert abs(value - got) <= tol, f"{task} day {info['day']}: text {name}={value} but numeric {got}"
                m = re.fullmatch(r'stock(\d+)\.(\w+)', name)
                i, f = (int(m[1]), m[2]) if m else (None, name)
                assert x[idx[name]] == np.float32(v.feature(f, i)), name  # numeric is exactly the view, in float32
                checked += 1
            assert ('RISK-OFF' in t) == bool(x[idx['buy_blocked']])
            a = random_action(rng, text_env.symbols)
            t, _, done, _, info = text_env.step(a)
            x = num_env.step(a)[0]
    assert checked > 100


@pytest.mark.parametrize('task', list(TASKS))
def test_numeric_has_no_placeholders(synth_panel, task):
    env = TradingEnv(task, 'train', 'numeric', synth_panel)
    rows = []
    for seed in range(6):
        obs, _, _ = play(env, seed=seed, policy_seed=seed)
        rows += obs
        assert np.isfinite(env._market).all()  # so nan_to_num never hides a missing value as 0
    X = np.stack(rows)
    constant = [n for n, c in zip(env.feature_names, np.ptp(X, axis=0) == 0) if c]
    explained = set() if TASKS[task].regime_gate else {'buy_blocked'}  # no regime gate: never blocked
    assert set(constant) == explained, f"features that never change (placeholders?): {constant}"
    assert len(env.feature_names) == len(set(env.feature_names))
    n = TASKS[task].n_stocks
    assert len(env.feature_names) == n * (len(MARKET_FEATURES) + len(POSITION_FEATURES)) + len(GLOBAL_FEATURES)


# ---------------------------------------------------------------- the parser never raises, in the env

SYMS = ('S01', 'S02', 'M&M', 'BAJAJ-AUTO')
FRAGMENTS = ['BUY', 'SELL', 'HOLD', 'buy', 'Sell', 'hOlD', ' ', '  ', ';', '\n', '\r\n', '\t', ',', '.', ':', '%',
             '<think>', '</think>', '<THINK>', '</Think>', '<think', 'think>', *SYMS, 's01', 'm&m', 'S01.NS', 'INFY',
             'RELIANCE', '\u0394', '\u682a', '\U0001f680', '\u200b', '\x00', '\ud800', '\u00e9', '0.5', '.5', '50%',
             '1', '1.0', '0', '-0', '-1', '-0.5', '2', '1.5', '100', 'nan', 'NaN', '-nan', 'inf', '-inf', 'Infinity',
             '1e308', '1e309', '1e-400', '4.9e-324', '9' * 400, '0.' + '3' * 300, '1/2', '0,5', '\u00bd',
             '\uff15\uff10%', 'shares', 'of', 'ALL', 'Action:', 'Answer:', '1.', '-', '*', '**', '#', '>', '(', ')',
             '[', ']', '{', '}', '"', "'", '`', '\\']
PREFIXES = ['', '', '', '1. ', '- ', '* ', '**', 'Action: ', 'answer = ', '> ', '  ', '#', 'I will ', '\u2022 ']
VERBS = ['BUY', 'SELL', 'HOLD', 'buy', 'sell', 'Hold', 'BUYING', 'SEL', 'B U Y', '']
SIZES = ['', '0.5', '.25', '1', '1.0', '30%', '0', '-0.5', '1.5', '100', 'nan', 'inf', '-inf', '1e308', '1e-400',
         '4.9e-324', '9' * 40, '0,5', '1/2', '\u00bd', '50 %', '0.5.5', '(0.3)', '0.1,', '\uff15\uff10%']
SYMBOL_TOKENS = [*SYMS, *SYMS, 's02', 'm&m', 'bajaj-auto', 'S01.NS', 'INFY', 'TCS', '', 'shares', '\ud800']


def soup(rng, n):
    return ''.join(rng.choices(FRAGMENTS, k=n))


def nasty_text(rng: random.Random) -> str:
    "Fragment soup, random unicode, 10 kB answers, nested think blocks, and order-like lines with noise in them."
    k = rng.random()
    if k < 0.01: return rng.choice(FRAGMENTS) * rng.randint(500, 3000)  # kilobytes of one thing
    if k < 0.02: return soup(rng, 2500)  # ~10 kB of fragments
    if k < 0.08: return ''.join(map(chr, rng.choices(range(0x110000), k=rng.randint(0, 60))))
    if k < 0.35: return soup(rng, rng.randint(0, 25))
    lines = []
    for _ in range(rng.randint(1, 7)):
        parts = [rng.choice(PREFIXES) + rng.choice(VERBS), rng.choice(SYMBOL_TOKENS), rng.choice(SIZES)]
        if rng.random() < 0.3: parts.insert(rng.randint(0, 3), soup(rng, rng.randint(1, 3)))
        if rng.random() < 0.1: rng.shuffle(parts)
        lines.append(' '.join(parts))
    text = rng.choice([';', '\n', ' ; ', '\r\n', '\n\n']).join(lines)
    r = rng.random()
    if r < 0.2: text = f'<think>{soup(rng, 10)}</think>{text}'
    elif r < 0.25: text = f'<think><think>{soup(rng, 5)}</think>{soup(rng, 5)}</think>{text}'
    elif r < 0.28: text = f'<think>{text}'  # never closed
    return text


def check_parsed(r, symbols):
    "A valid order list, or HOLD (explicit, or with the reason in errors)."
    assert isinstance(r, ParsedAction)
    for o in r.orders:
        assert o.side in ('BUY', 'SELL') and o.symbol in symbols
        assert isinstance(o.fraction, float) and 0 < o.fraction <= 1 and math.isfinite(o.fraction)
    assert all(isinstance(e, str) and e for e in r.errors)
    if not r.orders and not r.hold: assert r.errors, "no order and no HOLD, but no reason given"
    assert isinstance(r.answer, str) and len(r.answer) <= 2000


nasty = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(''.join),
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 4000)).map(lambda t: t[0] * t[1]),
    st.tuples(st.sampled_from(['BUY', 'SELL', 'buy']), st.sampled_from(SYMS + ('XYZ', '')),
              st.one_of(st.floats(), st.integers(-10 ** 400, 10 ** 400), st.text(max_size=8)))
      .map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
    st.recursive(st.text(max_size=20), lambda s: st.tuples(s, s).map(lambda t: f"<think>{t[0]}</think>{t[1]}"),
                 max_leaves=8),
)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=nasty, default=st.sampled_from([None, 'S01']))
def test_parse_action_never_raises_hypothesis(text, default):
    check_parsed(parse_action(text, SYMS, default), SYMS)


def test_parse_action_never_raises_100k():
    rng = random.Random(20240701)
    n_orders = n_errors = 0
    for _ in range(100_000):
        text = nasty_text(rng)
        r = parse_action(text, SYMS, 'S01' if rng.random() < 0.2 else None)
        check_parsed(r, SYMS)
        n_orders += bool(r.orders)
        n_errors += bool(r.errors)
    assert n_orders > 10_000 and n_errors > 10_000  # the stream really exercised both paths


@lru_cache(maxsize=None)
def _fuzz_env(task):
    env = TradingEnv(task, 'train', 'text', _synth())
    env.reset(seed=0)
    return env


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(nasty, st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=5), min_size=1)),
       task=st.sampled_from(list(TASKS)))
def test_env_step_never_raises(text, task):
    env = _fuzz_env(task)
    if env._done: env.reset(seed=len(env.actions))
    syms = env.symbols
    default = syms[0] if TASKS[task].n_stocks == 1 else None
    r = parse_action(text, syms, default)
    cash0 = env.pf.cash
    obs, reward, done, trunc, info = env.step(text)
    assert env.observation_space.contains(obs) and math.isfinite(reward)
    if not r.orders and not r.hold: assert info['parse_errors'], "HOLD without a reason"
    assert info['parse_errors'] == r.errors and info['format_ok'] == r.format_ok
    assert len(info['orders']) == len(r.orders), "an order was silently dropped"
    for f, o in zip(info['orders'], r.orders):
        assert (f['side'], f['symbol']) == (o.side, o.symbol) and f['symbol'] in syms
        assert f['status'] in ('filled', 'reduced', 'rejected')
        if f['status'] != 'filled': assert f['reason']
    if not r.orders: assert env.pf.cash == cash0
    assert info['env_version'] == ENV_VERSION and info['task_version'] == TASKS[task].version


# ---------------------------------------------------------------- caps and daily limits, reported in info

def open_day(env, seed0=0):
    "Reset to an episode whose first day does not block BUYs."
    for seed in range(seed0, seed0 + 200):
        _, info = env.reset(seed=seed)
        if not info['buy_blocked']: return info
    raise AssertionError('no unblocked first day')


@pytest.mark.parametrize('task', ['medium', 'hard'])
def test_buy_beyond_cap_is_reduced_and_reported(synth_panel, task):
    spec = TASKS[task]
    env = TradingEnv(task, 'train', 'text', synth_panel)
    open_day(env)
    sym = env.symbols[3]
    _, _, _, _, info = env.step(f'BUY {sym} 1.0')
    (f,) = info['orders']
    assert f['status'] == 'reduced' and 'cap' in f['reason'] and f['shares'] > 0
    cap_value = spec.max_position * spec.capital
    assert f['shares'] * f['price'] <= cap_value < (f['shares'] + 1) * f['price']  # as many shares as the cap allows
    assert info['positions'][sym] == f['shares']


@pytest.mark.parametrize('task', list(TASKS))
def test_orders_beyond_daily_limit_are_rejected_in_order(synth_panel, task):
    spec = TASKS[task]
    env = TradingEnv(task, 'train', 'text', synth_panel)
    open_day(env)
    syms = env.symbols
    orders = [f'BUY {syms[k % len(syms)]} 0.01' for k in range(spec.max_trades + 3)]
    if task == 'easy': orders[0] = f'BUY {syms[0]} 0.5'  # 1% of 100,000 may buy no whole share of a dear stock
    _, _, _, _, info = env.step('\n'.join(orders))
    got = info['orders']
    assert len(got) == len(orders)
    assert all(f['status'] != 'rejected' for f in got[:spec.max_trades]), got
    for f in got[spec.max_trades:]:
        assert f['status'] == 'rejected' and f['shares'] == 0 and 'daily limit' in f['reason']
    assert env.pf.trades == spec.max_trades


def test_regime_gate_refuses_buys_and_says_so(synth_panel):
    env = TradingEnv('hard', 'train', 'text', synth_panel)
    for seed in range(100):
        obs, info = env.reset(seed=seed)
        for _ in range(TASKS['hard'].days - 1):
            if info['buy_blocked']: break
            obs, _, _, _, info = env.step('HOLD')
        if info['buy_blocked']: break
    assert info['buy_blocked'] and 'RISK-OFF' in obs
    _, _, _, _, info = env.step(f'BUY {env.symbols[0]} 0.1; SELL {env.symbols[1]} 0.5')
    assert info['orders'][0]['status'] == 'rejected' and 'regime' in info['orders'][0]['reason']
    assert info['orders'][1]['status'] == 'rejected' and 'no ' in info['orders'][1]['reason']  # nothing held


def test_risk_off_line_names_the_rule_that_shut_the_gate():
    "The gate shuts when over 70% of stocks fell OR the mean change is below -0.5%: the text says which, from the day's breadth."
    from tradellm.env import _gate_reason
    assert _gate_reason(16, 25, -0.63) == "the mean change was -0.63%, below -0.5%"  # 64% fell: only the mean rule
    assert _gate_reason(18, 25, -0.2) == "18 of 25 stocks fell today, over 70%"  # 72% fell, mean -0.2%
    assert _gate_reason(20, 25, -1.0) == "20 of 25 stocks fell today, over 70%; the mean change was -1.00%, below -0.5%"
    # on real episodes, every RISK-OFF line shows the market line's numbers and a rule that holds for them
    env = TradingEnv('hard', 'train', 'text', _synth())
    seen = 0
    for seed in range(30):
        obs, info = env.reset(seed=seed)
        for _ in range(TASKS['hard'].days):
            if info['buy_blocked']:
                up, down, mean = re.search(r"Market: (\d+) of 25 stocks up, (\d+) down, mean change ([+-][\d.]+)%", obs).groups()
                line = next(x for x in obs.splitlines() if x.startswith('Regime: RISK-OFF'))
                assert line.endswith('BUY orders placed today are refused')
                fell = int(down) / 25 > 0.7
                assert ('stocks fell today' in line) == fell and (f"{down} of 25 stocks fell" in line) == fell
                if abs(float(mean) + 0.5) > 0.005: assert ('mean change was' in line) == (float(mean) < -0.5)  # (shown rounded)
                seen += 1
            obs, _, done, _, info = env.step('HOLD')
            if done: break
    assert seen > 0


# ---------------------------------------------------------------- portfolio invariants under random streams

def check_step_invariants(env, before, info, reward, spec):
    pf, k = env.pf, info['day']
    assert pf.cash >= 0
    assert pf.shares.dtype.kind == 'i' and (pf.shares >= 0).all()
    equity = pf.cash + float(pf.shares @ env._close[k])
    assert info['equity'] == pytest.approx(equity, rel=1e-12) and pf.equity_history[-1] == info['equity']
    assert reward == pytest.approx((info['equity'] - before['equity']) / spec.capital, rel=1e-9, abs=1e-15)
    assert pf.total_cost >= before['total_cost']
    equity_open = before['cash'] + float(before['shares'] @ env._open[k])
    cash = before['cash']
    for f in info['orders']:
        assert f['cost'] >= 0 and f['shares'] >= 0 and float(f['shares']).is_integer()
        if f['status'] == 'rejected':
            assert f['shares'] == 0
            continue
        gross = f['shares'] * f['price']
        assert f['cost'] == pytest.approx(gross * spec.cost, rel=1e-12, abs=1e-12)
        cash += -gross - f['cost'] if f['side'] == 'BUY' else gross - f['cost']
        if f['side'] == 'BUY':
            held = pf.shares[env.symbols.index(f['symbol'])]
            assert held * f['price'] <= spec.max_position * equity_open + f['price'] + 1e-6, "per-stock cap broken"
    assert cash == pytest.approx(pf.cash, rel=1e-12, abs=1e-6), "cash moved by something other than the fills"


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(task=st.sampled_from(list(TASKS)), seed=st.integers(0, 10 ** 6), data=st.data())
def test_portfolio_invariants_in_env(task, seed, data):
    spec = TASKS[task]
    env = _fuzz_env(task)
    env.reset(seed=seed)
    order = st.tuples(st.sampled_from(['BUY', 'SELL']), st.sampled_from(env.symbols),
                      st.sampled_from([0.01, 0.1, 0.33, 0.5, 0.999, 1.0]))
    done = False
    while not done:
        orders = data.draw(st.lists(order, max_size=spec.max_trades + 2))
        before = dict(cash=env.pf.cash, shares=env.pf.shares.copy(), equity=env.pf.equity_history[-1],
                      total_cost=env.pf.total_cost)
        _, reward, done, _, info = env.step('; '.join(f'{s} {y} {f}' for s, y, f in orders) or 'HOLD')
        check_step_invariants(env, before, info, reward, spec)
    m = info['metrics']
    assert 0 <= info['score'] <= 1 and m['trades'] == env.pf.trades and m['costs'] == pytest.approx(env.pf.total_cost)


# ---------------------------------------------------------------- API: errors people can act on, snapshot/restore

def test_bad_arguments_get_clear_errors(synth_panel):
    with pytest.raises(ValueError, match='obs_mode'): TradingEnv('easy', 'train', 'pixels', synth_panel)
    with pytest.raises(ValueError, match='render_mode'): TradingEnv('easy', 'train', 'text', synth_panel, 'human')
    with pytest.raises(ValueError, match='easy, medium, hard'): TradingEnv('extreme', 'train', 'text', synth_panel)
    with pytest.raises(DataError, match='valid splits'): TradingEnv('easy', 'holdout', 'text', synth_panel)
    short = synthetic_panel(n_days=60, symbols=3, start='2024-07-01')
    with pytest.raises(DataError, match='no test window'): TradingEnv('hard', 'test', 'text', short)
    env = TradingEnv('medium', 'train', 'text', synth_panel)
    with pytest.raises(RuntimeError, match='reset'): env.step('HOLD')
    with pytest.raises(ValueError, match='valid starts'): env.reset(options={'start': '2019-01-01'})
    env.reset(seed=0)
    start = env._dates[0]
    with pytest.raises(ValueError, match='not in the data'): env.reset(options={'start': start, 'symbols': ['NOPE']})
    with pytest.raises(ValueError, match='10 stocks'): env.reset(options={'start': start, 'symbols': ['S00']})
    play(env, seed=0, hold=True)
    with pytest.raises(RuntimeError, match='over'): env.step('HOLD')


def test_step_accepts_order_objects(synth_panel):
    from tradellm.market import Order
    env = TradingEnv('medium', 'train', 'numeric', synth_panel)
    open_day(env)
    a, b = env.symbols[:2]
    _, _, _, _, info = env.step([Order('BUY', a, 0.1), Order('BUY', b, float('nan')), Order('BUY', b, 5.0)])
    assert [f['status'] for f in info['orders']] == ['filled', 'rejected', 'rejected']
    assert info['positions'][a] > 0 and info['positions'][b] == 0 and env.pf.cash >= 0
    _, _, _, _, info = env.step([])  # an empty list of orders is a HOLD
    assert info['orders'] == [] and info['parse_errors'] == [] and env.actions[-1] == 'HOLD'


def test_actions_record_replays_orders_made_in_code_exactly(synth_panel):
    "`env.actions` (replayed by GRPO states and written by evaluate) keeps fractions in full: SELL 1/3 of 3 shares is 1 share, SELL 0.333333 is 0."
    from tradellm.market import Order
    env = TradingEnv('easy', 'train', 'text', synth_panel)
    env.reset(seed=3)
    s = env.symbols[0]
    env.pf.set_holding(s, 3, 300.0)
    _, _, _, _, info = env.step([Order('SELL', s, 1 / 3), Order('BUY', s, np.float32(0.25))])
    assert info['orders'][0]['shares'] == 1
    assert env.actions == [f"SELL {s} 0.3333333333333333;BUY {s} 0.25"]
    again = TradingEnv('easy', 'train', 'text', synth_panel)
    again.reset(seed=3)
    again.pf.set_holding(s, 3, 300.0)
    _, _, _, _, info2 = again.step(env.actions[0])
    assert info2['orders'] == info['orders'] and again.pf.equity_history == env.pf.equity_history
    env.step([])
    assert env.actions[-1] == 'HOLD'


def test_info_lists_are_fresh_every_step(synth_panel):
    "A caller that changes an info's lists (a wrapper appending to parse_errors) changes nothing the next step reports."
    env = TradingEnv('easy', 'train', 'numeric', synth_panel)
    env.reset(seed=1)
    *_, info = env.step('HOLD')
    info['parse_errors'].append('a note'), info['orders'].append({}), info['symbols'].append('X')
    *_, info = env.step('HOLD')
    assert info['parse_errors'] == [] and info['orders'] == [] and info['format_ok'] and info['symbols'] == list(env.symbols)


def test_reset_options_pin_the_episode(synth_panel):
    env = TradingEnv('medium', 'val', 'text', synth_panel)
    env.reset(seed=9)
    syms, start = list(env.symbols), env._dates[0]
    obs_a, _ = env.reset(seed=123, options={'start': start, 'symbols': syms})
    assert env._dates[0] == start and list(env.symbols) == syms
    obs_b, _ = env.reset(seed=9)
    assert obs_a == obs_b


@pytest.mark.parametrize('mode', MODES)
def test_snapshot_restore_replays_exactly(synth_panel, mode):
    env = TradingEnv('hard', 'train', mode, synth_panel)
    rng = np.random.default_rng(0)
    env.reset(seed=5)
    for _ in range(7): env.step(random_action(rng, env.symbols))
    state = env.snapshot()
    tail = [random_action(rng, env.symbols) for _ in range(10)]
    first = [env.step(a) for a in tail]
    other = TradingEnv('hard', 'train', mode, synth_panel)  # restoring into a fresh env works too
    for e in (env, other):
        e.restore(state)
        again = [e.step(a) for a in tail]
        for (o1, r1, d1, _, i1), (o2, r2, d2, _, i2) in zip(first, again):
            assert same_obs(o1, o2) and r1 == r2 and d1 == d2 and json.dumps(i1) == json.dumps(i2)


def test_render_ansi_is_the_text_observation(synth_panel):
    env = TradingEnv('easy', 'train', 'numeric', synth_panel, render_mode='ansi')
    text_env = TradingEnv('easy', 'train', 'text', synth_panel)
    env.reset(seed=1)
    obs, _ = text_env.reset(seed=1)
    assert env.render() == obs and env.render().startswith('Day 1 of 20')
    assert TradingEnv('easy', 'train', 'numeric', synth_panel).render() is None


def test_demo_panel_window_is_the_test_split():
    o = np.array([[100.0], [101.0], [102.0]] + [[100.0]] * 18)
    env = TradingEnv('easy', 'test', 'numeric', demo_panel(o, o * 1.01, ['AAA']))
    assert env.n_windows == 1
    env.reset(seed=0)
    assert env._dates[0] == '2024-07-01' and env._open[1, 0] == 101.0


def test_benchmark_script_runs(capsys):
    "benchmarks/bench_env.py keeps working (tiny run: synthetic data, one cell, JSON out)."
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    try:
        import bench_env
    finally:
        sys.path.remove(str(ROOT / 'benchmarks'))
    assert bench_env.main(['--seconds', '0.05', '--synthetic', '--tasks', 'hard', '--modes', 'numeric', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    (cell,) = out['cells']
    assert cell['steps'] > 0 and cell['target'] == 10_000 and out['stocks_v0']['steps_per_s'] > 0
