"""Market rules: the action grammar of `parse_action`, fills hand-computed to the paisa (slippage, costs, caps, daily
limits, SELL rounding), rejections with their reasons, and the portfolio's invariants under random order streams."""
import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tradellm.market import MAX_ACTION_CHARS, MAX_ORDER_LINES, Order, Portfolio, execute, mark, parse_action

SYMS = ['INFY', 'TCS', 'M&M', 'BAJAJ-AUTO']


def orders(text, symbols=SYMS, default=None):
    "The parsed orders as short strings, and the errors."
    r = parse_action(text, symbols, default)
    return [str(o) for o in r.orders], r.errors


# ---------------------------------------------------------------- grammar

@pytest.mark.parametrize('text, want', [
    ('BUY INFY 0.5', ['BUY INFY 0.5']),
    ('buy infy 0.5', ['BUY INFY 0.5']),  # case-insensitive, the episode's spelling comes back
    ('Sell Tcs .3', ['SELL TCS 0.3']),
    ('BUY INFY 50%', ['BUY INFY 0.5']),  # percent sizes
    ('BUY INFY 100%', ['BUY INFY 1']),
    ('BUY INFY', ['BUY INFY 1']),  # no size: all of it
    ('SELL TCS', ['SELL TCS 1']),
    ('BUY INFY 1', ['BUY INFY 1']),
    ('BUY 0.25 INFY', ['BUY INFY 0.25']),  # size before the symbol
    ('BUY m&m 0.2', ['BUY M&M 0.2']),
    ('BUY bajaj-auto 0.2', ['BUY BAJAJ-AUTO 0.2']),
    ('BUY INFY.NS 0.5', ['BUY INFY 0.5']),  # Yahoo suffix
    ('BUY INFY 0.5; SELL TCS 0.3', ['BUY INFY 0.5', 'SELL TCS 0.3']),  # ';' separates orders
    ('BUY INFY 0.5\nSELL TCS 0.3\r\nBUY M&M 0.1', ['BUY INFY 0.5', 'SELL TCS 0.3', 'BUY M&M 0.1']),  # and newlines
    ('1. BUY INFY 0.5\n2. SELL TCS 0.3', ['BUY INFY 0.5', 'SELL TCS 0.3']),  # numbered lists
    ('Action: BUY INFY 0.5', ['BUY INFY 0.5']),
    ('- **BUY** INFY 0.5', ['BUY INFY 0.5']),
    ('<think>BUY TCS 1.0 looks good</think>\nSELL INFY 0.3', ['SELL INFY 0.3']),  # only the answer after think
    ('<THINK>x</THINK>BUY INFY 0.1', ['BUY INFY 0.1']),
    ('<think>a<think>b</think>c</think>BUY INFY 0.1', ['BUY INFY 0.1']),  # nested: the last </think> closes
    ('**Action:** BUY INFY 0.5', ['BUY INFY 0.5']),  # markdown around the label and the order
    ('Action: **BUY INFY 0.5**', ['BUY INFY 0.5']),
    ('`BUY INFY 0.5`', ['BUY INFY 0.5']),
    ('Final decision: SELL TCS 30%', ['SELL TCS 0.3']),
    ('Sell half of my TCS shares now', ['SELL TCS 0.5']),  # words that change nothing
    ('BUY INFY with 50% of the available cash', ['BUY INFY 0.5']),
    ('SELL TCS entirely', ['SELL TCS 1']),
])
def test_grammar_reads_orders(text, want):
    got, errors = orders(text)
    assert got == want and errors == []


@pytest.mark.parametrize('text', ['HOLD', 'hold', ' Hold. ', 'HOLD\n', '<think>nothing to do</think>HOLD'])
def test_hold_is_an_explicit_order_free_answer(text):
    r = parse_action(text, SYMS)
    assert r.hold and r.orders == [] and r.errors == [] and r.format_ok


