"""Versions: `env_version` and `task_version` in every `info`, and a stored fingerprint of one reference episode per
task, so that a change of market rules, scoring or observations cannot ship without a version bump.

When a test here fails after a deliberate change: bump `ENV_VERSION` (tradellm/tasks.py, from nbs/03_tasks.ipynb)
or the task's `version`, then run `python tests/test_versions.py` and paste the printed fingerprints into
FINGERPRINTS below (keep the old entries: they document what each version did)."""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tradellm.data import synthetic_panel
from tradellm.env import TradingEnv
from tradellm.tasks import ENV_VERSION, TASKS, REGIME_FALL_SHARE, REGIME_MEAN_CHANGE, WEIGHTS

# "ENV_VERSION/task/task version" -> sha256 of the reference episode (test split of reference_panel(), seed 7)
FINGERPRINTS = {
    '1.0.0/easy/1.0.0': '9343d37b3f474253a546ee73165baa18adf65264929ba3c476e9dba8792da0e9',
    '1.0.0/medium/1.0.0': 'edfe8d8856b286f5ec550c8e97d097162afb6203fe2e9fb15fa17e46963afa3d',
    '1.0.0/hard/1.0.0': '9f2ef4721b3445ede08dd16f6f37e5127a381cd42bb478cbc055ca06b30bc07d',
    # from 2.0.0 the scripted answers also hold two prose order lines, so the parser's rules are in the fingerprint
    '2.0.0/easy/1.0.0': 'f34431433c332c56b1f73cf2f71246f3acade2d7b009e670540dd79e045517b7',
    '2.0.0/medium/1.0.0': '14da805a97f5a69cbdb26044e4634d6359b1040d8675f8699bb62cbb58351703',
    '2.0.0/hard/1.0.0': 'd8d74cae94a3e01d7c622d77c35126560d50008823b59e2f524091d633939f84',
    # 3.0.0 / tasks 2.0.0: the score (risk on capital, pnl, drawdown, alpha over buy-and-hold); observations, fills and
    # rewards of every step hash as under 2.0.0, only the final score and metrics differ
    '3.0.0/easy/2.0.0': '668def63f2661c338d62871db5da1f33f53838550ef7790f918b1199c11d3a38',
    '3.0.0/medium/2.0.0': '7c47b45b022b1a7dcb297f2b6f8aa56031a45dcbec84c7b9ca761ecabfb6bfb0',
    '3.0.0/hard/2.0.0': '8c0349af347f7ebbf0850f04268c84acf31c3790a154be36ffcdb0da25194b75',
}



def _canon(x):
    "JSON-ready, with floats to 10 significant digits (robust to last-bit differences between machines)."
    if isinstance(x, dict): return {str(k): _canon(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)): return [_canon(v) for v in x]
    if isinstance(x, np.ndarray): return _canon(x.tolist())
    if isinstance(x, (bool, np.bool_)): return bool(x)
    if isinstance(x, (int, np.integer)): return int(x)
    if isinstance(x, (float, np.floating)): return float(f'{float(x):.10g}')
    return x


def reference_panel():
    "A fixed panel: 30 synthetic stocks from mid-2023 into 2025 (all of val and test, the end of train)."
    return synthetic_panel(n_days=480, symbols=30, start='2023-06-01', seed=2024)


def scripted_action(k, symbols):
    "A fixed policy that buys, sells, overreaches the cap and the daily limit, and writes a few bad lines."
    s = symbols
    n = len(s)
    if k % 5 == 0: return '\n'.join(f'BUY {s[(k + j) % n]} {0.9 if j == 0 else 0.1 * j:.1f}' for j in range(7))
    if k % 5 == 1: return f'<think>take some profit</think>SELL {s[k % n]} 0.5; BUY {s[(k + 3) % n]} 100%'
    if k % 5 == 2: return (f'buy {s[(k + 1) % n].lower()} 1e-3\nSELL NOSUCH 0.5\nBUY {s[0]} 2\n'
                           f'Buy {s[(k + 2) % n]} only if the trend turns\nSELL 1 share of {s[0]}')  # prose (read since 2.0.0 as errors)
    if k % 5 == 3: return 'HOLD'
    return f'SELL {s[(k + 2) % n]}; sell {s[(k + 4) % n]} 30%'


