"""tradellm.data on broken inputs, both file formats, date alignment, resumable fetch and `tradellm data`."""
import dataclasses
import json
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

import tradellm.data as data
from tradellm.data import (DataError, Panel, Problem, SPLITS, cli_data, episode_starts, fetch, full_window_symbols,
                           load_panel, panel_from_frames, panel_summary, read_bars, resolve_data_dir, save_panel,
                           split_slice, symbol_from_filename, synthetic_panel, validate_bars, yahoo_frame)


CACHE_DIR = data.cache_dir   # before the fixture below replaces it


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "No test sees the user's data or cache, nor another test's cached panels."
    monkeypatch.delenv('TRADELLM_DATA', raising=False)
    monkeypatch.setattr(data, 'cache_dir', lambda: tmp_path / 'cache' / 'prices')
    monkeypatch.chdir(tmp_path)
    data.clear_panel_cache()
    yield
    data.clear_panel_cache()


def bars(n=10, symbol='INFY', seed=0):
    "n valid synthetic bars of one symbol, from 2023-01-02 (Monday) on business days."
    return synthetic_panel(n, symbols=[symbol], seed=seed).frame(symbol)


def write_nifty(folder, symbol, df):
    "Write bars in the nifty68 format: `timestamp,open,high,low,close,volume` with +05:30 timestamps."
    folder.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    out.index = pd.DatetimeIndex(out.index).strftime('%Y-%m-%d 00:00:00+05:30')
    out.rename_axis('timestamp').to_csv(folder / f'{symbol}_daily.csv')
    return folder / f'{symbol}_daily.csv'


def day(i): return pd.bdate_range('2023-01-02', periods=i + 1)[-1].date().isoformat()


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, problems
    return found[0]


# ---- whole-file errors: always raise, naming the symbol -------------------------------------------------

def test_empty_file_raises_naming_symbol(tmp_path):
    write_nifty(tmp_path / 'd', 'TCS', bars(5, 'TCS'))
    (tmp_path / 'd' / 'INFY_daily.csv').write_text('')
    with pytest.raises(DataError, match=r'INFY: .*INFY_daily.csv is empty') as e:
        load_panel(tmp_path / 'd')
    assert [(p.symbol, p.kind, p.action) for p in e.value.problems] == [('INFY', 'empty_file', 'error')]


def test_header_only_file_raises(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'INFY_daily.csv').write_text('timestamp,open,high,low,close,volume\n')
    with pytest.raises(DataError, match=r'INFY: no bars .*empty file'):
        load_panel(tmp_path / 'd')


def test_missing_column_raises_naming_symbol_and_column(tmp_path):
    write_nifty(tmp_path / 'd', 'INFY', bars().drop(columns='volume'))
    with pytest.raises(DataError, match=r'INFY: missing column volume') as e:
        load_panel(tmp_path / 'd')
    assert e.value.problems[0].kind == 'missing_column'


def test_unparseable_dates_raise_naming_symbol_value_and_row(tmp_path):
    f = write_nifty(tmp_path / 'd', 'INFY', bars(6))
    lines = f.read_text().splitlines()
    lines[4] = 'yesterday' + lines[4][len('2023-01-05 00:00:00+05:30'):]
    f.write_text('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match=r"INFY: 1 unparseable date in column 'timestamp'.*first 'yesterday' on data row 4"):
        load_panel(tmp_path / 'd')
    with pytest.raises(DataError, match='unparseable'):   # strict mode too
        load_panel(tmp_path / 'd', strict=True)


def test_folder_without_data_files(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'README.md').write_text('no prices here')
    with pytest.raises(DataError, match=r'no data files.*tradellm data fetch'):
        load_panel(tmp_path / 'd')


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r'no such folder.*tradellm data fetch'):
        load_panel(tmp_path / 'nowhere')


def test_unknown_symbol_names_it_and_lists_what_is_there(tmp_path):
    write_nifty(tmp_path / 'd', 'INFY', bars())
    with pytest.raises(DataError, match=r'TCSX: not in .*it has INFY.*--symbols TCSX') as e:
        load_panel(tmp_path / 'd', symbols=['INFY', 'TCSX'])
    assert e.value.problems[0].symbol == 'TCSX'


def test_two_files_for_one_symbol(tmp_path):
    write_nifty(tmp_path / 'd', 'INFY', bars())
    bars().rename_axis('Date').to_csv(tmp_path / 'd' / 'INFY.NS.csv')
    with pytest.raises(DataError, match=r'INFY: two files'):
        load_panel(tmp_path / 'd')


def test_unreadable_parquet(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'INFY.parquet').write_bytes(b'not a parquet file')
    with pytest.raises(DataError, match=r'INFY: cannot read'):
        load_panel(tmp_path / 'd')


# ---- bad bars: dropped (default) or raised (strict), always reported with symbol and date -------------

def broken(tmp_path, change):
    df = bars(10)
    change(df)
    return write_nifty(tmp_path / 'd', 'INFY', df).parent