def test_hold_answers_do_not_share_their_lists():
    "Changing one HOLD's orders or errors (a wrapper adding a note) cannot leak into the next answer read."
    r = parse_action('HOLD', SYMS)
    r.errors.append('a note'), r.orders.append(Order('BUY', 'INFY', 1.0))
    again = parse_action('hold', SYMS)
    assert again.errors == [] and again.orders == [] and again.format_ok


@pytest.mark.parametrize('text, why', [
    ('Buy INFY only if the trend turns bullish, which it has not.', "could not read 'only', 'if', 'trend'"),
    ('Sell INFY if RSI climbs above seventy.', "could not read 'if', 'RSI', 'climbs'"),
    ('Sell a third of INFY', "could not read 'third'"),
    ('Buy a quarter of INFY', "could not read 'quarter'"),
    ('Buy some INFY', "could not read 'some'"),
    ('Buy INFY, a small position', "could not read 'small'"),
    ('BUY INFY 0.5 (strong trend)', "could not read 'strong', 'trend'"),
    ('BUY INFY 0.5 - oversold', "could not read 'oversold';"),  # punctuation is not a word it failed to read
    ('Sell signals on INFY are weak, so keep it.', "could not read 'signals', 'on', 'are'"),
    ('BUY 1 share of INFY', 'not share counts'),
    ('SELL INFY 1 share', 'not share counts'),
    ('HOLD TCS, BUY INFY 0.2', 'HOLD and an order on one line'),
    ('Hold off, then sell half', 'HOLD and an order on one line'),
    ('BUY INFY ' + 'now ' * 12, 'too many words'),
    ('Sell-side analysts downgraded INFY this week.', 'no BUY, SELL or HOLD'),  # 'Sell-side' is not the verb SELL
    ('2. Buy-the-dip candidates: INFY', 'no BUY, SELL or HOLD'),
])
def test_order_lines_with_words_it_cannot_read_are_errors_not_all_in(text, why):
    "Under 1.0.0 each of these was read as the whole cash or holding (or hid its order behind HOLD), with no error."
    r = parse_action(text, SYMS)
    assert r.orders == [] and not r.hold and not r.format_ok and len(r.errors) == 1 and why in r.errors[0], r.errors
    if why.startswith('could not'): assert "(reasons go in <think>)" in r.errors[0]


def test_hold_with_reasons_is_still_a_clean_hold():
    for text in ('HOLD: no reason to buy or sell today', 'Hold - the trend is flat', 'HOLD INFY'):
        r = parse_action(text, SYMS)
        assert r.hold and r.errors == [] and r.format_ok, text


def test_hold_beside_orders_keeps_the_orders():
    r = parse_action('HOLD INFY; BUY TCS 0.2', SYMS)
    assert r.hold and [str(o) for o in r.orders] == ['BUY TCS 0.2']


def test_default_symbol_in_single_stock_tasks():
    assert orders('BUY 0.5', ['INFY'], 'INFY') == (['BUY INFY 0.5'], [])
    assert orders('sell', ['INFY'], 'INFY') == (['SELL INFY 1'], [])
    got, errors = orders('BUY 0.5', SYMS)  # several stocks: the symbol is required, and the error shows how
    assert got == [] and 'no symbol given' in errors[0] and 'BUY INFY 0.5' in errors[0]


def test_unknown_symbol_names_the_episode_symbols():
    got, errors = orders('BUY RELIANCE 0.5', SYMS)
    assert got == [] and len(errors) == 1
    assert 'RELIANCE' in errors[0] and all(s in errors[0] for s in SYMS)
    many = [f'S{i:02d}' for i in range(25)]
    _, errors = orders('BUY XYZ 0.5', many)
    assert 'S00' in errors[0] and '...' in errors[0] and len(errors[0]) < 300  # long lists are cut


@pytest.mark.parametrize('size, why', [
    ('1.5', 'above 1'), ('100', 'above 1'), ('150%', 'above 1'), ('0', 'above 0'), ('-0.5', 'above 0'),
    ('-0', 'above 0'), ('0%', 'above 0'), ('1e-400', 'above 0'), ('nan', 'finite'), ('NaN', 'finite'),
    ('inf', 'finite'), ('-inf', 'finite'), ('1e309', 'finite'), ('9' * 400, 'finite'),
])
def test_bad_sizes_become_hold_with_a_reason(size, why):
    got, errors = orders(f'BUY INFY {size}')
    assert got == [] and len(errors) == 1 and why in errors[0] and 'INFY' in errors[0]


