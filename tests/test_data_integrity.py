"""Issue 18: broken foreign sources built from real rows of nifty68. Each case must be named (symbol, date, file),
and nothing may change without a report: mixed-ticker files, identical series, corporate actions with and without
adjustment, a market-wide vendor gap, a stray CSV, `data fetch` without a network."""
import json
import logging

import numpy as np
import pandas as pd
import pytest

import tradellm.data as data
from tradellm.data import (Action, DataError, cli_data, fetch, full_window_symbols, load_panel, read_actions)
from tradellm.market import Portfolio


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.delenv('TRADELLM_DATA', raising=False)
    monkeypatch.setattr(data, 'cache_dir', lambda: tmp_path / 'cache' / 'prices')
    monkeypatch.chdir(tmp_path)
    data.clear_panel_cache()
    yield
    data.clear_panel_cache()


def real(real_data_dir, symbol, n=60, skip=300):
    "n real bars of `symbol` from nifty68 (float64 open..volume indexed by date), from its `skip`th bar."
    df = pd.read_csv(real_data_dir / f'{symbol}_daily.csv')
    df.index = pd.DatetimeIndex(pd.to_datetime(df.pop('timestamp').str[:10]), name='date')
    return df.astype(np.float64).iloc[skip:skip + n]


def write_nifty(folder, symbol, df):
    folder.mkdir(parents=True, exist_ok=True)
    out = df[['open', 'high', 'low', 'close', 'volume']].copy()
    out.index = pd.DatetimeIndex(out.index).strftime('%Y-%m-%d 00:00:00+05:30')
    out.rename_axis('timestamp').to_csv(folder / f'{symbol}_daily.csv')


def yahoo_block(df, adj=None):
    "A Yahoo block (Adj Close, Close, High, Low, Open, Volume) of real rows."
    return pd.DataFrame({'Adj Close': df.close if adj is None else adj, 'Close': df.close, 'High': df.high,
                         'Low': df.low, 'Open': df.open, 'Volume': df.volume})


def iso(d): return pd.Timestamp(d).date().isoformat()


# ---- mixed column blocks and identical series: never read as one stock -------------------------------------

def test_a_file_with_repeated_column_blocks_is_refused_by_name(real_data_dir, tmp_path, capsys):
    d = tmp_path / 'd'
    write_nifty(d, 'INFY', real(real_data_dir, 'INFY'))
    rel, tata = yahoo_block(real(real_data_dir, 'RELIANCE')), yahoo_block(real(real_data_dir, 'TATASTEEL'))
    cols = [c for c in rel.columns for _ in (0, 1)]    # Date,Adj Close,Adj Close,Close,Close,...: RELIANCE's block first
    mixed = pd.DataFrame(np.column_stack([np.column_stack([rel[c], tata[c]]) for c in rel.columns]), index=rel.index, columns=cols)
    mixed.rename_axis('Date').to_csv(d / 'TATASTEEL.NS.csv', date_format='%Y-%m-%d')
    assert (d / 'TATASTEEL.NS.csv').read_text().startswith('Date,Adj Close,Adj Close,Close,Close,High,High')
    with pytest.raises(DataError, match=r"TATASTEEL: .*TATASTEEL.NS.csv holds 2 column blocks \(2 x Adj Close, 2 x Close.*"
                                        r"Refused: no block of it is read as TATASTEEL. Split it into one file per ticker") as e:
        load_panel(d)
    assert [(p.symbol, p.kind, p.action) for p in e.value.problems] == [('TATASTEEL', 'mixed_tickers', 'error')]
    assert cli_data(['check', str(d)]) == 1 and 'TATASTEEL.NS.csv holds 2 column blocks' in capsys.readouterr().err
    # yfinance's own layout names the tickers; a file of one ticker that is another stock is refused too
    two = pd.concat({'RELIANCE.NS': rel, 'TATASTEEL.NS': tata}, axis=1).swaplevel(axis=1).rename_axis(['Price', 'Ticker'], axis=1)
    two.rename_axis('Date').to_csv(d / 'TATASTEEL.NS.csv', date_format='%Y-%m-%d')
    with pytest.raises(DataError, match=r"TATASTEEL: .* holds 2 tickers' column blocks \(RELIANCE.NS, TATASTEEL.NS\)"):
        load_panel(d)
    one = pd.concat({'RELIANCE.NS': rel}, axis=1).swaplevel(axis=1).rename_axis(['Price', 'Ticker'], axis=1)
    one.rename_axis('Date').to_csv(d / 'TATASTEEL.NS.csv', date_format='%Y-%m-%d')
    with pytest.raises(DataError, match=r"TATASTEEL: .* holds RELIANCE.NS's prices \(its Ticker row\), not TATASTEEL's"):
        load_panel(d)