def check_dropped(tmp_path, change, kind, i, text):
    folder = broken(tmp_path, change)
    p = load_panel(folder)
    prob = only(p.problems, kind)
    assert (prob.symbol, prob.date, prob.action) == ('INFY', day(i), 'dropped')
    assert prob.message.startswith('INFY: ') and day(i) in prob.message
    assert pd.Timestamp(day(i)) not in p.frame('INFY').index
    assert len(p.frame('INFY')) == 9
    with pytest.raises(DataError, match=rf'INFY: .*{text}.*first on {day(i)}'):
        load_panel(folder, strict=True)


def test_nan_bar_dropped_and_reported(tmp_path):
    check_dropped(tmp_path, lambda df: df.iloc.__setitem__((3, 1), np.nan), 'missing_value', 3, 'missing')


def test_non_numeric_value_counts_as_missing(tmp_path):
    f = write_nifty(tmp_path / 'd', 'INFY', bars(10))
    lines = f.read_text().splitlines()
    cells = lines[3].split(','); cells[4] = 'n/a'; lines[3] = ','.join(cells)
    f.write_text('\n'.join(lines) + '\n')
    assert only(load_panel(tmp_path / 'd').problems, 'missing_value').date == day(2)


@pytest.mark.parametrize('column', [1, 4])  # high, volume
def test_infinite_value_dropped_and_reported(tmp_path, column):
    "An 'inf' cell (a vendor's divide by zero) passed validation and then broke the environment; it is a bad bar."
    check_dropped(tmp_path, lambda df: df.iloc.__setitem__((4, column), np.inf), 'infinite_value', 4, 'infinite')


def test_problems_are_announced_once_per_load(tmp_path):
    df = bars(10)
    df.iloc[3, 1] = np.nan
    write_nifty(tmp_path / 'd', 'INFY', df)
    with pytest.warns(data.DataWarning, match=r"1 data problem found \(1 of them bad bars that were dropped\).*INFY: 1 bar "
                                               r".*tradellm data check"):
        p = load_panel(tmp_path / 'd')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert load_panel(tmp_path / 'd') is p  # the cached panel: already announced
        write_nifty(tmp_path / 'clean', 'INFY', bars(10))
        load_panel(tmp_path / 'clean')  # clean data: no warning


@pytest.mark.parametrize('stamp, date', [
    ('2024-01-01 18:30:00+00:00', '2024-01-02'),  # UTC evening: the next day in India
    ('2024-01-01T18:30:00Z', '2024-01-02'),
    ('2024-01-02 00:00:00+05:30', '2024-01-02'),  # the nifty68 files: already Indian time
    ('2024-01-01 23:00:00-05:00', '2024-01-02'),  # New York evening: 09:30 the next morning in India
    ('2024-01-02', '2024-01-02'),  # a plain date is that date
    ('2024-01-02 00:00:00', '2024-01-02'),
])
def test_timestamps_with_a_zone_give_the_date_in_india(tmp_path, stamp, date):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'INFY_daily.csv').write_text(f'timestamp,open,high,low,close,volume\n{stamp},100,101,99,100.5,1000\n')
    assert load_panel(tmp_path / 'd').dates[0] == pd.Timestamp(date)


def test_utc_parquet_timestamps_give_the_date_in_india(tmp_path):
    "Bars stored in UTC (18:30 the evening before) were put on the previous day, misaligning them with other stocks."
    df = bars(5).rename_axis('timestamp').reset_index()
    df['timestamp'] = df['timestamp'].dt.tz_localize('Asia/Kolkata').dt.tz_convert('UTC')
    (tmp_path / 'd').mkdir()
    df.to_parquet(tmp_path / 'd' / 'INFY.parquet')
    assert list(load_panel(tmp_path / 'd').dates) == list(bars(5).index)


def test_zero_price_dropped_and_reported(tmp_path):
    check_dropped(tmp_path, lambda df: df.iloc.__setitem__((5, 2), 0.0), 'non_positive_price', 5, 'zero or negative')


def test_negative_price_dropped_and_reported(tmp_path):
    def change(df): df.iloc[6, :4] = -df.iloc[6, :4]
    check_dropped(tmp_path, change, 'non_positive_price', 6, 'zero or negative')


def test_high_below_close_dropped_and_reported(tmp_path):
    def change(df):
        c = df.iloc[4, 3]
        df.iloc[4, :4] = [c - 2, c - 1, c - 3, c]   # open, high, low, close: only high < close is wrong
    check_dropped(tmp_path, change, 'high_below_close', 4, r'1 bar with high < close')
    p = load_panel(tmp_path / 'd')
    assert [x.kind for x in p.problems] == ['high_below_close']


def test_low_above_open_dropped(tmp_path):
    def change(df): df.iloc[7, 2] = df.iloc[7, 0] + 0.5   # low above open
    folder = broken(tmp_path, change)
    assert only(load_panel(folder).problems, 'low_above_open').date == day(7)