@pytest.mark.parametrize('text', ['BUY INFY 0.1 TCS 0.2', 'BUY INFY 0.5 0.3', 'SELL INFY TCS'])
def test_two_orders_on_one_line_are_an_error(text):
    got, errors = orders(text)
    assert got == [] and len(errors) == 1 and 'one order per line' in errors[0]


def test_one_bad_line_does_not_spoil_the_others():
    got, errors = orders('BUY INFY 0.5\nBUY TCS 7\nSELL M&M 0.2')
    assert got == ['BUY INFY 0.5', 'SELL M&M 0.2'] and len(errors) == 1 and "TCS 7" in errors[0]


@pytest.mark.parametrize('text, why', [
    ('', 'no BUY, SELL or HOLD'), ('I think the market will go up.', 'no BUY, SELL or HOLD'),
    ('<think>BUY INFY 0.5', 'never closed'), (None, 'must be text'), (42, 'must be text'), (b'BUY', 'must be text'),
])
def test_unreadable_answers_are_hold_with_a_reason(text, why):
    r = parse_action(text, SYMS)
    assert r.orders == [] and not r.hold and not r.format_ok and why in r.errors[0]


def test_huge_answers_are_cut_and_many_lines_capped():
    text = 'x' * (MAX_ACTION_CHARS + 10) + '\nBUY INFY 0.5'
    r = parse_action(text, SYMS)
    assert [str(o) for o in r.orders] == ['BUY INFY 0.5'] and 'characters' in r.errors[0]
    r = parse_action('\n'.join(['BUY INFY 0.01'] * (MAX_ORDER_LINES + 5)), SYMS)
    assert len(r.orders) == MAX_ORDER_LINES and 'more than' in r.errors[-1]


@pytest.mark.parametrize('size', ['0,5', '1/2', '0.5x', '0..5', '--0.5', '0.5.5', '\u00bd'])
def test_unreadable_size_is_not_all_in(size):
    got, errors = orders(f'BUY INFY {size}')
    assert got in ([], ['BUY INFY 0.5']), f"'BUY INFY {size}' was read as {got}"
    if not got: assert errors


def test_wrong_symbol_in_single_stock_task_is_reported():
    got, errors = orders('BUY TCS 0.5', ['INFY'], 'INFY')
    assert got == [] and 'TCS' in errors[0]


# ---------------------------------------------------------------- fills, hand-computed to the paisa