def test_two_symbols_with_the_same_prices_are_refused(real_data_dir, tmp_path):
    d = tmp_path / 'd'
    rel = real(real_data_dir, 'RELIANCE', n=120)
    write_nifty(d, 'RELIANCE', rel)
    write_nifty(d, 'TATASTEEL', rel.iloc[40:])        # TATASTEEL's file holds RELIANCE's prices (a later stretch)
    write_nifty(d, 'INFY', real(real_data_dir, 'INFY', n=120))
    first, last = iso(rel.index[40]), iso(rel.index[-1])
    with pytest.raises(DataError, match=rf"RELIANCE and TATASTEEL: the same close on all 80 days both have \({first}..{last}\)"
                                        r".*Neither is loaded") as e:
        load_panel(d)
    assert [(p.symbol, p.date, p.kind) for p in e.value.problems] == [('RELIANCE', first, 'identical_series')]
    write_nifty(d, 'TATASTEEL', real(real_data_dir, 'TATASTEEL', n=120))   # the right file: loads
    assert load_panel(d).symbols == ['INFY', 'RELIANCE', 'TATASTEEL']


# ---- corporate actions -------------------------------------------------------------------------------------------

SPLIT_DAY, DEMERGER_DAY = 25, 45


def printed_with_actions(df):
    "Real rows as a raw vendor would print them after a 1:5 split and a demerger that takes 45% of the value."
    out = df.copy()
    prices = ['open', 'high', 'low', 'close']
    out.loc[out.index[SPLIT_DAY]:, prices] /= 5
    out.loc[out.index[DEMERGER_DAY]:, prices] *= 0.55
    return out


def equity_path(panel, symbol, shares=100):
    "A holder's equity at each close: `shares` of `symbol` bought before the first day, held throughout."
    pf = Portfolio(panel.symbols, capital=0.0)
    pf.set_holding(symbol, shares, shares * panel.close[0, panel.col(symbol)])
    return np.array([pf.equity(np.nan_to_num(panel.close[t])) for t in range(len(panel.dates))])


def test_a_holder_is_continuous_across_a_split_and_a_demerger_with_adjustment(real_data_dir, tmp_path):
    true = real(real_data_dir, 'LT', n=70)
    d = tmp_path / 'd'
    write_nifty(d, 'LT', printed_with_actions(true))
    write_nifty(d, 'INFY', real(real_data_dir, 'INFY', n=70))
    split, demerger = iso(true.index[SPLIT_DAY]), iso(true.index[DEMERGER_DAY])
    # without an actions file: the raw jumps are reported by symbol and date, and not changed
    raw = load_panel(d, cache=False)
    assert [(p.symbol, p.date, p.kind) for p in raw.problems] == [('LT', split, 'large_move'), ('LT', demerger, 'large_move')]
    assert 'add it to actions.csv (symbol,date,ratio)' in raw.problems[0].message
    np.testing.assert_array_equal(raw.close[:, raw.col('LT')], printed_with_actions(true).close.to_numpy())
    eq = equity_path(raw, 'LT')
    assert (eq[1:] / eq[:-1] - 1).min() < -0.75     # the holder "loses" 80% on the split day
    # with actions.csv: the holder's equity moves exactly as the stock did, through both days
    (d / 'actions.csv').write_text(f'symbol,date,ratio,kind\nLT,{split},0.2,split 1:5\nLT,{demerger},0.55,demerger\n')
    adj = load_panel(d)
    assert adj.problems == [] and adj.adjustment == 'adjusted'
    assert adj.actions == [Action('LT', split, 0.2, 'actions.csv'), Action('LT', demerger, 0.55, 'actions.csv')]
    eq = equity_path(adj, 'LT')
    np.testing.assert_allclose(eq[1:] / eq[:-1], true.close.to_numpy()[1:] / true.close.to_numpy()[:-1], rtol=1e-12)
    assert adj.close[-1, adj.col('LT')] == printed_with_actions(true).close.iloc[-1]   # today's price as printed
    np.testing.assert_array_equal(adj.volume, raw.volume)                               # volumes as printed
    np.testing.assert_array_equal(adj.close[:, adj.col('INFY')], raw.close[:, raw.col('INFY')])
    # raw prices on request, with the same report as before, and a fingerprint of their own
    asked = load_panel(d, adjust=False)
    assert asked.adjustment == 'raw' and asked.actions == [] and [p.kind for p in asked.problems] == ['large_move'] * 2
    assert 'raw prices: actions.csv records an action that day (earlier prices x 0.2), which adjusted' in asked.problems[0].message
    assert len({adj.fingerprint(), asked.fingerprint(), raw.fingerprint()}) == 3


