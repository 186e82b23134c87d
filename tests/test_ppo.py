"""PPO baseline: action mapping, scale-free features, train-only normalisation, reward, training, loading, CLI."""
import copy
import functools
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip('stable_baselines3')
import tradellm.ppo as ppo
from tradellm.env import TradingEnv, demo_panel
from tradellm.market import Order
from tradellm.tasks import get_task
from tradellm.ppo import (ACTIONS, HOLD, SELECTION_SEED, ObsNormalizer, PPOAgent, PPOTradingEnv, action_orders, cli_train_ppo,
                          env_orders, fit_normalizer, load_ppo_agent, policy_feature_names, policy_features, run_agent, train_ppo)

TINY = dict(timesteps=512, n_envs=2, checkpoints=2, val_episodes=4, norm_episodes=10, track=False, progress=False,
            ppo_kwargs=dict(n_steps=128, batch_size=128, n_epochs=2))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope='module')
def trained(synth_panel, tmp_path_factory):
    "A tiny PPO model on the generated panel (a few seconds)."
    import torch
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('ppo') / 'easy'
    return train_ppo('easy', seed=0, data=synth_panel, out=out, **TINY), out


# --- actions -------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(ACTIONS) - 1), st.integers(0, 5)), min_size=1, max_size=8), st.booleans())
def test_action_orders_properties(picks, blocked):
    symbols = [f'S{i}' for i in range(len(picks))]
    action, shares = [a for a, _ in picks], [h for _, h in picks]
    orders = action_orders(action, symbols, shares, buy_blocked=blocked)
    sides = [o.side for o in orders]
    assert sides == sorted(sides, key=lambda s: s != 'SELL')  # every SELL before every BUY
    expected = [Order(ACTIONS[a][0], s, ACTIONS[a][1]) for s, a, h in zip(symbols, action, shares)
                if ACTIONS[a][0] == 'SELL' and h * ACTIONS[a][1] >= 1]  # at least one share to sell
    expected += [] if blocked else [Order('BUY', s, ACTIONS[a][1]) for s, a in zip(symbols, action) if ACTIONS[a][0] == 'BUY']
    assert orders == expected


def test_action_menu_is_the_documented_one():
    assert [f"{s} {f:g}" for s, f in ACTIONS] == ['SELL 1', 'SELL 0.5', 'HOLD 0', 'BUY 0.1', 'BUY 0.25', 'BUY 0.5', 'BUY 1']
    assert ACTIONS[HOLD][0] == 'HOLD'
    assert [str(o) for o in action_orders([3, 0], ['A', 'B'], [0, 7])] == ['SELL B 1', 'BUY A 0.1']


def test_bad_actions_say_what_is_wrong():
    with pytest.raises(ValueError, match='one per stock'): action_orders([1, 2, 3], ['A', 'B'])
    with pytest.raises(ValueError, match=r'0\.\.6'): action_orders([-1], ['A'])


def _identity_normalizer(task):
    names = policy_feature_names(task)
    return ObsNormalizer(names, [0.0] * len(names), [1.0] * len(names), clip=1e12)


def _hard_buy_fill_rates(panel, episodes=20):
    "Random actions on hard: per group of 5 slots (symbol order), the share of BUY choices that filled (on ungated days)."
    env = PPOTradingEnv('hard', 'train', panel, _identity_normalizer('hard'))
    rng = np.random.default_rng(0)
    chosen, filled = np.zeros(25), np.zeros(25)
    for ep in range(episodes):
        env.reset(seed=ep)
        done = False
        while not done:
            a = rng.integers(len(ACTIONS), size=25)  # what an untrained policy samples
            symbols, blocked = env.env.symbols, env.env.view.buy_blocked
            _, _, done, _, info = env.step(a)
            if blocked: continue
            chosen += [ACTIONS[x][0] == 'BUY' for x in a]
            for o in info['orders']:
                if o['side'] == 'BUY' and o['status'] in ('filled', 'reduced'): filled[symbols.index(o['symbol'])] += 1
    return filled.reshape(5, 5).sum(1) / chosen.reshape(5, 5).sum(1)