def test_day_of_fills_hand_computed():
    pf = Portfolio(['AAA', 'BBB'], capital=100_000, cost=0.001, slippage=0.002, max_position=0.30, max_trades=3)
    day1 = [Order('BUY', 'AAA', 0.2), Order('BUY', 'BBB', 0.5), Order('BUY', 'AAA', 0.5), Order('SELL', 'BBB', 1.0)]
    f = execute(pf, day1, np.array([1000.0, 250.0]), day=1)
    # equity at the open 100,000; cap 30% = 30,000
    # BUY AAA 0.2: price 1000 x 1.002 = 1002.00, with cost 1003.002; 20,000 / 1003.002 -> 19 shares
    #   gross 19,038.00, cost 19.038, cash 80,942.962
    # BUY BBB 0.5: price 250.50, with cost 250.7505; 40,471.481 / 250.7505 -> 161, cap 30,000 / 250.5 -> 119
    #   gross 29,809.50, cost 29.8095, cash 51,103.6525
    # BUY AAA 0.5: 25,551.826 / 1003.002 -> 25, cap room 29 - 19 = 10
    #   gross 10,020.00, cost 10.02, cash 41,073.6325
    # SELL BBB: 4th order, the daily limit is 3 -> rejected
    assert [(x.status, x.shares) for x in f] == [('filled', 19), ('reduced', 119), ('reduced', 10), ('rejected', 0)]
    assert [x.price for x in f[:3]] == [pytest.approx(1002.0, abs=1e-9), pytest.approx(250.5, abs=1e-9),
                                        pytest.approx(1002.0, abs=1e-9)]
    assert [x.cost for x in f[:3]] == [pytest.approx(c, abs=1e-9) for c in (19.038, 29.8095, 10.02)]
    assert 'cap' in f[1].reason and '119' in f[1].reason and 'daily limit of 3' in f[3].reason
    assert pf.cash == pytest.approx(41_073.6325, abs=1e-6)
    assert pf.shares.tolist() == [29, 119] and pf.trades == 3
    assert pf.total_cost == pytest.approx(58.8675, abs=1e-9)
    assert pf.avg_cost() == pytest.approx([1003.002, 250.7505], abs=1e-9)  # fill price + cost per share
    assert mark(pf, np.array([1010.0, 245.0]), 1) == pytest.approx(41_073.6325 + 29 * 1010 + 119 * 245, abs=1e-6)
    assert pf.equity_history == [100_000, pytest.approx(99_518.6325, abs=1e-6)]

    day2 = [Order('SELL', 'AAA', 0.5), Order('SELL', 'BBB', 0.001), Order('SELL', 'AAA', 1.0)]
    f = execute(pf, day2, np.array([1020.0, 240.0]), day=2)
    # SELL AAA 0.5: 29 x 0.5 = 14.5 -> 14 shares at 1020 x 0.998 = 1017.96; gross 14,251.44, cost 14.25144
    # SELL BBB 0.001: 0.119 of a share -> rejected
    # SELL AAA 1.0: the other 15 shares; gross 15,269.40, cost 15.2694
    assert [(x.status, x.shares) for x in f] == [('filled', 14), ('rejected', 0), ('filled', 15)]
    assert f[0].price == pytest.approx(1017.96, abs=1e-9) and f[0].cost == pytest.approx(14.25144, abs=1e-9)
    assert 'less than one share' in f[1].reason
    assert pf.cash == pytest.approx(41_073.6325 + 14_251.44 - 14.25144 + 15_269.40 - 15.2694, abs=1e-6)
    assert round(pf.cash, 2) == 70_564.95
    assert pf.shares.tolist() == [0, 119] and pf.avg_cost() == pytest.approx([0, 250.7505], abs=1e-9)
    assert [d for d, _ in pf.fills] == [1, 1, 1, 1, 2, 2, 2]


def test_no_cost_no_slippage_buys_every_affordable_share():
    pf = Portfolio(['AAA'], capital=100_000, max_position=1.0, max_trades=1)
    (f,) = execute(pf, [Order('BUY', 'AAA', 1.0)], np.array([333.33]), day=1)
    assert f.status == 'filled' and f.shares == 300 and f.price == 333.33 and f.cost == 0
    assert pf.cash == pytest.approx(100_000 - 300 * 333.33, abs=1e-9) and 0 <= pf.cash < 333.33


def test_all_in_buy_with_costs_never_overdraws():
    for price in (99.99, 101.37, 1234.56, 49_999.99):
        pf = Portfolio(['AAA'], capital=100_000, cost=0.001, slippage=0.002, max_position=1.0)
        (f,) = execute(pf, [Order('BUY', 'AAA', 1.0)], np.array([price]), day=1)
        unit = price * 1.002 * 1.001
        assert pf.cash >= 0 and pf.cash < unit and f.shares == math.floor(100_000 / unit)


@pytest.mark.parametrize('held, fraction, sold', [
    (100, 0.29, 29), (100, 0.57, 57), (100, 0.07, 7),  # fractions that float arithmetic puts just under a whole
    (7, 0.5, 3), (7, 1.0, 7), (3, 0.34, 1), (10, 0.3, 3), (1, 0.99, 0),
])
def test_sell_fractions_round_down_to_whole_shares(held, fraction, sold):
    pf = Portfolio(['AAA'], capital=10_000)
    pf.set_holding('AAA', held, cost_basis=held * 10.0)
    (f,) = execute(pf, [Order('SELL', 'AAA', fraction)], np.array([12.0]), day=1)
    assert f.shares == sold and pf.shares[0] == held - sold
    if sold: assert f.status == 'filled' and pf.cash == pytest.approx(10_000 + sold * 12.0)
    else: assert f.status == 'rejected' and 'less than one share' in f.reason