def test_strict_message_counts_bars(tmp_path):
    df = bars(10)
    for i in (2, 5, 8): df.iloc[i, 1] = df.iloc[i, 3] - 0.5; df.iloc[i, 0] = df.iloc[i, 2] = df.iloc[i, 3] - 1
    write_nifty(tmp_path / 'd', 'INFY', df)
    with pytest.raises(DataError, match=rf'INFY: 3 bars with high < close, first on {day(2)}') as e:
        load_panel(tmp_path / 'd', strict=True)
    assert e.value.problems[0].date == day(2)


def test_duplicate_dates_keep_first_and_report(tmp_path):
    df = bars(10)
    dup = df.iloc[[4]] * 1.01
    write_nifty(tmp_path / 'd', 'INFY', pd.concat([df.iloc[:6], dup, df.iloc[6:]]))
    p = load_panel(tmp_path / 'd')
    prob = only(p.problems, 'duplicate_date')
    assert (prob.symbol, prob.date, prob.action) == ('INFY', day(4), 'dropped')
    assert len(p.frame('INFY')) == 10
    assert p.frame('INFY').close.iloc[4] == df.close.iloc[4]   # the first bar of the date is kept
    with pytest.raises(DataError, match=rf'INFY: 1 duplicate date, first on {day(4)}'):
        load_panel(tmp_path / 'd', strict=True)


def test_unsorted_rows_are_sorted_and_reported(tmp_path):
    df = bars(10)
    write_nifty(tmp_path / 'd', 'INFY', df.iloc[[0, 1, 3, 2, 4, 5, 6, 7, 8, 9]])
    p = load_panel(tmp_path / 'd')
    assert only(p.problems, 'unsorted_dates').date == day(2)
    np.testing.assert_array_equal(p.frame('INFY').close, df.close)


def test_fifty_percent_overnight_drop_is_reported_not_changed(tmp_path):
    df = bars(10)
    df.iloc[6:, :4] = df.iloc[6:, :4] / 2          # unadjusted 1:1 bonus issue on day 6
    write_nifty(tmp_path / 'd', 'INFY', df)
    p = load_panel(tmp_path / 'd')
    prob = only(p.problems, 'large_move')
    assert (prob.symbol, prob.date, prob.action) == ('INFY', day(6), 'reported')
    assert 'INFY: ' in prob.message and 'split' in prob.message and '-5' in prob.message
    np.testing.assert_array_equal(p.frame('INFY').close, df.close)   # nothing changed
    with pytest.raises(DataError, match=rf'INFY: .*{day(6)}'):
        load_panel(tmp_path / 'd', strict=True)


def test_gap_open_beyond_40_percent_is_reported(tmp_path):
    df = bars(10)
    prev = df.close.iloc[4]
    df.iloc[5, :4] = [prev * 0.5, prev * 1.01, prev * 0.5, prev]   # opens 50% down, recovers by the close
    write_nifty(tmp_path / 'd', 'INFY', df)
    prob = only(load_panel(tmp_path / 'd').problems, 'large_move')
    assert prob.date == day(5) and 'opened -50%' in prob.message


def test_zero_volume_filler_bars_dropped_and_reported(tmp_path):
    df = bars(10)
    prev = df.close.iloc[3]
    df.iloc[4] = [prev, prev, prev, prev, 0.0]
    df.iloc[5] = [prev, prev, prev, prev, 0.0]
    write_nifty(tmp_path / 'd', 'INFY', df)
    p = load_panel(tmp_path / 'd')
    prob = only(p.problems, 'zero_volume_filler')
    assert (prob.symbol, prob.date, prob.action) == ('INFY', day(4), 'dropped')
    assert prob.message.startswith('INFY: 2 bars with zero volume') and day(5) in prob.message
    assert len(p.frame('INFY')) == 8
    assert pd.Timestamp(day(4)) not in p.dates and pd.Timestamp(day(5)) not in p.dates


def test_zero_volume_bar_that_moved_is_kept_and_reported(tmp_path):
    df = bars(10)
    df.iloc[4, 4] = 0.0
    write_nifty(tmp_path / 'd', 'INFY', df)
    p = load_panel(tmp_path / 'd')
    assert (only(p.problems, 'zero_volume').date, only(p.problems, 'zero_volume').action) == (day(4), 'reported')
    assert len(p.frame('INFY')) == 10


def test_symbol_with_no_valid_bar_is_an_error():
    df = bars(3)
    df['close'] = np.nan
    with pytest.raises(DataError, match='INFY: no valid bar'):
        panel_from_frames({'INFY': df})


def test_validate_bars_on_clean_bars_finds_nothing():
    clean, problems = validate_bars(bars(50), 'INFY')
    assert problems == [] and len(clean) == 50


# ---- formats ----------------------------------------------------------------------------------------------