def test_hard_fills_buys_in_every_slot_alike(synth_panel):
    "hard trades 25 stocks with 5 orders a day: which orders are sent must not depend on a stock's place in the alphabet."
    rates = _hard_buy_fill_rates(synth_panel)
    # symbol order sent slots 0-4 first, so slots 15-24 never filled a BUY; shuffled, each group fills at about the mean rate
    assert rates.min() > 0.05, rates
    assert np.all(np.abs(rates / rates.mean() - 1) < 0.25), rates


def test_orders_sent_are_shuffled_per_group_and_capped(synth_panel):
    "Sells before buys, each group in an order drawn from the generator; at most `max_orders` sent."
    symbols = ['A', 'B', 'C', 'D']
    kept = {s: 0 for s in symbols}
    for seed in range(3000):
        orders = action_orders([6, 0, 6, 6], symbols, [0, 5, 0, 0], rng=np.random.default_rng(seed), max_orders=2)
        assert len(orders) == 2 and orders[0] == Order('SELL', 'B', 1.0)  # the one SELL always goes first
        kept[orders[1].symbol] += 1
    assert kept['B'] == 0 and all(900 < kept[s] < 1100 for s in 'ACD'), kept  # each of the 3 BUYs in 1 of 3 days
    # the same generator state gives the same orders
    a = [4, 5, 6, 3, 0, 1]
    same = [action_orders(a, list('UVWXYZ'), [1, 2, 3, 4, 5, 6], rng=np.random.default_rng(7)) for _ in range(2)]
    assert same[0] == same[1] and sorted(map(str, same[0])) == sorted(map(str, action_orders(a, list('UVWXYZ'), [1, 2, 3, 4, 5, 6])))


def test_same_seed_same_orders_and_the_agent_sends_what_training_sends(synth_panel):
    "The shuffle is a function of the episode and the day: the same seed replays the same orders, in training and evaluation."
    norm = _identity_normalizer('hard')
    rng = np.random.default_rng(1)
    actions = [rng.integers(len(ACTIONS), size=25) for _ in range(40)]
    runs = []
    for _ in range(2):
        env = PPOTradingEnv('hard', 'train', synth_panel, norm)
        env.reset(seed=11)
        sent = []
        for a in actions:
            _, _, done, _, info = env.step(a)
            sent.append([o['order'] for o in info['orders']])
        assert done
        runs.append((sent, info['score']))
    assert runs[0] == runs[1]
    assert max(len(s) for s in sent) == 5  # the daily limit of hard: the shuffle chose which were sent

    class Replay:  # a "model" that plays the same actions
        def predict(self, x, deterministic=True): return actions[day][None], None
    agent = PPOAgent(Replay(), norm, 'hard')
    env = TradingEnv('hard', 'train', 'numeric', data=synth_panel)
    obs, _ = env.reset(seed=11)
    for day in range(len(actions)):
        orders = agent.act([env], [obs])[0]
        assert [str(o) for o in orders] == sent[day]
        obs, *_ = env.step(orders)


def test_orders_that_cannot_fill_become_hold():
    "A BUY of a stock at its cap or without the cash for one share, and a SELL of less than one share, use up no slot."
    flat = np.full((31, 10), 100.0)  # medium: 200,000 of cash, 30% cap, fills at 100.1 (slippage) plus 0.1% cost
    env = TradingEnv('medium', 'test', 'numeric', data=demo_panel(flat, flat, [f'S{i}' for i in range(10)]))
    env.reset(seed=0)
    act = lambda **k: np.array([k.get(f'S{i}', HOLD) for i in range(10)])
    _, _, _, _, info = env.step(env_orders(act(S0=6, S1=6, S2=6), env))  # BUY 1 of three stocks: each trimmed to the cap
    assert [info['positions'][s] for s in ('S0', 'S1', 'S2')] == [599] * 3  # floor(0.3 * 200,000 / 100.1)
    _, _, _, _, info = env.step(env_orders(act(S3=6), env))
    assert info['positions']['S3'] == 199 and info['cash'] < 100.1  # floor(19,940.4 / 100.2001): the cash is spent
    assert env_orders(act(S4=6), env) == []  # no cash for one share: not sent
    assert env_orders(act(S0=5), env) == []  # S0 is at its cap (0 shares of room): not sent
    # selling S3 brings in the cash for one: then the BUY is sent (judged at the last close, as the market judges at the open)
    assert [str(o) for o in env_orders(act(S0=5, S3=0, S4=6), env)] == ['SELL S3 1', 'BUY S4 1']
    _, _, _, _, info = env.step(env_orders(act(S0=5, S3=0, S4=6), env))
    assert [o['status'] for o in info['orders']] == ['filled', 'filled']

    one = np.full((21, 1), 60_000.0)  # easy: 100,000 of cash buys one share at 60,000
    env = TradingEnv('easy', 'test', 'numeric', data=demo_panel(one, one, ['AAA']))
    env.reset(seed=0)
    _, _, _, _, info = env.step(env_orders([6], env))
    assert info['positions'] == {'AAA': 1} and info['cash'] == 40_000
    assert env_orders([6], env) == []  # 40,000 of cash buys no share at 60,000
    assert env_orders([1], env) == []  # half of 1 share is no share
    assert env_orders([0], env) == [Order('SELL', 'AAA', 1.0)]