def test_a_starting_position_counts_everywhere():
    "set_holding's shares are in equity at the open (the cap), at the close, in avg_cost and in what a SELL can sell."
    pf = Portfolio(['AAA', 'BBB'], capital=1_000, max_position=0.5, max_trades=5)
    pf.set_holding('AAA', 10, cost_basis=900.0)
    assert pf.equity(np.array([100.0, 50.0])) == 2_000.0 and pf.avg_cost().tolist() == [90.0, 0.0]
    # equity at the open 1,000 + 10 x 100 = 2,000; a 50% cap is 1,000 = 10 shares of AAA, all already held
    (f,) = execute(pf, [Order('BUY', 'AAA', 1.0)], np.array([100.0, 50.0]), day=1)
    assert f.status == 'rejected' and 'cap' in f.reason
    (f,) = execute(pf, [Order('SELL', 'AAA', 0.5)], np.array([100.0, 50.0]), day=1)
    assert (f.status, f.shares, pf.cash) == ('filled', 5, 1_500.0)
    assert mark(pf, np.array([120.0, 50.0]), day=1) == 1_500.0 + 5 * 120.0 and pf.shares.tolist() == [5, 0]
    pf.set_holding('AAA', 0, cost_basis=0)
    assert pf.equity(np.array([120.0, 50.0])) == 1_500.0 and pf._held == {}


@pytest.mark.parametrize('call, why', [
    (lambda pf: pf.shares.__setitem__(0, 5), 'read-only'),
    (lambda pf: setattr(pf, 'shares', np.array([5])), 'set_holding'),
    (lambda pf: pf.set_holding('ZZZ', 1, 10.0), "'ZZZ' is not one of this portfolio's symbols: AAA"),
    (lambda pf: pf.set_holding(['AAA'], 1, 10.0), "not one of this portfolio's symbols"),
    (lambda pf: pf.set_holding('AAA', 1.5, 10.0), 'whole number'),
    (lambda pf: pf.set_holding('AAA', -1, 10.0), 'whole number'),
    (lambda pf: pf.set_holding('AAA', True, 10.0), 'whole number'),
    (lambda pf: pf.set_holding('AAA', 2, float('nan')), 'cost_basis'),
    (lambda pf: pf.set_holding('AAA', 2, -5.0), 'cost_basis'),
    (lambda pf: pf.set_holding('AAA', 0, 5.0), 'cost_basis'),
    (lambda pf: pf.set_holding('AAA', 2, 'ten'), 'cost_basis'),
])
def test_shares_change_only_through_fills_and_set_holding(call, why):
    "An edit that would leave equity's bookkeeping behind is refused with the way to do it; nothing changes."
    pf = Portfolio(['AAA'], capital=1_000)
    with pytest.raises((ValueError, AttributeError), match=why.replace('(', r'\(')):
        call(pf)
    assert pf.shares.tolist() == [0] and pf.equity(np.array([10.0])) == 1_000.0 and pf.cost_basis.tolist() == [0.0]


def test_rejections_carry_reasons():
    pf = Portfolio(['AAA', 'BBB'], capital=1_000, max_position=1.0, max_trades=10)
    f = execute(pf, [Order('SELL', 'AAA', 0.5), Order('BUY', 'BBB', 0.001), Order('BUY', 'ZZZ', 0.5),
                     Order('BUY', 'AAA', 1.0)], np.array([2_000.0, 10.0]), day=1)
    assert [x.status for x in f] == ['rejected'] * 4
    assert 'no AAA shares held' in f[0].reason
    assert 'buys no whole share' in f[1].reason
    assert 'not in this episode' in f[2].reason
    assert 'buys no whole share' in f[3].reason  # 1,000 of cash, 2,000 a share
    assert pf.cash == 1_000 and pf.trades == 0 and len(pf.fills) == 4