def reference_record(task, panel=None):
    "Everything a reference episode shows: observations (both modes), fills, rewards, score and the rules."
    panel = panel or reference_panel()
    record = {'task': TASKS[task].as_dict(), 'regime': [REGIME_FALL_SHARE, REGIME_MEAN_CHANGE], 'weights': WEIGHTS,
              'feature_names': None, 'steps': []}
    envs = [TradingEnv(task, 'test', mode, panel) for mode in ('text', 'numeric')]
    (text, info), (vec, _) = [e.reset(seed=7) for e in envs]
    record['feature_names'] = envs[1].feature_names
    record['episode'] = [list(envs[0].symbols), envs[0]._dates[0]]
    record['steps'].append([text, vec, info])
    k, done = 0, False
    while not done:
        a = scripted_action(k, envs[0].symbols)
        text, r, done, _, info = envs[0].step(a)
        vec, r2, _, _, _ = envs[1].step(a)
        assert r == r2
        record['steps'].append([text, vec, r, info])
        k += 1
    record['score'], record['metrics'] = info['score'], info['metrics']
    return _canon(record)


def fingerprint(task) -> str:
    return hashlib.sha256(json.dumps(reference_record(task), sort_keys=True).encode()).hexdigest()


def test_versions_are_semver():
    import re
    for v in [ENV_VERSION] + [t.version for t in TASKS.values()]:
        assert re.fullmatch(r'\d+\.\d+\.\d+', v), v


@pytest.mark.parametrize('mode', ['text', 'numeric'])
@pytest.mark.parametrize('task', list(TASKS))
def test_every_info_carries_versions(task, mode):
    env = TradingEnv(task, 'val', mode, reference_panel())
    _, info = env.reset(seed=1)
    infos, k, done = [info], 0, False
    while not done:
        _, _, done, _, info = env.step(scripted_action(k, env.symbols))
        infos.append(info)
        k += 1
    for info in infos:
        assert info['env_version'] == ENV_VERSION and info['task_version'] == TASKS[task].version
        assert {'date', 'symbols', 'equity', 'cash', 'positions', 'orders'} <= set(info)
    assert {'score', 'metrics'} <= set(infos[-1])
    assert {'sharpe', 'total_return', 'max_drawdown', 'trades', 'buy_and_hold_return', 'risk_score', 'pnl_score',
            'drawdown_score', 'alpha_score', 'seed_score', 'exposure', 'costs'} <= set(infos[-1]['metrics'])


@pytest.mark.parametrize('task', list(TASKS))
def test_behaviour_matches_the_stored_fingerprint(task):
    key = f'{ENV_VERSION}/{task}/{TASKS[task].version}'
    got = fingerprint(task)
    if key not in FINGERPRINTS:
        pytest.fail(f"no stored fingerprint for {key}: a new version. Run `python tests/test_versions.py` and add "
                    f"'{key}': '{got}' to FINGERPRINTS in tests/test_versions.py")
    assert got == FINGERPRINTS[key], (
        f"the reference episode of task {task} changed (observations, fills, rewards or score) but the versions did "
        f"not ({key}). If the change is deliberate, bump ENV_VERSION (nbs/03_tasks.ipynb) or the task's version, then "
        f"run `python tests/test_versions.py` and add the new fingerprint to FINGERPRINTS. If it is not, it is a bug.")


def test_fingerprint_sees_small_changes():
    # the fingerprint is only worth storing if a one-paisa change of one price changes it
    p = reference_panel()
    a = json.dumps(reference_record('easy', p), sort_keys=True)
    env = TradingEnv('easy', 'test', 'text', p)
    env.reset(seed=7)
    day = int(p.dates.searchsorted(np.datetime64(env._dates[5])))
    opens = p.open.copy()
    opens[day, p.symbols.index(env.symbols[0])] += 0.01
    b = json.dumps(reference_record('easy', dataclasses.replace(p, open=opens)), sort_keys=True)
    assert a != b


if __name__ == '__main__':
    for task in TASKS:
        print(f"    '{ENV_VERSION}/{task}/{TASKS[task].version}': '{fingerprint(task)}',")