# --- features and normalisation -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _medium_day_one():
    "A medium episode after one BUY: the numeric observation and the env's feature names."
    closes = np.linspace(100, 130, 31)[:, None] * np.linspace(1, 3, 10)[None]
    env = TradingEnv('medium', 'test', 'numeric', data=demo_panel(closes * 0.99, closes, [f'S{i}' for i in range(10)]))
    env.reset(seed=0)
    obs, *_ = env.step([Order('BUY', 'S3', 0.5)])
    return obs, env.feature_names


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 1000.0))
def test_features_do_not_depend_on_the_price_level(k):
    obs, names = _medium_day_one()
    scaled = obs.astype(np.float64).copy()
    for i in range(10):
        for f in ('close', 'macd', 'macd_signal', 'macd_hist', 'avg_cost'):
            scaled[names.index(f'stock{i}.{f}')] *= k
    for f in ('cash', 'equity'): scaled[names.index(f)] *= k
    np.testing.assert_allclose(policy_features(scaled, 10), policy_features(obs, 10), rtol=1e-5, atol=1e-6)
    x = dict(zip(policy_feature_names('medium'), policy_features(obs, 10)))
    assert x['stock3.held'] == 1 and x['stock2.held'] == 0
    assert x['progress'] == pytest.approx(1 / 30)


def test_features_reject_observations_of_another_shape():
    with pytest.raises(ValueError, match="obs_mode='numeric'"): policy_features(np.zeros(23), 1)
    assert policy_features(np.zeros((5, 24)), 1).shape == (5, len(policy_feature_names('easy')))


def test_normalizer_is_fitted_on_train_only(synth_panel, monkeypatch):
    "The statistics come from the train split alone: other splits are never opened, and changing them changes nothing."
    splits = []
    real = ppo.TradingEnv

    class Spy(real):
        def __init__(self, task, split, *a, **k):
            splits.append(split)
            super().__init__(task, split, *a, **k)
    monkeypatch.setattr(ppo, 'TradingEnv', Spy)
    norm = fit_normalizer('easy', synth_panel, episodes=15, seed=3)
    assert splits == ['train'] and norm.fitted_on == 'train' and norm.samples == 15 * 20
    monkeypatch.setattr(ppo, 'TradingEnv', real)

    from tradellm.data import Panel
    after = synth_panel.dates > '2023-12-31'  # val and test days
    arrays = {f: getattr(synth_panel, f).copy() for f in ('open', 'high', 'low', 'close', 'volume')}
    for f in ('open', 'high', 'low', 'close'): arrays[f][after] *= 2.5
    arrays['volume'][after] *= 40
    changed = Panel(synth_panel.dates, list(synth_panel.symbols), **arrays, source='val/test changed')
    assert fit_normalizer('easy', changed, episodes=15, seed=3) == norm

    # and the statistics are what they claim: the mean and std of the train episodes' features
    env = real('easy', 'train', 'numeric', data=synth_panel)
    rng, rows = np.random.default_rng(3), []
    for e in range(15):
        o, _ = env.reset(seed=3 * 100_003 + e)
        done = False
        while not done:
            rows.append(o)
            o, _, done, _, _ = env.step(env_orders(rng.integers(len(ACTIONS), size=1), env))
    x = policy_features(np.stack(rows), 1)
    np.testing.assert_allclose(norm.mean, x.mean(0))
    np.testing.assert_allclose(norm.std, np.where(x.std(0) > 1e-8, x.std(0), 1.0))