def test_nifty68_timestamps_give_the_local_calendar_date(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'INFY_daily.csv').write_text(
        'timestamp,open,high,low,close,volume\n'
        '2020-10-06 00:00:00+05:30,1055.0,1060.0,1031.35,1055.75,9090819\n'
        '2020-10-07 00:00:00+05:30,1044.9,1072.0,1035.5,1066.55,9284060\n')
    p = load_panel(tmp_path / 'd')
    assert p.symbols == ['INFY'] and p.dates.tz is None
    assert list(p.dates) == [pd.Timestamp('2020-10-06'), pd.Timestamp('2020-10-07')]
    assert p.close[:, 0].tolist() == [1055.75, 1066.55] and p.volume[1, 0] == 9284060


def test_yahoo_format(tmp_path):
    (tmp_path / 'd').mkdir()
    text = ('Date,Open,High,Low,Close,Adj Close,Volume\n'
            '2024-01-01,1500.0,1510.0,1490.0,1505.0,1480.2,100\n'
            '2024-01-02,1505.0,1520.0,1500.0,1515.0,1490.1,200\n')
    (tmp_path / 'd' / 'INFY.NS.csv').write_text(text)
    (tmp_path / 'd' / 'TCS.csv').write_text(text.replace(',15', ',35'))
    p = load_panel(tmp_path / 'd')
    assert p.symbols == ['INFY', 'TCS'] and p.problems == []
    assert p.close[:, 0].tolist() == [1505.0, 1515.0]       # Close, not Adj Close
    assert p.open[1, 1] == 3505.0 and p.high[1, 1] == 3520.0 and p.volume[1, 0] == 200


def test_yfinance_three_line_header(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'INFY.NS.csv').write_text(
        'Price,Adj Close,Close,High,Low,Open,Volume\nTicker,INFY.NS,INFY.NS,INFY.NS,INFY.NS,INFY.NS,INFY.NS\nDate,,,,,,\n'
        '2024-01-01,1480.2,1505.0,1510.0,1490.0,1500.0,100\n')
    p = load_panel(tmp_path / 'd')
    assert (p.symbols, p.open[0, 0], p.close[0, 0], p.high[0, 0]) == (['INFY'], 1500.0, 1505.0, 1510.0)


def test_parquet_with_tz_aware_timestamps(tmp_path):
    df = bars(5).rename_axis('timestamp').reset_index()
    df['timestamp'] = df['timestamp'].dt.tz_localize('Asia/Kolkata')
    (tmp_path / 'd').mkdir()
    df.to_parquet(tmp_path / 'd' / 'INFY.parquet')
    p = load_panel(tmp_path / 'd')
    assert list(p.dates) == list(bars(5).index) and p.dates.tz is None
    np.testing.assert_array_equal(p.close[:, 0], bars(5).close)


@pytest.mark.parametrize('fmt', ['nifty68', 'yahoo', 'parquet'])
def test_save_and_load_round_trip(tmp_path, fmt):
    panel = synthetic_panel(30, first_day={'BBB': 7})
    back = load_panel(save_panel(panel, tmp_path / fmt, fmt))
    assert back.symbols == panel.symbols and (back.dates == panel.dates).all()
    for f in data.FIELDS: np.testing.assert_array_equal(getattr(back, f), getattr(panel, f))
    some = load_panel(tmp_path / fmt, symbols=['CCC', 'AAA'])
    assert some.symbols == ['CCC', 'AAA'] and (some.close[:, 1] == panel.close[:, 0]).all()
    assert load_panel(tmp_path / fmt, symbols='BBB').symbols == ['BBB']
    with pytest.raises(ValueError, match='unknown format'):
        save_panel(panel, tmp_path / 'x', 'xlsx')


def test_symbol_from_filename():
    assert [symbol_from_filename(n) for n in ('INFY_daily.csv', 'INFY.NS.csv', 'M&M.csv', 'BAJAJ-AUTO.parquet', 'TCS.BO.pq')] \
        == ['INFY', 'INFY', 'M&M', 'BAJAJ-AUTO', 'TCS']


def test_read_bars_single_file(tmp_path):
    f = write_nifty(tmp_path, 'INFY', bars(4))
    assert read_bars(f).index.tolist() == bars(4).index.tolist()
    assert load_panel(f).symbols == ['INFY']


# ---- alignment by date --------------------------------------------------------------------------------------

def test_two_symbols_with_different_calendars_align_by_date(tmp_path):
    a = bars(10, 'AAA')
    b = bars(12, 'BBB', seed=1).iloc[[0, 1, 4, 5, 6, 8, 9, 10, 11]]   # BBB misses days 2, 3, 7 and trades two more
    write_nifty(tmp_path / 'd', 'AAA', a)
    write_nifty(tmp_path / 'd', 'BBB', b)
    p = load_panel(tmp_path / 'd')
    assert list(p.dates) == list(bars(12).index)             # union of both calendars
    assert p.valid[:, 1].tolist() == [True, True, False, False, True, True, True, False, True, True, True, True]
    assert p.valid[:, 0].tolist() == [True] * 10 + [False] * 2
    for d in b.index:                                       # every bar sits on its own date, never shifted by row
        assert p.close[p.dates.get_loc(d), 1] == b.close[d]
    row = p.dates.get_loc(pd.Timestamp(day(4)))
    assert (p.close[row, 0], p.close[row, 1]) == (a.close.iloc[4], b.close[pd.Timestamp(day(4))])


