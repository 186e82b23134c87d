"""Shared fixtures: generated panels always, the real nifty68 data where it lies beside the checkout."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get('TRADELLM_TEST_DATA', ROOT.parent / 'shared' / 'data' / 'nifty68'))


@pytest.fixture(scope='session')
def real_data_dir():
    "The nifty68 folder, or skip when this machine does not have it."
    if not REAL_DATA.is_dir(): pytest.skip(f'real data not found at {REAL_DATA}')
    return REAL_DATA


@pytest.fixture(scope='session')
def real_panel(real_data_dir):
    from tradellm.data import load_panel
    return load_panel(real_data_dir)


@pytest.fixture(scope='session')
def synth_panel():
    "30 random-walk stocks over three years that cover all three splits."
    from tradellm.data import synthetic_panel
    return synthetic_panel(n_days=1100, symbols=tuple(f'S{i:02d}' for i in range(30)), start='2021-01-04', seed=7)


@pytest.fixture(scope='session')
def late_panel():
    """Like `synth_panel`, plus symbols listed late (S00 in train, S01 near the end of train, S02 in val, S03 in test)
    and suspended days (S04, S05, S06 miss a few bars inside train, val and test)."""
    import numpy as np
    from tradellm.data import Panel, synthetic_panel
    p = synthetic_panel(n_days=1100, symbols=tuple(f'S{i:02d}' for i in range(30)), start='2021-01-04', seed=8,
                        first_day={'S00': 200, 'S01': 700, 'S02': 800, 'S03': 930})
    fields = {f: getattr(p, f).copy() for f in ('open', 'high', 'low', 'close', 'volume')}
    for sym, days in (('S04', [400, 401, 402]), ('S05', [850]), ('S06', [1000, 1040])):
        for a in fields.values(): a[days, p.symbols.index(sym)] = np.nan
    return Panel(p.dates, p.symbols, **fields, source='synthetic late listings and gaps')


def play_episode(env, policy, seed=None, options=None):
    "One episode of `policy(env, day) -> action`: (observations, infos, actions), the reset's observation and info first."
    obs, info = env.reset(seed=seed, options=options)
    observations, infos, actions = [obs], [info], []
    done = False
    while not done:
        a = policy(env, len(actions))
        obs, _, done, trunc, info = env.step(a)
        assert not trunc
        observations.append(obs); infos.append(info); actions.append(a)
    return observations, infos, actions


@pytest.fixture(scope='module')
def mlflow_uri(tmp_path_factory):
    "One sqlite MLflow store per test module (creating one takes seconds)."
    from tradellm.tracking import check_tracking
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    check_tracking(uri)
    return uri


def runs_of(uri, **tags):
    "The runs of the tradellm experiment in the store at `uri` whose tags have these values."
    from mlflow import MlflowClient
    from tradellm.tracking import EXPERIMENT
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    flt = ' and '.join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return c.search_runs([exp.experiment_id], flt)