@pytest.mark.slow
def test_normalizer_is_frozen_at_val_and_test(trained, synth_panel):
    res, out = trained
    agent = load_ppo_agent(out)
    saved = json.loads((out / 'config.json').read_text())['normalizer']
    assert saved['fitted_on'] == 'train'
    before = copy.deepcopy(agent.normalizer)
    assert before == ObsNormalizer(**saved)
    for split in ('val', 'test'): run_agent(agent, 'easy', split, 6, seed=11, data=synth_panel)
    assert agent.normalizer == before


def test_normalizer_standardises_and_clips():
    n = ObsNormalizer(['a', 'b'], [1.0, -2.0], [2.0, 0.5], clip=3.0)
    np.testing.assert_allclose(n([5.0, -2.25]), [2.0, -0.5])
    np.testing.assert_allclose(n([[101.0, -2.0]]), [[3.0, 0.0]])
    assert n([0.0, 0.0]).dtype == np.float32


# --- the training environment: hand-computed reward ------------------------------------------------------------

def _rising_step_panel():
    "easy on one stock that opens at 100 every day and closes at 110 from day 1 on: buy-and-hold gains 10% on day 1, then nothing."
    opens = np.full((21, 1), 100.0)
    closes = np.full((21, 1), 110.0)
    closes[0] = 100.0
    return demo_panel(opens, closes, ['AAA'])


def _identity_env(panel, shaping=0.1):
    names = policy_feature_names('easy')
    return PPOTradingEnv('easy', 'test', panel, ObsNormalizer(names, [0.0] * len(names), [1.0] * len(names)), shaping=shaping)


def test_reward_is_shaped_daily_return_plus_final_score():
    "The reward is 0.1 x the day's equity change (percent of capital) plus, at the end, the score the leaderboard reports (tasks 2.x)."
    env = _identity_env(_rising_step_panel())
    env.reset(seed=0)
    _, r, done, _, info = env.step(np.array([6]))  # BUY 1: 1,000 shares at the open of 100, marked at 110
    assert info['positions'] == {'AAA': 1000} and info['cash'] == 0.0
    assert r == pytest.approx(0.1 * 100 * 10_000 / 100_000) and not done  # = 1.0
    total = r
    _, r, done, _, info = env.step(np.array([0]))  # SELL 1 at the open of 100: equity back to 100,000 at the close
    assert info['positions'] == {'AAA': 0} and r == pytest.approx(-1.0)
    total += r
    while not done:
        _, r, done, _, info = env.step(np.array([0]))  # nothing held: SELLs become HOLD (no rejected orders)
        assert info['orders'] == []
        total += r
    # daily returns +10%, -9.09%, then 0: return 0, MDD 9.09%, 2 trades; buy-and-hold: +10% on day 1, then 0 (R_B = 10%)
    m = info['metrics']
    rets = np.array([0.1, 100_000 / 110_000 - 1] + [0.0] * 18)
    bench = np.array([0.1] + [0.0] * 19)
    assert (m['total_return'], m['trades']) == (pytest.approx(0.0), 2) and m['max_drawdown'] == pytest.approx(1 / 11)
    assert m['buy_and_hold_return'] == pytest.approx(0.1)
    clip = lambda x: min(max(x, 0.0), 1.0)
    A = np.sqrt(252) * rets.mean() / max(rets.std(ddof=1), bench.std(ddof=1), 0.005)
    parts = dict(risk=clip(0.5 + A / (2 * 5.3)), pnl=0.5, drawdown=1 - (1 / 11) / 0.2, alpha=clip(0.5 + (0.0 - 0.1) / 0.1))
    assert {k: m[f'{k}_score'] for k in parts} == pytest.approx(parts)
    expected = 0.40 * parts['risk'] + 0.30 * parts['pnl'] + 0.15 * parts['drawdown'] + 0.15 * parts['alpha']
    assert info['score'] == pytest.approx(expected, abs=1e-12)
    assert total == pytest.approx(0.0 + info['score'])
    # the tasks-1.x score is still reported beside (the seed's tables), but it is not what PPO is paid
    sharpe = np.sqrt(252) * rets.mean() / rets.std(ddof=1)
    old = 0.40 * clip(sharpe / 3) + 0.30 * 0.5 + 0.15 * (1 - (1 / 11) / 0.2) + 0.15 * min(1, 2 / (0.25 * 20))
    assert m['seed_score'] == pytest.approx(old) and m['seed_score'] != pytest.approx(info['score'])