def test_panel_select_and_col():
    p = synthetic_panel(20)
    q = p.select(['CCC', 'AAA'])
    assert q.symbols == ['CCC', 'AAA'] and (q.close[:, 0] == p.close[:, 2]).all()
    with pytest.raises(DataError, match='ZZZ: not in this panel'):
        p.col('ZZZ')
    assert load_panel(p, symbols=['BBB']).symbols == ['BBB']
    assert load_panel(p) is p
    with pytest.raises(DataError, match='shape'):
        Panel(p.dates, p.symbols, p.open[:5], p.high, p.low, p.close, p.volume)
    assert repr(p) == 'Panel(3 symbols, 20 days, 2023-01-02..2023-01-27)'


# ---- lookup and cache ---------------------------------------------------------------------------------------

def test_lookup_without_data_says_how_to_get_it():
    with pytest.raises(DataError) as e:
        load_panel()
    msg = str(e.value)
    assert 'tradellm data fetch' in msg and '--data PATH' in msg and 'TRADELLM_DATA' in msg


def test_lookup_env_then_cache(tmp_path, monkeypatch):
    write_nifty(tmp_path / 'cache' / 'prices', 'CACHED', bars(5, 'CACHED'))
    assert load_panel().symbols == ['CACHED']
    write_nifty(tmp_path / 'env', 'ENV', bars(5, 'ENV'))
    monkeypatch.setenv('TRADELLM_DATA', str(tmp_path / 'env'))
    assert resolve_data_dir() == (tmp_path / 'env').resolve()
    assert load_panel().symbols == ['ENV']
    assert load_panel(tmp_path / 'cache' / 'prices').symbols == ['CACHED']   # an explicit path wins
    monkeypatch.setenv('TRADELLM_DATA', str(tmp_path / 'empty'))
    assert load_panel().symbols == ['CACHED']


def test_cache_shares_one_load_and_reloads_changed_files(tmp_path):
    f = write_nifty(tmp_path / 'd', 'INFY', bars(10))
    p1 = load_panel(tmp_path / 'd')
    assert load_panel(tmp_path / 'd') is p1
    assert load_panel(tmp_path / 'd', cache=False) is not p1
    write_nifty(tmp_path / 'd', 'INFY', bars(12))
    import os
    os.utime(f, ns=(time.time_ns() + 10**9,) * 2)
    p2 = load_panel(tmp_path / 'd')
    assert p2 is not p1 and len(p2.dates) == 12


def test_cache_keeps_a_bounded_number_of_panels(tmp_path, monkeypatch):
    monkeypatch.setattr(data, '_MAX_CACHED', 2)
    for name in 'abc': write_nifty(tmp_path / name, 'INFY', bars(5))
    first = load_panel(tmp_path / 'a')
    load_panel(tmp_path / 'b'); load_panel(tmp_path / 'c')
    assert len(data._PANELS) == 2 and load_panel(tmp_path / 'a') is not first


def test_cache_dir_is_data_prices_of_the_checkout():
    root = data.project_root()
    assert root is not None and (root / 'settings.ini').exists()
    assert CACHE_DIR() == root / 'data' / 'prices'


def test_real_data_loads_fast(real_data_dir):
    data.clear_panel_cache()
    t0 = time.process_time()            # CPU seconds: wall time on a busy 2-core CI runner says little
    p = load_panel(real_data_dir)
    assert time.process_time() - t0 < 2.0
    assert len(p.symbols) == 68 and p.problems == []
    assert sorted(p.symbols) == sorted(data.NIFTY68)


# ---- splits and windows -------------------------------------------------------------------------------------

def test_splits_are_the_designed_periods():
    assert SPLITS == {'train': ('2020-10-01', '2023-12-31'), 'val': ('2024-01-01', '2024-06-30'), 'test': ('2024-07-01', None)}
    p = synthetic_panel(1110, start='2020-10-01')
    tr, va, te = (split_slice(p, s) for s in SPLITS)
    assert tr.start == 0 and tr.stop == va.start and va.stop == te.start and te.stop == 1110
    assert p.dates[tr.stop - 1] == pd.Timestamp('2023-12-29') and p.dates[va.start] == pd.Timestamp('2024-01-01')
    assert p.dates[va.stop - 1] == pd.Timestamp('2024-06-28') and p.dates[te.start] == pd.Timestamp('2024-07-01')
    with pytest.raises(DataError, match='valid splits: train, val, test'):
        split_slice(p, 'dev')