def test_regime_gate_refuses_buys_but_not_sells():
    pf = Portfolio(['AAA'], capital=1_000)
    pf.set_holding('AAA', 10, cost_basis=1_000.0)
    f = execute(pf, [Order('BUY', 'AAA', 0.5), Order('SELL', 'AAA', 0.5)], np.array([100.0]), day=3, buy_allowed=False)
    assert f[0].status == 'rejected' and 'regime' in f[0].reason and f[1].status == 'filled' and f[1].shares == 5


def test_cap_counts_what_is_already_held():
    pf = Portfolio(['AAA', 'BBB'], capital=100_000, max_position=0.15, max_trades=5)
    (f,) = execute(pf, [Order('BUY', 'AAA', 1.0)], np.array([100.0, 50.0]), day=1)
    assert f.status == 'reduced' and f.shares == 150
    (f,) = execute(pf, [Order('BUY', 'AAA', 0.1)], np.array([100.0, 50.0]), day=2)
    assert f.status == 'rejected' and 'cap' in f.reason  # already at 15%
    (f,) = execute(pf, [Order('BUY', 'AAA', 0.1)], np.array([200.0, 50.0]), day=3)  # the price doubled: above the cap
    assert f.status == 'rejected' and 'cap' in f.reason
    (f,) = execute(pf, [Order('BUY', 'AAA', 0.1)], np.array([50.0, 50.0]), day=4)  # halved: room for more
    # equity at the open 85,000 + 150 x 50 = 92,500; cap 13,875 = 277.5 shares; held 150 -> room 127;
    # 0.1 x 85,000 / 50 = 170 wanted -> 127
    assert (f.status, f.shares) == ('reduced', 127) and pf.shares[0] == 277


@pytest.mark.parametrize('fraction', [np.float32(0.1), np.float64(0.1), np.float16(0.5), np.int64(1), Fraction(1, 10), True])
def test_real_number_fractions_trade_as_the_float_they_equal(fraction):
    "An RL policy's float32 or int64 fraction fills exactly like the Python float it equals (money never in float32)."
    a, b = (Portfolio(['AAA'], capital=123_456.789, cost=0.001, slippage=0.002) for _ in range(2))
    got = execute(a, [Order('BUY', 'AAA', fraction)], np.array([10.1]), day=1)
    want = execute(b, [Order('BUY', 'AAA', float(fraction))], np.array([10.1]), day=1)
    assert [f.as_dict() for f in got] == [f.as_dict() for f in want] and got[0].status == 'filled'
    assert a.cash == b.cash and type(a.cash) is float and a.shares.tolist() == b.shares.tolist()


def test_orders_that_are_not_orders_are_rejected_not_raised():
    "Order objects built in code with the wrong types are answered with a reason; nothing raises."
    pf = Portfolio(['AAA'], capital=1_000)
    f = execute(pf, [Order('BUY', ['AAA'], 0.5), Order('BUY', 'AAA', Decimal('0.5')), Order(None, None, None),
                     Order('BUY', 'AAA', '0.5')], np.array([10.0]), day=1)
    assert [x.status for x in f] == ['rejected'] * 4
    assert ['not in this episode' in f[0].reason, 'invalid order' in f[1].reason, 'not in this episode' in f[2].reason,
            'invalid order' in f[3].reason] == [True] * 4
    assert pf.cash == 1_000 and pf.trades == 0


def test_execute_refuses_invalid_fractions():
    pf = Portfolio(['A', 'B', 'C', 'D'], capital=100_000, cost=0.001, slippage=0.001, max_position=0.3, max_trades=10)
    opens = np.full(4, 100.0)
    execute(pf, [Order('BUY', s, 1.0) for s in 'ABC'], opens, day=1)
    f = execute(pf, [Order('BUY', 'D', 5.0), Order('BUY', 'A', float('nan')), Order('SELL', 'B', -1.0)], opens, day=2)
    assert pf.cash >= 0
    assert [x.status for x in f] == ['rejected'] * 3