@pytest.mark.parametrize('close', [110.0, 100.0, 97.0])
def test_doing_nothing_is_paid_what_the_score_gives_cash(close):
    "HOLD every day: no daily reward, and a final reward of 0.50 + 0.15 clip(0.5 - R_B / 0.1) (not the 0.300 of tasks 1.x)."
    opens = np.full((21, 1), 100.0)
    closes = np.full((21, 1), close)
    closes[0] = 100.0
    env = _identity_env(demo_panel(opens, closes, ['AAA']))
    env.reset(seed=0)
    rewards, done = [], False
    while not done:
        _, r, done, _, info = env.step(np.array([HOLD]))
        rewards.append(r)
    R_B = close / 100 - 1
    assert rewards[:-1] == [0.0] * 19
    assert rewards[-1] == pytest.approx(0.50 + 0.15 * min(max(0.5 - R_B / 0.1, 0.0), 1.0), abs=1e-12) == info['score']
    assert info['metrics']['exposure'] == 0.0 and info['metrics']['trades'] == 0


def test_wrapper_checks_its_inputs(synth_panel):
    with pytest.raises(ValueError, match='fit_normalizer'): PPOTradingEnv('easy', 'train', synth_panel)
    names = policy_feature_names('easy')
    with pytest.raises(ValueError, match='fit it on task medium'):
        PPOTradingEnv('medium', 'train', synth_panel, ObsNormalizer(names, [0.0] * len(names), [1.0] * len(names)))


def test_wrapper_passes_gymnasium_checks(synth_panel):
    from gymnasium.utils.env_checker import check_env
    norm = fit_normalizer('medium', synth_panel, episodes=3)
    env = PPOTradingEnv('medium', 'train', synth_panel, norm)
    check_env(env, skip_render_check=True)
    assert env.action_space.nvec.tolist() == [len(ACTIONS)] * 10
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    np.testing.assert_array_equal(a, b)


# --- training, loading, the harness -------------------------------------------------------------------------

@pytest.mark.slow
def test_training_gives_back_the_process_threads(synth_panel, tmp_path):
    "PPO trains on its own thread count; what runs after it in the same process (the experiment's LLM evaluations) keeps its own."
    import torch
    torch.set_num_threads(2)
    train_ppo('easy', seed=0, data=synth_panel, out=tmp_path / 'ppo', threads=1, **TINY)
    assert torch.get_num_threads() == 2


def test_training_is_reproducible_from_the_seed(synth_panel, tmp_path, trained):
    r0, out0 = trained
    r1 = train_ppo('easy', seed=0, data=synth_panel, out=tmp_path / 'again', **TINY)
    assert r1['val'] == r0['val'] and r1['best_timesteps'] == r0['best_timesteps']
    p0 = load_ppo_agent(out0).model.policy.state_dict()
    p1 = load_ppo_agent(tmp_path / 'again').model.policy.state_dict()
    assert all(np.array_equal(p0[k].numpy(), p1[k].numpy()) for k in p0)
    c0, c1 = (json.loads((o / 'config.json').read_text()) for o in (out0, tmp_path / 'again'))
    assert c0['learning_curve'] == c1['learning_curve'] and c0['normalizer'] == c1['normalizer']
    r2 = train_ppo('easy', seed=1, data=synth_panel, out=tmp_path / 'other', **TINY)
    p2 = load_ppo_agent(tmp_path / 'other').model.policy.state_dict()
    assert not all(np.array_equal(p0[k].numpy(), p2[k].numpy()) for k in p0)
    assert r2['seed'] == 1