def test_split_outside_the_panel_is_empty():
    p = synthetic_panel(50, start='2025-01-01')
    s = split_slice(p, 'train')
    assert s.start == s.stop == 0
    assert len(episode_starts(p, 'train', 10, 1)) == 0
    with pytest.raises(DataError, match='at least 1 day'):
        episode_starts(p, 'test', 0)


def test_full_window_and_episode_starts_respect_listing_days():
    p = synthetic_panel(100, symbols=4, first_day={'S01': 30, 'S03': 60})
    assert full_window_symbols(p, 0, 30).tolist() == [0, 2]
    assert full_window_symbols(p, 30, 30).tolist() == [0, 1, 2]
    assert full_window_symbols(p, 60, 40).tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match='does not fit'):
        full_window_symbols(p, 61, 40)
    starts = episode_starts(p, ('2023-01-01', None), 20, min_symbols=4)
    assert starts.tolist() == list(range(60, 81))


def test_a_panel_owns_read_only_arrays():
    "A panel copies what it is built from and refuses changes in place (load_panel's cache and every env share it)."
    close = np.full((3, 2), 100.0)
    p = Panel(pd.bdate_range('2024-01-01', periods=3), ['A', 'B'], close, close, close, close, close)
    close[0, 0] = 1.0  # the caller's array stays the caller's
    assert p.close[0, 0] == 100.0 and p.open[0, 0] == 100.0
    for f in ('open', 'high', 'low', 'close', 'volume'):
        with pytest.raises(ValueError, match='read-only'): getattr(p, f)[1, 1] = 0.0
    q = dataclasses.replace(p, close=np.full((3, 2), 50.0))  # the way to change prices: a new panel
    assert q.close[0, 0] == 50.0 and p.close[0, 0] == 100.0 and not q.close.flags.writeable


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 25), st.integers(1, 4))
def test_episode_starts_match_a_slow_loop(seed, length, k):
    rng = np.random.default_rng(seed)
    p = synthetic_panel(120, symbols=4, start='2023-10-02', seed=seed % 100)
    close = p.close.copy()
    close[rng.random(close.shape) < 0.03] = np.nan      # random holes
    p = dataclasses.replace(p, close=close)
    for split in SPLITS:
        s = split_slice(p, split)
        slow = [t for t in range(s.start, s.stop - length + 1) if (~np.isnan(p.close[t:t + length])).all(0).sum() >= k]
        assert episode_starts(p, split, length, k).tolist() == slow
        for t in slow[:3]:
            assert full_window_symbols(p, t, length).tolist() == np.flatnonzero((~np.isnan(p.close[t:t + length])).all(0)).tolist()


# ---- fetch ----------------------------------------------------------------------------------------------------

COLUMNS = ['Adj Close', 'Close', 'High', 'Low', 'Open', 'Volume']   # yfinance's order


class FakeYahoo:
    "Records calls; answers like `yfinance.download(..., auto_adjust=False)` for NSE tickers."
    def __init__(self, fail=(), missing=(), error=None):
        self.calls, self.fail, self.missing, self.error = [], set(fail), set(missing), error

    def __call__(self, tickers, start=None, end=None, **kw):
        self.calls.append((list(tickers), start, end, kw))
        if self.error: raise self.error
        days = pd.bdate_range(start, pd.Timestamp(end) - pd.Timedelta(days=1), name='Date')
        tickers = [t for t in tickers if t not in self.missing]
        cols = pd.MultiIndex.from_product([COLUMNS, tickers], names=['Price', 'Ticker'])
        frame = pd.DataFrame(index=days, columns=cols, dtype=float)
        for i, t in enumerate(tickers):
            close = 100.0 + i + (days - pd.Timestamp('2024-01-01')).days.to_numpy()
            frame[('Close', t)], frame[('Adj Close', t)] = close, close * 0.98
            frame[('Open', t)], frame[('High', t)], frame[('Low', t)] = close - 0.5, close + 1, close - 1
            frame[('Volume', t)] = 1000.0
            if t in self.fail: frame.loc[:, (slice(None), t)] = np.nan   # yfinance leaves failed tickers all-NaN
        return frame