def test_cli_check_says_which_prices(real_data_dir, tmp_path, capsys):
    true = real(real_data_dir, 'LT', n=70)
    d = tmp_path / 'd'
    write_nifty(d, 'LT', printed_with_actions(true))
    split, demerger = iso(true.index[SPLIT_DAY]), iso(true.index[DEMERGER_DAY])
    (d / 'actions.csv').write_text(f'symbol,date,ratio\nLT,{split},0.2\nLT,{demerger},0.55\n')
    assert cli_data(['check', str(d)]) == 0
    out = capsys.readouterr().out
    assert 'prices adjusted for 2 corporate actions (actions.csv: 1 symbol; --raw-prices for the prices as printed)' in out
    assert f'LT {split}: earlier prices x 0.2 (actions.csv)' in out and '0 problems' in out
    assert cli_data(['check', str(d), '--raw-prices', '--json']) == 0
    s = json.loads(capsys.readouterr().out)
    assert s['adjustment'] == 'raw' and s['actions'] == [] and [(p['symbol'], p['date']) for p in s['problems']] == \
        [('LT', split), ('LT', demerger)]


def test_a_dividend_in_adj_close_adjusts_earlier_prices(real_data_dir, tmp_path):
    true = real(real_data_dir, 'ITC', n=40)
    ex = true.index[20]
    factor = np.where(true.index < ex, 0.97, 1.0)     # a dividend of 3% of the price, ex on day 20
    d = tmp_path / 'd'
    d.mkdir()
    yahoo_block(true, adj=(true.close * factor).round(2)).rename_axis('Date').to_csv(d / 'ITC.NS.csv', date_format='%Y-%m-%d')
    p = load_panel(d)
    assert p.problems == [] and len(p.actions) == 1
    a = p.actions[0]
    assert (a.symbol, a.date, a.source) == ('ITC', iso(ex), 'Adj Close') and a.ratio == pytest.approx(0.97, abs=1e-4)
    np.testing.assert_allclose(p.close[:20, 0], true.close.to_numpy()[:20] * a.ratio, rtol=1e-12)
    np.testing.assert_array_equal(p.close[20:, 0], true.close.to_numpy()[20:])   # the rounding wobble changes nothing
    np.testing.assert_array_equal(load_panel(d, adjust=False).close[:, 0], true.close.to_numpy())
    # Adj Close wins over actions.csv: nothing is applied twice
    (d / 'actions.csv').write_text(f'symbol,date,ratio\nITC,{iso(ex)},0.97\n')
    assert [x.source for x in load_panel(d).actions] == ['Adj Close']


def test_a_broken_actions_file_is_named(tmp_path):
    (tmp_path / 'actions.csv').write_text('symbol,date,ratio\nLT,2024-03-01,0.2\nLT,2024-13-01,0.5\n')
    with pytest.raises(DataError, match=r"actions.csv: row 3 \(LT,2024-13-01,0.5\) is not 'SYMBOL,YYYY-MM-DD,ratio'"):
        read_actions(tmp_path / 'actions.csv')
    (tmp_path / 'actions.csv').write_text('symbol,day,factor\nLT,2024-03-01,0.2\n')
    with pytest.raises(DataError, match=r"no column date, ratio"):
        read_actions(tmp_path / 'actions.csv')


def test_nifty68_loads_as_before(real_data_dir, capsys):
    p = load_panel(real_data_dir)
    assert p.actions == [] and p.problems == [] and p.adjustment == 'adjusted'
    assert p.fingerprint() == 'b55be2a93102d7db'     # the fingerprint before corporate actions were read: same prices
    raw = load_panel(real_data_dir, adjust=False)
    np.testing.assert_array_equal(raw.close, p.close)
    assert raw.fingerprint() != p.fingerprint()       # the choice is recorded even where it changed no price
    assert cli_data(['check', str(real_data_dir)]) == 0
    out = capsys.readouterr().out
    assert '68 symbols' in out and '0 problems' in out and 'the source records no corporate action' in out


# ---- a vendor gap on a trading day: one event for the whole panel ---------------------------------------------

GAP_SYMBOLS = ['HDFCBANK', 'ICICIBANK', 'INFY', 'ITC', 'LT', 'SBIN']