@pytest.mark.slow
def test_trained_model_keeps_the_best_val_checkpoint(trained, synth_panel):
    res, out = trained
    assert res['trained_timesteps'] == 512 and [v['timesteps'] for v in res['val']] == [256, 512]
    best = max(res['val'], key=lambda v: v['val_score'])
    assert (res['best_timesteps'], res['best_val_score']) == (best['timesteps'], best['val_score'])
    agent = load_ppo_agent(out)  # the saved model is that checkpoint: it scores the same on the same val episodes
    with pytest.warns(UserWarning, match='biased upward'):
        score = np.mean(run_agent(agent, 'easy', 'val', 4, seed=SELECTION_SEED, data=synth_panel))
    assert score == pytest.approx(res['best_val_score'], abs=1e-12)
    cfg = json.loads((out / 'config.json').read_text())
    from tradellm.tasks import ENV_VERSION
    assert (cfg['seed'], cfg['timesteps'], cfg['env_version'], cfg['task_version']) == (0, 512, ENV_VERSION, get_task('easy').version)
    assert len(cfg['learning_curve']) == res['episodes_trained'] > 0
    assert all(0 <= s <= 1 for _, s in cfg['learning_curve'])


class _NoModel:
    def predict(self, x, deterministic=True): return np.full((len(x), 1), HOLD), None


def test_checkpoint_selection_is_clear_of_evaluate_defaults():
    "train_ppo chooses on val seeds from SELECTION_SEED; evaluate plays val seeds 0..49 by default (and --episodes as many)."
    import inspect
    from tradellm.evaluate import evaluate
    assert inspect.signature(evaluate).parameters['seed'].default == 0
    assert SELECTION_SEED >= 10_000  # evaluate would need 10,000 episodes from seed 0 to reach it
    assert inspect.signature(train_ppo).parameters['val_episodes'].default <= 1_000


def test_agent_warns_when_evaluated_on_its_selection_episodes(synth_panel):
    norm = _identity_normalizer('easy')
    envs = [TradingEnv('easy', split, 'numeric', data=synth_panel) for split in ('val', 'val', 'test')]

    def played(agent, seeds):
        obs = [e.reset(seed=s)[0] for e, s in zip(envs, seeds)]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            agent.reset(envs)
            agent.act(envs, obs)
        return [str(x.message) for x in w]

    sel = {'split': 'val', 'seed': 10_000, 'episodes': 8}
    agent = PPOAgent(_NoModel(), norm, 'easy', {'selection': sel, 'path': '/m/easy'})
    assert agent.selection() == sel and agent.config()['selection'] == sel
    assert played(agent, [0, 49, 10_003]) == []  # val 0 and 49 (evaluate's defaults) and test 10,003: not selection episodes
    msgs = played(agent, [10_003, 10_008, 10_007])  # val 10,003 is; val 10,008 is just past 10,000..10,007
    assert len(msgs) == 1
    assert 'val seeds 10000..10007' in msgs[0] and '1 of the episodes' in msgs[0] and 'val seeds 10003..10003' in msgs[0]
    assert 'biased upward' in msgs[0] and '--seed 0 with at most 10000 episodes' in msgs[0] and '/m/easy' in msgs[0]
    # a config saved before the selection was recorded: train_ppo then chose on val seeds 0..val_episodes-1
    old = PPOAgent(_NoModel(), norm, 'easy', {'val_episodes': 64})
    assert old.selection() == {'split': 'val', 'seed': 0, 'episodes': 64, 'inferred': True}
    msgs = played(old, [5, 63, 70])
    assert len(msgs) == 1 and '2 of the episodes' in msgs[0] and 'val seeds 5..63' in msgs[0] and '--seed 64' in msgs[0]
    assert 'predates' in msgs[0]
    assert played(PPOAgent(_NoModel(), norm, 'easy'), [0, 1, 2]) == []  # no training config: nothing to check


@pytest.mark.slow
def test_cli_evaluate_defaults_do_not_replay_the_selection_episodes(trained, synth_panel, data_folder, capsys):
    "The reviewer's case: `tradellm evaluate --agents ppo:DIR` on its defaults (val, seeds 0..) gives no selection episode."
    res, out = trained
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['selection'] == {'split': 'val', 'seed': SELECTION_SEED, 'episodes': 4} == res['selection']
    from tradellm.evaluate import cli_evaluate
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert cli_evaluate(['--agents', f'ppo:{out}', '--tasks', 'easy', '--episodes', '4', '--no-mlflow', '--quiet',
                             '--data', str(data_folder), '--json']) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match='biased upward'):
        assert cli_evaluate(['--agents', f'ppo:{out}', '--tasks', 'easy', '--episodes', '4', '--seed', str(SELECTION_SEED),
                             '--no-mlflow', '--quiet', '--data', str(data_folder), '--json']) == 0