def test_fetch_writes_yahoo_csvs_and_is_resumable(tmp_path):
    out = tmp_path / 'prices'
    fake = FakeYahoo()
    r = fetch(['INFY', 'TCS', 'M&M'], out=out, start='2024-01-01', end='2024-02-01', download=fake, batch=2, progress=False)
    assert r['fetched'] == ['INFY', 'TCS', 'M&M'] and r['failed'] == {} and r['calls'] == 2 == len(fake.calls)
    assert fake.calls[0][:3] == (['INFY.NS', 'TCS.NS'], '2024-01-01', '2024-02-01')
    assert fake.calls[0][3]['auto_adjust'] is False
    text = (out / 'INFY.csv').read_text().splitlines()
    assert text[0] == 'Date,Open,High,Low,Close,Adj Close,Volume'
    assert text[1] == '2024-01-01,99.5,101.0,99.0,100.0,98.0,1000.0'
    # everything complete: no download at all
    r = fetch(['INFY', 'TCS', 'M&M'], out=out, start='2024-01-01', end='2024-02-01', download=fake, progress=False)
    assert r['skipped'] == ['INFY', 'TCS', 'M&M'] and r['calls'] == 0 and len(fake.calls) == 2
    # a week later: only the missing tail, in one call for the three stale symbols
    r = fetch(['INFY', 'TCS', 'M&M'], out=out, start='2024-01-01', end='2024-02-08', download=fake, progress=False)
    assert r['updated'] == ['INFY', 'TCS', 'M&M'] and len(fake.calls) == 3
    assert fake.calls[-1][:3] == (['INFY.NS', 'TCS.NS', 'M&M.NS'], '2024-02-01', '2024-02-08')
    p = load_panel(out)
    assert p.symbols == ['INFY', 'M&M', 'TCS'] and p.problems == []
    assert len(p.dates) == 28 and p.dates[-1] == pd.Timestamp('2024-02-07')
    assert p.close[-1, 0] == 100.0 + 37                     # the appended day, from the tail download
    # a new symbol is fetched from the start; the cached ones are skipped
    r = fetch(['INFY', 'SBIN'], out=out, start='2024-01-01', end='2024-02-08', download=fake, progress=False)
    assert (r['fetched'], r['skipped']) == (['SBIN'], ['INFY']) and fake.calls[-1][:2] == (['SBIN.NS'], '2024-01-01')


def test_fetch_reports_failures_and_goes_on(tmp_path):
    fake = FakeYahoo(fail={'BAD.NS'}, missing={'GONE.NS'})
    r = fetch(['INFY', 'BAD', 'GONE'], out=tmp_path, start='2024-01-01', end='2024-01-10', download=fake, progress=False)
    assert r['fetched'] == ['INFY'] and set(r['failed']) == {'BAD', 'GONE'}
    assert not (tmp_path / 'BAD.csv').exists()
    r = fetch(['TCS'], out=tmp_path, start='2024-01-01', end='2024-01-10',
              download=FakeYahoo(error=ConnectionError('network is unreachable')), progress=False)
    assert 'network is unreachable' in r['failed']['TCS']


def test_fetch_reports_a_malformed_download(tmp_path):
    def flat_without_volume(tickers, **kw):
        return pd.DataFrame({'Open': [1.0], 'High': [2.0], 'Low': [0.5], 'Close': [1.5]},
                            index=pd.DatetimeIndex(['2024-01-01'], name='Date'))
    r = fetch(['INFY'], out=tmp_path, start='2024-01-01', end='2024-01-03', download=flat_without_volume, progress=False)
    assert 'INFY.NS: the download has no column Volume' in r['failed']['INFY']


def test_fetch_holiday_tail_keeps_file(tmp_path):
    fetch(['INFY'], out=tmp_path, start='2024-01-01', end='2024-01-10', download=FakeYahoo(), progress=False)
    before = (tmp_path / 'INFY.csv').read_text()
    r = fetch(['INFY'], out=tmp_path, start='2024-01-01', end='2024-01-11', download=lambda *a, **k: pd.DataFrame(), progress=False)
    assert r['skipped'] == ['INFY'] and (tmp_path / 'INFY.csv').read_text() == before


def test_yahoo_frame_single_ticker_shapes():
    days = pd.DatetimeIndex(['2024-01-01', '2024-01-02'], name='Date').tz_localize('Asia/Kolkata')
    flat = pd.DataFrame({'Open': [1.0, 2], 'High': [2.0, 3], 'Low': [0.5, 1], 'Close': [1.5, 2.5],
                         'Adj Close': [1.4, 2.4], 'Volume': [10.0, 20]}, index=days)
    out = yahoo_frame(flat, 'INFY.NS')
    assert out.index.tz is None and out.index[0] == pd.Timestamp('2024-01-01') and out.columns.tolist() == list(data.YAHOO_COLUMNS)
    assert len(yahoo_frame(None, 'INFY.NS')) == 0
    with pytest.raises(DataError, match='INFY.NS: the download has no column Volume'):
        yahoo_frame(flat.drop(columns='Volume'), 'INFY.NS')
    by_ticker = pd.concat({'INFY.NS': flat}, axis=1)         # group_by='ticker' puts the ticker first
    assert yahoo_frame(by_ticker, 'INFY.NS').Close.tolist() == [1.5, 2.5]
    assert len(yahoo_frame(by_ticker, 'TCS.NS')) == 0


# ---- command line -----------------------------------------------------------------------------------------

