"""The farming suite (tasks 2.0.0): scripted agents that try to earn score without trading well.

Under tasks 1.x, holding one share, one-share round trips and "sell a dust position once its Sharpe looks high" all beat
buy-and-hold with returns near zero (the Sharpe part did not depend on position size and the activity part counted
orders). Each agent here plays at least 100 seeded episodes per task on the train and the val split (real nifty68 data
where it lies beside the checkout, else a synthetic panel), and must not gain more than 0.02 over doing nothing on the
same episodes; the random agent must not beat doing nothing. A new idea for farming belongs here, as one more agent."""
import numpy as np
import pytest

from tradellm.agents import RandomAgent
from tradellm.env import TradingEnv
from tradellm.evaluate import run_episodes
from tradellm.tasks import TASKS
from tests.test_env import do_nothing_score
from tests.conftest import play_episode

EPISODES = 100
MARGIN = 0.02


def one_share(env, i):
    "An order for about one share of stock `i`: the fraction of cash that the close plus a 2% margin buys."
    v = env.view
    price = float(v.market[i, 0]) * 1.02
    if v.cash < price * 1.01: return None
    return f"BUY {env.symbols[i]} {price / float(v.cash)!r}"


def sell_all(env, i): return f"SELL {env.symbols[i]} 1"


def held(env): return np.flatnonzero(env.view.shares > 0)


def dust_hold(env, day):
    "Buy one share of every stock on the first day, hold to the end."
    if day: return 'HOLD'
    return '; '.join(o for o in (one_share(env, i) for i in range(len(env.symbols))) if o) or 'HOLD'


def dust_round_trips(env, day):
    "One share in, one share out, every day: the most orders dust can buy."
    if len(held(env)): return '; '.join(sell_all(env, i) for i in held(env))
    return one_share(env, day % len(env.symbols)) or 'HOLD'


def last_day_dust(env, day):
    "Cash all along, then one share of each stock for the last two closes."
    if day < env.task.days - 2: return 'HOLD'
    if day == env.task.days - 2: return dust_hold(env, 0)
    return 'HOLD'


def dust_sell_when_ahead(env, day):
    "Buy one share of a few stocks; sell each as soon as it shows a profit (the 'Sharpe looks high' exit)."
    v = env.view
    if day == 0: return '; '.join(o for o in (one_share(env, i) for i in range(min(5, len(env.symbols)))) if o) or 'HOLD'
    ahead = [i for i in held(env) if v.feature('pnl_pct', i) > 0]
    return '; '.join(sell_all(env, i) for i in ahead) or 'HOLD'


def churn_everything(env, day):
    "All in on one day, all out the next: the whole portfolio turned over every other day."
    if len(held(env)): return '; '.join(sell_all(env, i) for i in held(env))
    n = len(env.symbols)
    return '; '.join(f"BUY {s} {1 / (n - k)!r}" for k, s in enumerate(env.symbols))


def last_day_all_in(env, day):
    "Cash until the last decision, then everything in for one close: exposure bought at the last moment."
    if day != env.task.days - 1: return 'HOLD'
    n = len(env.symbols)
    return '; '.join(f"BUY {s} {1 / (n - k)!r}" for k, s in enumerate(env.symbols))


FARMERS = [dust_hold, dust_round_trips, last_day_dust, dust_sell_when_ahead, churn_everything, last_day_all_in]


def play(policy, env, seed):
    "The last day's info (score and metrics) of one episode of `policy`."
    return play_episode(env, policy, seed)[1][-1]


@pytest.fixture(scope='module')
def panel(request):
    "nifty68 when it is beside the checkout (the data the numbers are about), else 30 synthetic stocks."
    from tests.conftest import REAL_DATA
    from tradellm.data import load_panel, synthetic_panel
    if REAL_DATA.is_dir(): return load_panel(REAL_DATA)
    return synthetic_panel(n_days=1100, symbols=tuple(f'S{i:02d}' for i in range(30)), start='2021-01-04', seed=7)


@pytest.mark.parametrize('split', ['train', 'val'])
@pytest.mark.parametrize('task', list(TASKS))
@pytest.mark.parametrize('policy', FARMERS, ids=lambda f: f.__name__)
def test_farming_does_not_pay(panel, policy, task, split):
    env = TradingEnv(task, split, 'numeric', panel)
    gains, orders = [], 0
    for seed in range(EPISODES):
        info = play(policy, env, seed)
        m = info['metrics']
        gains.append(info['score'] - do_nothing_score(m['buy_and_hold_return']))
        orders += m['trades']
    assert orders > 0, f"{policy.__name__} never traded: the test would prove nothing"
    assert np.mean(gains) <= MARGIN, (
        f"{policy.__name__} gains {np.mean(gains):+.4f} over doing nothing on {task}/{split} ({EPISODES} episodes)")


def passive(exposure):
    "A reference, not a farmer: `exposure` of the capital spread equally over the stocks as soon as the rules allow, then held."
    x = float(exposure)

    def policy(env, day):
        v, n, capital = env.view, len(env.symbols), float(env.task.capital)
        cash, floor, out = float(v.cash), capital * (1 - x), []
        if v.buy_blocked: return 'HOLD'
        for i in [i for i in range(n) if v.shares[i] == 0][:env.task.max_trades]:
            amount = x * capital / n
            if cash - amount < floor - 1: break
            out.append(f"BUY {env.symbols[i]} {amount / cash!r}")
            cash -= amount
        return '; '.join(out) or 'HOLD'
    return policy


@pytest.mark.parametrize('split', ['train', 'val'])
@pytest.mark.parametrize('task', list(TASKS))
def test_random_earns_only_what_its_exposure_earns(panel, task, split):
    """The random agent does not beat doing nothing where the market did not rise, and does not beat a passive position
    of its own average exposure. (Where the market rose, half-invested random trading earns part of the rise, as money at
    risk should: on val, R_B +3.5% to +5%, it scores above cash and far below buy-and-hold.)"""
    records = run_episodes(RandomAgent(seed=0), task, split, episodes=EPISODES, data=panel, progress=False)
    gains = [r['score'] - do_nothing_score(r['metrics']['buy_and_hold_return']) for r in records]
    flat_or_falling = [g for g, r in zip(gains, records) if r['metrics']['buy_and_hold_return'] <= 0]
    assert flat_or_falling and np.mean(flat_or_falling) < 0, f"random beats cash in markets that did not rise ({task}/{split})"
    exposure = np.mean([r['metrics']['exposure'] for r in records])
    env = TradingEnv(task, split, 'numeric', panel)
    passive_scores = [play(passive(exposure), env, seed)['score'] for seed in range(EPISODES)]
    edge = np.mean([r['score'] for r in records]) - np.mean(passive_scores)
    assert edge <= 0.01, f"random beats a passive {exposure:.0%} position by {edge:+.4f} on {task}/{split}"


def test_dust_paid_under_the_seed_score(panel):
    "The suite's agents are the ones that farmed tasks 1.x: holding dust beat doing nothing (0.300) by far on its score."
    env = TradingEnv('easy', 'val', 'numeric', panel)
    seed_gain = [play(dust_hold, env, s)['metrics']['seed_score'] - 0.3 for s in range(20)]
    assert np.mean(seed_gain) > 0.05