@pytest.mark.slow
def test_agent_runs_in_the_harness(trained, synth_panel):
    from tradellm.agents import Agent, make_agent
    from tradellm.evaluate import run_episodes
    res, out = trained
    agent = make_agent(f'ppo:{out}')
    assert isinstance(agent, PPOAgent) and isinstance(agent, Agent)
    assert (agent.name, agent.obs_mode, agent.config()['name'], agent.config()['seed']) == ('ppo', 'numeric', 'ppo', 0)
    recs = run_episodes(agent, 'easy', 'test', episodes=5, seed=20, data=synth_panel, progress=False)
    assert [r['seed'] for r in recs] == list(range(20, 25))
    assert [r['score'] for r in recs] == pytest.approx(run_agent(agent, 'easy', 'test', 5, seed=20, data=synth_panel))
    assert all(r['format_errors'] == 0 for r in recs)
    envs = [TradingEnv('easy', 'test', 'text', data=synth_panel)]
    with pytest.raises(ValueError, match="obs_mode='numeric'"): agent.act(envs, [envs[0].reset(seed=0)[0]])
    envs = [TradingEnv('hard', 'test', 'numeric', data=synth_panel)]
    with pytest.raises(ValueError, match='--task hard'): agent.act(envs, [envs[0].reset(seed=0)[0]])
    assert agent.act([], []) == []


@pytest.mark.slow
def test_load_errors_and_version_warning(trained, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='train-ppo'): load_ppo_agent(tmp_path / 'missing')
    monkeypatch.setattr(ppo, 'default_model_dir', lambda task: tmp_path / 'models' / task)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'models' / 'easy')): load_ppo_agent('easy')
    res, out = trained
    import shutil
    shutil.copytree(out, tmp_path / 'old')
    cfg = json.loads((tmp_path / 'old' / 'config.json').read_text())
    cfg['env_version'] = '0.0.1'
    (tmp_path / 'old' / 'config.json').write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match='retrain'): agent = load_ppo_agent(tmp_path / 'old' / 'model.zip')
    assert agent.task == 'easy'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_ppo_agent(out)


@pytest.mark.slow
def test_interrupted_retrain_leaves_a_model_with_its_own_normaliser(trained, synth_panel, tmp_path, monkeypatch):
    "The reviewer's case: a retrain into a folder stopped after its first checkpoint must not pair new weights with the old config."
    import shutil
    res, out = trained
    folder = tmp_path / 'm'
    shutil.copytree(out, folder)  # a finished run, seed 0, normaliser of 10 episodes
    real, calls = ppo.run_agent, []

    def stops_at_the_second_val(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ppo, 'run_agent', stops_at_the_second_val)
    with pytest.raises(KeyboardInterrupt):
        train_ppo('easy', seed=1, data=synth_panel, out=folder, **{**TINY, 'norm_episodes': 12})
    monkeypatch.setattr(ppo, 'run_agent', real)
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.zip']  # no temporary file left behind
    with pytest.warns(UserWarning, match="did not finish.*saved at 256 of the run's 512 steps"):
        agent = load_ppo_agent(folder)
    assert (agent.meta['seed'], agent.meta['complete'], agent.meta['best_timesteps']) == (1, False, 256)
    assert agent.normalizer == fit_normalizer('easy', synth_panel, episodes=12, seed=1)  # the new model's own statistics
    assert agent.normalizer.samples == 12 * 20