def run_cli(argv, capsys):
    rc = cli_data(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_check_json_on_generated_data(tmp_path, capsys):
    save_panel(synthetic_panel(30, symbols=4, first_day={'S02': 10, 'S03': 10}), tmp_path / 'd')
    rc, out, _ = run_cli(['check', str(tmp_path / 'd'), '--json'], capsys)
    s = json.loads(out)
    assert rc == 0 and s['ok'] and s['n_symbols'] == 4 and s['errors'] == [] and s['problems'] == []
    assert [(r['n_symbols'], r['start'], r['end'], r['bars']) for r in s['ranges']] == \
        [(2, '2023-01-02', '2023-02-10', 60), (2, '2023-01-16', '2023-02-10', 40)]
    rc, out, _ = run_cli(['check', str(tmp_path / 'd')], capsys)
    assert rc == 0 and '4 symbols, 30 days' in out and '0 problems' in out


def test_cli_check_strict_fails_with_exit_1(tmp_path, capsys):
    df = bars(10)
    df.iloc[3, 1] = df.iloc[3, 3] - 0.5; df.iloc[3, 0] = df.iloc[3, 2] = df.iloc[3, 3] - 1
    write_nifty(tmp_path / 'd', 'INFY', df)
    rc, out, _ = run_cli(['check', str(tmp_path / 'd')], capsys)
    assert rc == 0 and f'[dropped] INFY: 1 bar with high < close, first on {day(3)}' in out
    rc, out, _ = run_cli(['check', str(tmp_path / 'd'), '--strict', '--json'], capsys)
    s = json.loads(out)
    assert rc == 1 and not s['ok'] and s['errors'][0]['symbol'] == 'INFY' and s['errors'][0]['date'] == day(3)
    rc, _, err = run_cli(['check', str(tmp_path / 'd'), '--strict'], capsys)
    assert rc == 1 and 'INFY: 1 bar with high < close' in err


def test_cli_check_without_data_explains(capsys):
    rc, _, err = run_cli(['check'], capsys)
    assert rc == 1 and 'tradellm data fetch' in err


def test_cli_help_and_usage(capsys):
    assert run_cli(['--help'], capsys)[0] == 0
    assert run_cli(['check', '--help'], capsys)[0] == 0
    assert run_cli([], capsys)[0] == 2
    assert run_cli(['frobnicate'], capsys)[0] == 2


def test_cli_fetch_uses_yfinance(tmp_path, capsys, monkeypatch):
    yfinance = pytest.importorskip('yfinance')
    fake = FakeYahoo(fail={'BAD.NS'})
    monkeypatch.setattr(yfinance, 'download', fake)
    rc, out, _ = run_cli(['fetch', '--symbols', 'INFY,TCS', '--out', str(tmp_path / 'p'), '--start', '2024-01-01',
                          '--end', '2024-01-20', '--json'], capsys)
    s = json.loads(out)
    assert rc == 0 and s['fetched'] == ['INFY', 'TCS'] and s['calls'] == 1
    rc, out, err = run_cli(['fetch', '--symbols', 'INFY', 'BAD', '--out', str(tmp_path / 'p'), '--start', '2024-01-01',
                            '--end', '2024-01-20'], capsys)
    assert rc == 1 and '1 already complete, 1 failed' in out and 'BAD:' in err
    assert 'none of the' not in err  # some symbols came: no network hint


def test_cli_fetch_says_what_to_do_when_nothing_downloads(tmp_path, capsys, monkeypatch):
    "A closed network (yfinance returns empty frames for every ticker) gets a hint, not only per-symbol lines."
    yfinance = pytest.importorskip('yfinance')
    monkeypatch.setattr(yfinance, 'download', FakeYahoo(fail={'INFY.NS', 'TCS.NS'}))
    rc, _, err = run_cli(['fetch', '--symbols', 'INFY,TCS', '--out', str(tmp_path / 'p'), '--start', '2024-01-01',
                          '--end', '2024-01-20'], capsys)
    assert rc == 1 and 'none of the 2 symbols could be downloaded' in err and '--data PATH' in err


def test_cli_check_real_data(real_data_dir, capsys):
    rc, out, _ = run_cli(['check', str(real_data_dir), '--json'], capsys)
    s = json.loads(out)
    assert rc == 0 and s['n_symbols'] == 68 and s['errors'] == [] and s['problems'] == []
    assert [(r['n_symbols'], r['start'], r['end']) for r in s['ranges']] == \
        [(10, '2020-10-06', '2026-03-27'), (58, '2021-04-05', '2026-04-02')]
    ten = {'BHARTIARTL', 'HDFCBANK', 'ICICIBANK', 'INFY', 'ITC', 'KOTAKBANK', 'LT', 'RELIANCE', 'SBIN', 'TCS'}
    assert set(s['ranges'][0]['symbols']) == ten
    assert s['ranges'][0]['bars'] == 10 * 1360 and s['ranges'][1]['bars'] == 58 * 1240


def test_panel_summary_and_problem_str():
    p = panel_from_frames({'INFY': bars(5)}, source='mem')
    s = panel_summary(p)
    assert (s['source'], s['n_symbols'], s['bars'], s['first'], s['last']) == ('mem', 1, 5, '2023-01-02', '2023-01-06')
    assert str(Problem('INFY', '2023-01-02', 'x', 'INFY: something')) == 'INFY: something'
