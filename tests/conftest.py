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