def test_a_market_wide_filler_day_is_one_event_and_leaves_the_calendar(real_data_dir, tmp_path):
    d = tmp_path / 'd'
    frames = {s: real(real_data_dir, s, n=40) for s in GAP_SYMBOLS}
    day = frames['INFY'].index[20]
    for s in GAP_SYMBOLS[:5]:                          # filler for 5 of 6: volume 0, the previous close repeated
        df = frames[s]
        df.loc[day, ['open', 'high', 'low', 'close', 'volume']] = [df.close.iloc[19]] * 4 + [0]
    for s, df in frames.items(): write_nifty(d, s, df)
    with pytest.warns(data.DataWarning, match='vendor gap'):
        p = load_panel(d)
    gap = iso(day)
    assert [(x.symbol, x.date, x.kind, x.action) for x in p.problems] == [('*', gap, 'vendor_gap', 'dropped')]
    assert p.problems[0].message == (f"{gap}: vendor gap: 5 of 6 symbols have no usable bar that day (filler or missing: "
                                     "HDFCBANK, ICICIBANK, INFY, ITC, LT); the day is removed from the calendar of every "
                                     "symbol, with the real bars of SBIN")
    assert day not in p.dates and len(p.dates) == 39
    assert full_window_symbols(p, 0, len(p.dates)).tolist() == list(range(6))   # no window narrows to one stock
    np.testing.assert_array_equal(p.close[:, p.col('SBIN')], frames['SBIN'].drop(day).close.to_numpy())
    with pytest.raises(DataError, match='vendor gap'):
        load_panel(d, strict=True)
    # a filler bar of one stock is that stock's problem, as before
    for s in ('HDFCBANK', 'ICICIBANK', 'ITC', 'LT'): write_nifty(d, s, real(real_data_dir, s, n=40))
    p = load_panel(d)
    assert [(x.symbol, x.date, x.kind) for x in p.problems] == [('INFY', gap, 'zero_volume_filler')]
    assert day in p.dates


def test_a_day_missing_from_most_files_is_a_vendor_gap(real_data_dir, tmp_path):
    d = tmp_path / 'd'
    frames = {s: real(real_data_dir, s, n=40) for s in GAP_SYMBOLS}
    day = frames['INFY'].index[10]
    for s, df in frames.items(): write_nifty(d, s, df if s in ('SBIN', 'LT') else df.drop(day))
    p = load_panel(d)
    assert [(x.date, x.kind) for x in p.problems] == [(iso(day), 'vendor_gap')]
    assert '4 of 6 symbols have no usable bar' in p.problems[0].message and day not in p.dates


# ---- files that are not price files ------------------------------------------------------------------------------