# ---------------------------------------------------------------- invariants under random order streams

@st.composite
def markets(draw):
    n = draw(st.integers(1, 4))
    days = draw(st.integers(1, 8))
    price = st.floats(0.5, 60_000, allow_nan=False)
    opens = np.array(draw(st.lists(st.lists(price, min_size=n, max_size=n), min_size=days, max_size=days)))
    closes = np.array(draw(st.lists(st.lists(price, min_size=n, max_size=n), min_size=days, max_size=days)))
    syms = [f'S{i}' for i in range(n)]
    order = st.builds(Order, st.sampled_from(['BUY', 'SELL']), st.sampled_from(syms),
                      st.one_of(st.floats(1e-6, 1.0), st.sampled_from([1.0, 0.5, 0.1, 0.999999])))
    stream = draw(st.lists(st.lists(order, max_size=12), min_size=days, max_size=days))
    params = dict(capital=draw(st.sampled_from([1_000, 100_000, 500_000, 12_345.67])),
                  cost=draw(st.floats(0, 0.01)), slippage=draw(st.floats(0, 0.01)),
                  max_position=draw(st.floats(0.05, 1.0)), max_trades=draw(st.integers(1, 10)))
    start = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))  # shares held before day 1 (set_holding)
    return syms, opens, closes, stream, params, start


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(markets(), st.booleans())
def test_portfolio_invariants(market, gate):
    syms, opens, closes, stream, params, start = market
    pf = Portfolio(syms, **params)
    for s, n, price in zip(syms, start, opens[0]): pf.set_holding(s, n, cost_basis=n * price)
    for day, (o, c, orders_) in enumerate(zip(opens, closes, stream), start=1):
        cash0, shares0, cost0 = pf.cash, pf.shares.copy(), pf.total_cost
        equity_open = pf.equity(o)
        fills = execute(pf, orders_, o, day, buy_allowed=not (gate and day % 2))
        assert len(fills) == len(orders_)  # every order is answered
        cash = cash0
        for k, f in enumerate(fills):
            assert f.status in ('filled', 'reduced', 'rejected') and f.cost >= 0 and isinstance(f.shares, int)
            if f.status != 'filled': assert f.reason
            if k >= params['max_trades']: assert f.status == 'rejected' and 'daily limit' in f.reason
            if f.status == 'rejected':
                assert f.shares == 0
                continue
            assert f.shares > 0
            i = syms.index(f.symbol)
            gross = f.shares * f.price
            assert f.cost == pytest.approx(gross * params['cost'], rel=1e-12, abs=1e-12)
            if f.side == 'BUY':
                assert f.price == pytest.approx(o[i] * (1 + params['slippage']), rel=1e-12)
                cash -= gross + f.cost
                # the per-stock cap, at the fill price, against equity at the open (one share of tolerance)
                assert pf.shares[i] * f.price <= params['max_position'] * equity_open + f.price + 1e-6
            else:
                assert f.price == pytest.approx(o[i] * (1 - params['slippage']), rel=1e-12)
                cash += gross - f.cost
        assert pf.cash >= 0 and pf.cash == pytest.approx(cash, rel=1e-12, abs=1e-6)
        assert pf.shares.dtype.kind == 'i' and (pf.shares >= 0).all()
        assert pf.total_cost >= cost0 and pf.trades == sum(1 for _, f in pf.fills if f.status != 'rejected')
        assert pf.total_cost == pytest.approx(sum(f.cost for _, f in pf.fills), rel=1e-9, abs=1e-9)
        held_before = shares0 > 0
        assert (pf.avg_cost()[held_before & (pf.shares > 0)] > 0).all()
        eq = mark(pf, c, day)
        assert eq == pytest.approx(pf.cash + float(pf.shares @ c), rel=1e-12) and pf.equity_history[-1] == eq
    assert len(pf.equity_history) == len(opens) + 1