@pytest.mark.slow
def test_loader_refuses_a_model_of_another_checkpoint(trained, synth_panel, tmp_path, monkeypatch):
    "Stopped between writing model.zip and config.json: the sha256 in the config is the old model's, so loading fails."
    import shutil
    res, out = trained
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['complete'] is True and len(cfg['model_sha256']) == 64
    import hashlib
    assert hashlib.sha256((out / 'model.zip').read_bytes()).hexdigest() == cfg['model_sha256']
    folder = tmp_path / 'm'
    shutil.copytree(out, folder)
    real = ppo.os.replace

    def stop_before_the_config(src, dst):
        if str(dst).endswith('config.json'): raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(ppo.os, 'replace', stop_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        train_ppo('easy', seed=1, data=synth_panel, out=folder, **TINY)
    monkeypatch.setattr(ppo.os, 'replace', real)
    assert json.loads((folder / 'config.json').read_text()) == cfg  # the old config, beside the new model
    with pytest.raises(ValueError, match='model.zip does not belong with config.json.*train-ppo --task easy'):
        load_ppo_agent(folder)


@pytest.mark.slow
def test_loader_warns_on_old_task_rules_and_unchecked_pairs(trained, tmp_path):
    import shutil
    res, out = trained
    for name, change, match in (('task', {'task_version': '0.9.0'}, 'task easy version 0.9.0'),
                                ('nohash', {'model_sha256': None}, 'records no sha256')):
        shutil.copytree(out, tmp_path / name)
        cfg = {**json.loads((out / 'config.json').read_text()), **change}
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (tmp_path / name / 'config.json').write_text(json.dumps(cfg))
        with pytest.warns(UserWarning, match=match):
            assert load_ppo_agent(tmp_path / name).task == 'easy'


def test_train_rejects_bad_sizes(synth_panel):
    with pytest.raises(ValueError, match='timesteps'): train_ppo('easy', 0, data=synth_panel, track=False)
    with pytest.raises(ValueError, match='at least 1'): train_ppo('easy', 10, data=synth_panel, n_envs=0, track=False)


def test_default_model_dir_is_under_the_data_folder():
    from tradellm.data import cache_dir
    assert ppo.default_model_dir('medium') == cache_dir().parent / 'models' / 'ppo' / 'medium'


# --- command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_folder(synth_panel, tmp_path_factory):
    from tradellm.data import save_panel
    return save_panel(synth_panel.select(list(synth_panel.symbols[:8])), tmp_path_factory.mktemp('prices'))


@pytest.mark.slow
def test_cli_trains_saves_and_logs_to_mlflow(data_folder, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    monkeypatch.setattr(ppo, 'DEFAULT_PPO', {**ppo.DEFAULT_PPO, 'n_steps': 64, 'n_epochs': 1})
    rc = cli_train_ppo(['--task', 'easy', '--timesteps', '256', '--seed', '2', '--out', str(tmp_path / 'm'), '--data',
                        str(data_folder), '--n-envs', '2', '--checkpoints', '2', '--val-episodes', '3', '--json'])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert (r['task'], r['seed'], r['trained_timesteps'], len(r['val'])) == ('easy', 2, 256, 2)
    assert (tmp_path / 'm' / 'model.zip').is_file()
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    run = client.get_run(r['mlflow_run_id'])
    assert run.data.tags['stage'] == 'train-ppo' and run.data.params['seed'] == '2'
    assert run.data.tags['env_version'] == r['env_version']
    assert [m.step for m in client.get_metric_history(run.info.run_id, 'val_score')] == [128, 256]
    assert len(client.get_metric_history(run.info.run_id, 'train_episode_score')) == r['episodes_trained']


@pytest.mark.slow
def test_cli_text_summary_and_errors(data_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ppo, 'DEFAULT_PPO', {**ppo.DEFAULT_PPO, 'n_steps': 32, 'n_epochs': 1})
    rc = cli_train_ppo(['--timesteps', '64', '--out', str(tmp_path / 'm'), '--data', str(data_folder), '--n-envs', '2',
                        '--checkpoints', '1', '--val-episodes', '2', '--no-mlflow'])
    out = capsys.readouterr().out
    assert rc == 0 and 'best val score' in out and str(tmp_path / 'm') in out
    assert cli_train_ppo(['--timesteps', '-5']) == 2
    assert cli_train_ppo(['--task', 'impossible']) == 2
    assert cli_train_ppo(['--help']) == 0
    assert 'train-ppo' in capsys.readouterr().out
    assert cli_train_ppo(['--data', str(tmp_path / 'nowhere'), '--no-mlflow']) == 1
    assert 'nowhere' in capsys.readouterr().err


def test_cli_is_wired_into_tradellm(capsys):
    from tradellm.cli import main
    assert main(['train-ppo', '--help']) == 0
    assert '--timesteps' in capsys.readouterr().out