def test_a_stray_csv_is_skipped_and_named(real_data_dir, tmp_path, capsys):
    d = tmp_path / 'd'
    for s in ('INFY', 'TCS', 'SBIN'): write_nifty(d, s, real(real_data_dir, s))
    (d / 'qc_report.csv').write_text('symbol,check,result\nINFY,gaps,ok\nTCS,gaps,ok\n')
    (d / 'actions.csv').write_text('symbol,date,ratio\n')                  # not a price file either, and not a stray
    with pytest.warns(data.DataWarning, match='qc_report.csv: not a price file'):
        p = load_panel(d)
    assert p.symbols == ['INFY', 'SBIN', 'TCS']
    assert [(x.symbol, x.kind, x.action) for x in p.problems] == [('qc_report.csv', 'not_a_price_file', 'skipped')]
    assert 'columns: symbol, check, result' in p.problems[0].message
    with pytest.raises(DataError, match='qc_report.csv: not a price file'):
        load_panel(d, strict=True)
    with pytest.raises(DataError, match='qc_report.csv: not a price file'):   # asked for by name: an error
        load_panel(d, symbols=['INFY', 'qc_report'])
    assert cli_data(['check', str(d)]) == 0
    assert '[skipped]' in capsys.readouterr().out
    assert cli_data(['check', str(d), '--strict']) == 1
    err = capsys.readouterr().err
    assert 'qc_report.csv: not a price file' in err and '--no-strict' in err and 'strict=False' not in err
    assert cli_data(['check', str(d), '--no-strict', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['problems'][0]['action'] == 'skipped'


# ---- fetch: an unreachable network, and the actions file --------------------------------------------------------

COLUMNS = ['Adj Close', 'Close', 'High', 'Low', 'Open', 'Volume']
HOST_ERROR = ("Failed to perform, curl: (6) Could not resolve host: query2.finance.yahoo.com. "
              "See https://curl.se/libcurl/c/libcurl-errors.html first for more details.")


class OfflineYahoo:
    "What yfinance 1.7's `download` does without DNS: logs per ticker, returns an empty frame with the usual columns."
    def __init__(self): self.calls = []

    def __call__(self, tickers, **kw):
        self.calls.append(list(tickers))
        log = logging.getLogger('yfinance')
        for t in tickers:
            log.warning('Cookie/crumb fetch failed (DNSError), continuing without crumb')
            log.error(f"Failed to get ticker '{t}' reason: {HOST_ERROR}")
        log.error(f'\n{len(tickers)} Failed downloads:')
        log.error(f"{tickers}: DNSError('{HOST_ERROR}')")
        return pd.DataFrame(index=pd.DatetimeIndex([], name='Date'),
                            columns=pd.MultiIndex.from_product([COLUMNS, tickers], names=['Price', 'Ticker']), dtype=float)


def test_fetch_without_a_network_says_so_once_and_stops_early(tmp_path, capsys, monkeypatch):
    yfinance = pytest.importorskip('yfinance')
    fake = OfflineYahoo()
    symbols = list(data.NIFTY68[:45])
    r = fetch(symbols, out=tmp_path / 'p', start='2024-01-01', end='2024-02-01', download=fake, progress=False)
    assert len(fake.calls) == 1 and r['calls'] == 1                       # 20 symbols tried, not 45
    assert r['network'] == 'Could not resolve host: query2.finance.yahoo.com'
    assert set(r['failed']) == set(symbols) and r['failed'][symbols[0]].startswith('network unreachable: ')
    assert r['failed'][symbols[-1]].startswith('not tried: the network is unreachable')
    out = capsys.readouterr()
    assert 'Cookie' not in out.err + out.out and 'Failed' not in out.err    # yfinance's noise is kept quiet
    monkeypatch.setattr(yfinance, 'download', fake)
    assert cli_data(['fetch', '--out', str(tmp_path / 'p'), '--start', '2024-01-01', '--end', '2024-02-01']) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if 'fetch NSE daily bars' not in x]  # (the progress bar)
    assert err == ["tradellm data fetch: the network is unreachable (Could not resolve host: query2.finance.yahoo.com); "
                   "nothing was downloaded. Fetch on a machine that can reach Yahoo Finance and copy the folder, then pass "
                   "--data PATH or set TRADELLM_DATA."]
    # the exception yfinance's HTTP client raises, when a stand-in lets it through
    curl = pytest.importorskip('curl_cffi.requests.exceptions')
    def raising(tickers, **kw): raise curl.DNSError(HOST_ERROR)
    r = fetch(symbols, out=tmp_path / 'q', start='2024-01-01', end='2024-02-01', download=raising, progress=False)
    assert r['calls'] == 1 and r['network'] == 'Could not resolve host: query2.finance.yahoo.com'


def test_fetch_writes_an_actions_file_from_yahoos_splits_and_dividends(real_data_dir, tmp_path):
    true = real(real_data_dir, 'LT', n=30, skip=100)
    split, div = true.index[10], true.index[20]
    def download(tickers, start=None, end=None, **kw):
        assert kw['actions'] is True
        printed = true.copy()                              # Yahoo's Close is split-adjusted already
        block = yahoo_block(printed, adj=printed.close * np.where(printed.index < div, 0.99, 1.0))
        block['Dividends'] = np.where(printed.index == div, 0.01 * printed.close.shift(1), 0.0)
        block['Stock Splits'] = np.where(printed.index == split, 5.0, 0.0)
        return pd.concat({'LT.NS': block}, axis=1).swaplevel(axis=1)
    r = fetch(['LT'], out=tmp_path / 'p', start=iso(true.index[0]), end=iso(true.index[-1] + pd.Timedelta(days=1)),
              download=download, progress=False)
    assert r['fetched'] == ['LT'] and r['actions'] == 2
    acts = read_actions(tmp_path / 'p' / 'actions.csv')
    assert [(a.symbol, a.date) for a in acts] == [('LT', iso(split)), ('LT', iso(div))]
    assert acts[0].ratio == 0.2 and acts[1].ratio == pytest.approx(0.99, abs=1e-9)
    # the fetched folder: Yahoo's own Adj Close adjusts it; its actions.csv is for other formats (nothing twice)
    p = load_panel(tmp_path / 'p')
    assert [(a.date, a.source) for a in p.actions] == [(iso(div), 'Adj Close')]
    # a raw copy in nifty68's format with that actions file: the same returns as the true series
    raw = true.copy()
    raw.loc[split:, ['open', 'high', 'low', 'close']] /= 5
    write_nifty(tmp_path / 'k', 'LT', raw)
    (tmp_path / 'k' / 'actions.csv').write_text((tmp_path / 'p' / 'actions.csv').read_text())
    k = load_panel(tmp_path / 'k')
    assert k.problems == [] and len(k.actions) == 2
