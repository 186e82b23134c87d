"""Evaluation harness: bootstrap against known distributions, paired comparisons, MLflow runs (FAILED on errors,
Ctrl-C and SIGTERM), atomic results, the CLI's bad-input errors, rescore, and the real-data leaderboard."""
import json
import math
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tradellm import evaluate as ev
from tradellm.agents import Agent, RSIAgent, RandomAgent, make_agent
from tradellm.data import save_panel, synthetic_panel
from tradellm.env import TradingEnv
from tradellm.tasks import ENV_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def mlflow_uri(tmp_path_factory):
    "One sqlite store for the module (creating one takes seconds)."
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    ev.check_tracking(uri)
    return uri


@pytest.fixture(scope='module')
def data_dir(synth_panel, tmp_path_factory):
    "The synthetic panel as a folder of CSVs, for the CLI."
    return save_panel(synth_panel, tmp_path_factory.mktemp('prices'))


def runs_of(uri, **tags):
    from mlflow import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(ev.EXPERIMENT)
    flt = ' and '.join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return c.search_runs([exp.experiment_id], flt)


# ---------------------------------------------------------------- statistics

def test_bootstrap_covers_the_true_mean_of_normal_samples():
    "Over 400 samples of 40 normal values, the 95% interval holds the true mean about 95% of the time."
    rng = np.random.default_rng(0)
    hits = 0
    for k in range(400):
        x = rng.normal(1.0, 2.0, 40)
        lo, hi = ev.bootstrap_ci(x, n_resamples=2_000, seed=k)
        hits += lo <= 1.0 <= hi
    assert 0.90 <= hits / 400 <= 0.98, hits / 400


@pytest.mark.parametrize('n', [50, 2_000, 120_000])
def test_bootstrap_matches_the_analytic_interval(n):
    "Percentile bootstrap of the mean vs mean +- 1.96 sd/sqrt(n) (chunked resampling for long inputs)."
    x = np.random.default_rng(n).normal(0.4, 0.1, n)
    lo, hi = ev.bootstrap_ci(x, n_resamples=4_000 if n < 100_000 else 300)
    half = 1.96 * x.std(ddof=1) / math.sqrt(n)
    tol = 0.15 * half if n < 100_000 else 0.3 * half
    assert abs(lo - (x.mean() - half)) < tol and abs(hi - (x.mean() + half)) < tol


def test_bootstrap_edge_cases():
    assert ev.bootstrap_ci([0.3] * 50) == (0.3, 0.3)
    assert ev.bootstrap_ci([2.5]) == (2.5, 2.5)
    x = [0.1, 0.5, 0.2, 0.9]
    assert ev.bootstrap_ci(x, seed=1) == ev.bootstrap_ci(x, seed=1)
    lo, hi = ev.bootstrap_ci(x, level=0.5)
    lo9, hi9 = ev.bootstrap_ci(x, level=0.99)
    assert lo9 <= lo <= hi <= hi9
    with pytest.raises(ValueError, match='at least one'): ev.bootstrap_ci([])
    with pytest.raises(ValueError, match='finite'): ev.bootstrap_ci([1.0, float('nan')])
    assert ev.mean([0.3] * 50) == 0.3 and math.isnan(ev.mean([]))


def test_paired_diff_known_ordering():
    rng = np.random.default_rng(2)
    common = rng.normal(0, 0.2, 60)  # shared episode difficulty
    a, b = 0.5 + common + rng.normal(0, 0.01, 60), 0.45 + common + rng.normal(0, 0.01, 60)
    d = ev.paired_diff(a, b)
    assert 0 < d['lo'] < 0.05 < d['hi'] and d['wins'] > 0.9 and d['n'] == 60
    r = ev.paired_diff(b, a)
    assert r['hi'] < 0 and abs(r['mean'] + d['mean']) < 1e-12
    assert ev.paired_diff([0.4, 0.5], [0.3, 0.4]) == dict(mean=pytest.approx(0.1), lo=pytest.approx(0.1), hi=pytest.approx(0.1),
                                                          wins=1.0, n=2)
    with pytest.raises(ValueError, match='same episodes'): ev.paired_diff([1, 2, 3], [1, 2])


@pytest.mark.parametrize('drift,sign', [(0.004, 1), (-0.004, -1)])
def test_paired_diff_of_real_agents_with_a_known_ordering(drift, sign):
    "On steadily rising prices buy-and-hold beats doing nothing; on falling ones it loses; the interval says so."
    panel = synthetic_panel(n_days=1000, symbols=12, start='2021-01-04', seed=11, drift=drift, vol=0.01)
    bh = ev.run_episodes('buy_and_hold', 'medium', 'test', 20, data=panel, progress=False)
    dn = ev.run_episodes('do_nothing', 'medium', 'test', 20, data=panel, progress=False)
    row = ev.summarize(bh, dn, n_resamples=2_000)
    if sign > 0: assert row['diff_lo'] > 0 and row['return_mean'] > 0
    else: assert row['diff_hi'] < 0 and row['return_mean'] < 0


def fake_records(scores, returns, bh, seeds=None):
    seeds = seeds or list(range(len(scores)))
    return [dict(agent='x', spec='x', task='easy', split='test', seed=s, score=sc, format_errors=k % 2, actions=['HOLD'] * 20,
                 env_version=ENV_VERSION, task_version='1.0.0',
                 metrics=dict(total_return=r, sharpe=1.0, max_drawdown=0.02, trades=2, buy_and_hold_return=b, costs=0.0))
            for k, (s, sc, r, b) in enumerate(zip(seeds, scores, returns, bh))]


def test_summarize_by_hand():
    recs = fake_records([0.4, 0.6, 0.5, 0.3], [0.01, 0.02, -0.01, 0.0], [0.0, 0.03, -0.02, 0.0])
    row = ev.summarize(recs, fake_records([0.3] * 4, [0] * 4, [0] * 4))
    assert row['score_mean'] == pytest.approx(0.45) and row['return_mean'] == pytest.approx(0.005)
    assert row['beat_buy_and_hold'] == 0.5  # episodes 0 and 2 beat their buy-and-hold; 3 ties
    assert row['diff_do_nothing'] == pytest.approx(0.15) and row['trades_mean'] == 2
    assert row['format_error_rate'] == pytest.approx(0.5 / 20) and row['seeds'] == '0..3'
    assert row['score_std'] == pytest.approx(np.std([0.4, 0.6, 0.5, 0.3], ddof=1))
    with pytest.raises(ValueError, match='same seeds'): ev.summarize(recs, fake_records([0.3] * 4, [0] * 4, [0] * 4, [5, 6, 7, 8]))
    with pytest.raises(ValueError, match='at least one'): ev.summarize([])


# ---------------------------------------------------------------- running episodes

class Scripted(Agent):
    "Sends fixed texts; keeps completions; can fail on a given day."
    name = 'scripted'

    def __init__(self, text='BUY 0.5', fail_on=None, exc=RuntimeError, wrong_count=False):
        self.text, self.fail_on, self.exc, self.wrong_count = text, fail_on, exc, wrong_count

    def reset(self, envs):
        self.completions = [[] for _ in envs]
        self.day = 0

    def act(self, envs, observations):
        if self.fail_on is not None and self.day == self.fail_on: raise self.exc('agent broke')
        self.day += 1
        for c in self.completions: c.append(self.text)
        return [self.text] * (len(envs) + self.wrong_count)


def test_run_episodes_pairs_seeds_and_keeps_everything(synth_panel):
    recs = ev.run_episodes(Scripted('<think>x</think> BUY 0.5'), 'easy', 'val', 3, seed=10, data=synth_panel, progress=False)
    for i, r in enumerate(recs):
        env = TradingEnv('easy', 'val', data=synth_panel)
        env.reset(seed=10 + i)
        assert (r['seed'], r['episode'], r['start'], r['symbols']) == (10 + i, i, env._dates[0], list(env.symbols))
        assert len(r['equity']) == 21 and len(r['actions']) == 20 and len(r['completions']) == 20
        assert r['fills'][0]['day'] == 1 and r['fills'][0]['side'] == 'BUY'
        assert r['format_errors'] == 0 and r['env_version'] == ENV_VERSION and r['split'] == 'val'
    bad = ev.run_episodes(Scripted('buy lots of it'), 'easy', 'val', 2, data=synth_panel, progress=False)
    assert all(r['format_errors'] == 20 for r in bad)
    with pytest.raises(RuntimeError, match='returned 3 actions for 2'):
        ev.run_episodes(Scripted(wrong_count=True), 'easy', 'val', 2, data=synth_panel, progress=False)


def test_leaderboard_warns_when_episodes_are_too_few_for_its_intervals(synth_panel):
    "Percentile-bootstrap intervals over a handful of episodes are too narrow; one episode has none at all."
    one = ev.evaluate(['random:1'], ['easy'], 'test', 1, data=synth_panel, track=False, progress=False, n_resamples=200)
    md = ev.leaderboard_markdown(one)
    row = one['rows'][0] if one['rows'][0]['spec'] == 'random:1' else one['rows'][1]
    assert f"| random:1 | {row['score_mean']:.3f} | {row['diff_do_nothing']:+.3f} | " in md  # a mean, no interval
    assert '**Only 1 episode per agent: these intervals are too narrow to cite.**' in md
    five = ev.evaluate(['random:1'], ['easy'], 'test', 5, data=synth_panel, track=False, progress=False, n_resamples=200)
    md = ev.leaderboard_markdown(five)
    assert '**Only 5 episodes per agent' in md and f'use {ev.FEW_EPISODES} or more' in md
    assert re.search(r"\| random:1 \| [\d.]+ \[[\d.]+, [\d.]+\] \|", md)
    enough = ev.evaluate(['do_nothing'], ['easy'], 'test', ev.FEW_EPISODES, data=synth_panel, track=False, progress=False,
                         n_resamples=200)
    assert 'too narrow' not in ev.leaderboard_markdown(enough)


def test_runs_on_changed_prices_are_told_apart(synth_panel, mlflow_uri):
    "The same folder name with other prices (a re-download, an adjustment) must not read as the same data."
    import dataclasses
    later = synth_panel.close.copy()
    later[-200:] *= 1.03
    moved = dataclasses.replace(synth_panel, close=later)
    assert moved.source == synth_panel.source and moved.fingerprint() != synth_panel.fingerprint()
    tags = []
    for p in (synth_panel, moved):
        res = ev.evaluate(['buy_and_hold'], ['easy'], 'test', 2, data=p, tracking_uri=mlflow_uri, progress=False, n_resamples=200)
        run = [r for r in runs_of(mlflow_uri, split='test') if r.info.run_id == res['rows'][0]['mlflow_run_id']][0]
        tags.append(run.data.tags['data_fingerprint'])
    assert tags == [synth_panel.fingerprint(), moved.fingerprint()]


def test_batches_do_not_change_episodes(synth_panel):
    a = ev.run_episodes('random:3', 'medium', 'test', 5, data=synth_panel, progress=False)
    b = ev.run_episodes('random:3', 'medium', 'test', 5, data=synth_panel, progress=False, batch_size=2)
    assert [r['actions'] for r in a] == [r['actions'] for r in b]
    agent = make_agent('rsi')
    agent.episode_batch = 2
    c = ev.run_episodes(agent, 'medium', 'test', 5, data=synth_panel, progress=True)
    assert [r['score'] for r in c] == [r['score'] for r in ev.run_episodes('rsi', 'medium', 'test', 5, data=synth_panel, progress=False)]


# ---------------------------------------------------------------- evaluate, files and MLflow

def test_evaluate_writes_results_and_runs(synth_panel, mlflow_uri, tmp_path):
    out = tmp_path / 'results'
    res = ev.evaluate(['rsi', 'do_nothing', 'buy_and_hold'], ['easy', 'hard'], 'test', 5, seed=3, data=synth_panel, out=out,
                      tracking_uri=mlflow_uri, progress=False, n_resamples=1_000)
    files = sorted(p.name for p in out.iterdir())
    assert files == ['episode_easy.png', 'episode_hard.png', 'episodes.csv', 'episodes.jsonl', 'leaderboard.md',
                     'scores_easy.png', 'scores_hard.png', 'summary.json']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary folder left
    md = (out / 'leaderboard.md').read_text()
    assert '| do_nothing | 0.300 [0.300, 0.300] | +0.000 [+0.000, +0.000] |' in md
    assert f'Environment {ENV_VERSION}' in md and 'seeds 3..7' in md
    assert 'tradellm evaluate --agents rsi,do_nothing,buy_and_hold --tasks easy,hard --split test --episodes 5 --seed 3' in md
    df = pd.read_csv(out / 'episodes.csv')
    assert len(df) == 30 and set(df.agent) == {'rsi', 'do_nothing', 'buy_and_hold'}
    # paired: every agent saw the same stocks and windows
    assert df.groupby(['task', 'seed']).symbols.nunique().max() == 1 and df.groupby(['task', 'seed']).start.nunique().max() == 1
    summ = json.loads((out / 'summary.json').read_text())
    assert summ['meta']['episodes'] == 5 and len(summ['rows']) == 6
    lines = (out / 'episodes.jsonl').read_text().splitlines()
    assert len(lines) == 30 and 'equity' in json.loads(lines[0])
    # MLflow: one FINISHED run per agent x task, with versions, params, metrics and artifacts
    from mlflow import MlflowClient
    runs = {(r.data.tags['agent'], r.data.tags['task']): r for r in runs_of(mlflow_uri, split='test')
            if r.info.run_id in {row['mlflow_run_id'] for row in res['rows']}}
    assert len(runs) == 6
    r = runs[('rsi', 'hard')]
    assert r.info.status == 'FINISHED' and r.data.tags['env_version'] == ENV_VERSION and r.data.tags['task_version'] == '1.0.0'
    assert r.data.params['episodes'] == '5' and r.data.params['agent.buy_below'] == '35.0' and r.data.params['seeds'] == '3..7'
    assert r.data.metrics['score_mean'] == pytest.approx([x for x in res['rows'] if x['spec'] == 'rsi' and x['task'] == 'hard'][0]['score_mean'])
    assert runs[('do_nothing', 'easy')].data.metrics['score_hi'] == 0.3
    # which prices: the panel's fingerprint, on every run, in the summary and in the leaderboard
    fp = synth_panel.fingerprint()
    assert {x.data.tags['data_fingerprint'] for x in runs.values()} == {fp} and summ['meta']['data_fingerprint'] == fp
    assert f'fingerprint `{fp}`' in md
    arts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(r.info.run_id)}
    assert arts == {'episodes.csv', 'scores_hard.png', 'episode_hard.png'}
    hist = MlflowClient(mlflow_uri).get_metric_history(r.info.run_id, 'episode_score')
    assert len(hist) == 5
    # run again into the same folder: replaced as a whole
    ev.evaluate(['do_nothing'], 'easy', 'test', 2, data=synth_panel, out=out, track=False, progress=False)
    assert len(pd.read_csv(out / 'episodes.csv')) == 2


def test_baseline_runs_unlisted_and_agents_per_task(synth_panel):
    res = ev.evaluate({'easy': ['rsi'], 'medium': [RSIAgent(), 'random:2']}, ['easy', 'medium'], 'val', 3, data=synth_panel,
                      track=False, progress=False)
    assert [(r['spec'], r['task']) for r in res['rows']] == [('rsi', 'easy'), ('rsi', 'medium'), ('random:2', 'medium')]
    assert all('diff_do_nothing' in r for r in res['rows'])
    r = res['rows'][0]
    assert r['diff_do_nothing'] == pytest.approx(r['score_mean'] - 0.3)
    assert res['out'] is None and res['meta']['mlflow_uri'] is None


def test_one_row_per_agent_and_two_agents_under_one_label_are_refused(synth_panel, tmp_path):
    # spellings of one agent, and an Agent object equal to a spec's, run once
    res = ev.evaluate(['rsi', 'RSI', RSIAgent(), 'random:2', 'random:02', 'random', 'random:0'], 'easy', 'val', 2, data=synth_panel,
                      track=False, progress=False)
    assert [r['spec'] for r in res['rows']] == ['rsi', 'random:2', 'random']
    assert sorted(res['records']) == [('random', 'easy'), ('random:2', 'easy'), ('rsi', 'easy')]
    # two different agents under one label: refused before anything runs or is written, naming both
    for a, b in ((RSIAgent(), RSIAgent(buy_below=50, trend_veto=-100)), (RandomAgent(seed=1), RandomAgent(seed=2)),
                 ('rsi', RSIAgent(buy_below=50))):
        with pytest.raises(ValueError, match=r"two different agents would both be reported as '(rsi|random)' on easy") as e:
            ev.evaluate([a, b], 'easy', 'val', 2, data=synth_panel, out=tmp_path / 'out', track=False, progress=False)
        assert repr(make_agent(b)) in str(e.value) and 'label of its own' in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # each task plays its own agent, even under one label
    tuned = RSIAgent(buy_below=60, trend_veto=-100)
    res = ev.evaluate({'easy': [tuned], 'medium': [RSIAgent()]}, ['easy', 'medium'], 'val', 3, data=synth_panel, track=False, progress=False)
    alone = ev.run_episodes(tuned, 'easy', 'val', 3, data=synth_panel, progress=False)
    assert [r['score'] for r in res['records'][('rsi', 'easy')]] == [r['score'] for r in alone]
    alone = ev.run_episodes(RSIAgent(), 'medium', 'val', 3, data=synth_panel, progress=False)
    assert [r['score'] for r in res['records'][('rsi', 'medium')]] == [r['score'] for r in alone]


def test_plots_and_text_show_the_tables_intervals(synth_panel, tmp_path, monkeypatch):
    drawn, plot = [], ev.plot_scores
    monkeypatch.setattr(ev, 'plot_scores', lambda *a, **k: drawn.append(k.get('intervals')) or plot(*a, **k))
    res = ev.evaluate(['rsi', 'random:1'], 'medium', 'val', 6, data=synth_panel, out=tmp_path / 'out', track=False, progress=False,
                      n_resamples=321)
    assert '(321 resamples, seeded)' in (tmp_path / 'out' / 'leaderboard.md').read_text()
    assert drawn == [{r['spec']: (r['score_lo'], r['score_hi']) for r in res['rows']}]
    # plot_scores draws the interval it is given, else the bootstrap interval with the resamples and seed it is given
    recs = res['records'][('random:1', 'medium')]
    scores = [r['score'] for r in recs]
    def drawn_interval(fig):
        (x0, _), (x1, _) = fig.axes[0].containers[0].lines[2][0].get_segments()[0]
        return x0, x1
    assert drawn_interval(plot({'a': recs}, intervals={'a': (0.25, 0.75)})) == (0.25, 0.75)
    assert drawn_interval(plot({'a': recs}, n_resamples=321, seed=4)) == pytest.approx(ev.bootstrap_ci(scores, n_resamples=321, seed=4), abs=1e-12)


def test_a_failing_evaluation_marks_its_run_failed_and_writes_nothing(synth_panel, mlflow_uri, tmp_path):
    for exc, tag in ((RuntimeError, 'boom'), (KeyboardInterrupt, 'ctrlc')):
        agent = Scripted(fail_on=4, exc=exc)
        agent.spec = f'scripted:{tag}'
        with pytest.raises(exc):
            ev.evaluate([agent], 'easy', 'test', 3, data=synth_panel, out=tmp_path / 'out', tracking_uri=mlflow_uri, progress=False)
        runs = runs_of(mlflow_uri, agent=f'scripted:{tag}')
        assert [r.info.status for r in runs] == ['FAILED']
    assert list(tmp_path.iterdir()) == []


def test_sigterm_marks_the_run_failed(data_dir, mlflow_uri, tmp_path):
    "A run killed half-way (SIGTERM) is FAILED in MLflow and leaves no results folder."
    script = textwrap.dedent(f"""
        import sys, time
        from tradellm.agents import Agent
        from tradellm import evaluate as ev
        class Slow(Agent):
            name = spec = 'slow'
            def act(self, envs, obs):
                print('acting', flush=True); time.sleep(0.5); return ['HOLD'] * len(envs)
        sys.exit(ev._run_cli('evaluate', lambda: ev.evaluate([Slow()], 'easy', 'test', 2, data={str(data_dir)!r},
                 out={str(tmp_path / 'out')!r}, tracking_uri={mlflow_uri!r}, progress=False)))
    """)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == 'acting'
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert 'FAILED' in err
    assert [r.info.status for r in runs_of(mlflow_uri, agent='slow')] == ['FAILED']
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_any_tracked_run_marks_it_failed(mlflow_uri):
    "SFT, GRPO and PPO log through `tracked_run` without the evaluate CLI: a killed training run still ends FAILED."
    script = textwrap.dedent(f"""
        import time
        from tradellm.evaluate import check_tracking, tracked_run
        uri, exp = check_tracking({mlflow_uri!r})
        with tracked_run(uri, exp, run_name='killed', tags={{'agent': 'killed-training'}}):
            print('running', flush=True); time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == 'running'
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and 'Terminated' in err
    assert [r.info.status for r in runs_of(mlflow_uri, agent='killed-training')] == ['FAILED']


def test_output_folder_checks(tmp_path):
    f = tmp_path / 'file'
    f.write_text('x')
    with pytest.raises(ev.OutputError, match='is a file'): ev.check_out(f)
    with pytest.raises(ev.OutputError, match='cannot write'): ev.check_out(f / 'sub')
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'thesis.tex').write_text('x')
    with pytest.raises(ev.OutputError, match='holds other files'): ev.check_out(other)
    assert ev.check_out(tmp_path / 'new' / 'deep') == tmp_path / 'new' / 'deep'


def test_tracking_checks(tmp_path, monkeypatch):
    f = tmp_path / 'file'
    f.write_text('x')
    with pytest.raises(ev.TrackingError, match='--no-mlflow'): ev.check_tracking(f"sqlite:///{f}/sub/mlflow.db")
    t = time.time()
    with pytest.raises(ev.TrackingError, match='cannot reach the MLflow server'): ev.check_tracking('http://127.0.0.1:9')
    assert time.time() - t < 10
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'sqlite:////somewhere/m.db')
    assert ev.default_tracking_uri() == 'sqlite:////somewhere/m.db'
    monkeypatch.delenv('MLFLOW_TRACKING_URI')
    assert ev.default_tracking_uri().endswith('/data/mlflow.db') and ev.default_tracking_uri().startswith('sqlite:///')


def test_tracked_run_without_tracking_is_inert():
    with ev.tracked_run(None) as run:
        run.log_metrics({'a': 1}); run.log_series('s', [1]); run.log_artifact('nothing')
        assert run.run_id is None


def test_leaderboard_agents(monkeypatch, tmp_path):
    import tradellm.ppo as ppo
    monkeypatch.setattr(ppo, 'default_model_dir', lambda task: tmp_path / 'ppo' / task)
    monkeypatch.setattr(ev, '_default_llm_available', lambda: True)
    assert ev.leaderboard_agents(['easy'])['easy'] == ['do_nothing', 'buy_and_hold', 'rsi', 'random', 'llm:smollm2']
    assert ev.leaderboard_agents(['easy'], llm=False)['easy'] == ['do_nothing', 'buy_and_hold', 'rsi', 'random']
    (tmp_path / 'ppo' / 'medium').mkdir(parents=True)
    (tmp_path / 'ppo' / 'medium' / 'model.zip').write_text('x')
    plan = ev.leaderboard_agents(['easy', 'medium'], llm=False)
    assert plan['easy'][-1] == 'random' and plan['medium'][-1] == f"ppo:{tmp_path / 'ppo' / 'medium'}"


def test_default_llm_availability_is_guarded(monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, 'tradellm.llm', types.SimpleNamespace())
    assert ev._default_llm_available() is False
    def broken(): raise OSError('no cache')
    monkeypatch.setitem(sys.modules, 'tradellm.llm', types.SimpleNamespace(default_model_available=broken))
    assert ev._default_llm_available() is False
    monkeypatch.setitem(sys.modules, 'tradellm.llm', types.SimpleNamespace(default_model_available=lambda: True))
    assert ev._default_llm_available() is True


# ---------------------------------------------------------------- command line

def one_line_error(capsys, fn, argv, *needles):
    rc = fn(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count('\n') == 1, err
    for n in needles: assert n in err, err


def test_cli_bad_input_is_one_line_and_exit_2(capsys, data_dir, tmp_path, monkeypatch):
    d = ['--data', str(data_dir), '--no-mlflow', '--quiet']
    one_line_error(capsys, ev.cli_evaluate, ['--agents', 'rsi,alpha'] + d, "unknown agent 'alpha'", 'choose from')
    one_line_error(capsys, ev.cli_evaluate, ['--tasks', 'easy,extreme'] + d, "unknown task 'extreme'")
    one_line_error(capsys, ev.cli_evaluate, ['--split', 'dev'] + d, "unknown split 'dev'", 'train, val, test')
    one_line_error(capsys, ev.cli_evaluate, ['--episodes', '0'] + d, 'at least 1')
    one_line_error(capsys, ev.cli_leaderboard, ['--episodes', '-3'] + d, 'at least 1')
    f = tmp_path / 'file'
    f.write_text('x')
    one_line_error(capsys, ev.cli_leaderboard, ['--out', str(f / 'results')] + d, 'cannot write to --out')
    one_line_error(capsys, ev.cli_evaluate, ['--data', str(tmp_path / 'nowhere'), '--no-mlflow'], 'no such folder')
    monkeypatch.setattr(ev, '_default_llm_available', lambda: True)  # the note about the LLM row waits for the checks
    one_line_error(capsys, ev.cli_leaderboard, ['--episodes', '0', '--data', str(data_dir)], 'at least 1')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'http://127.0.0.1:9')
    one_line_error(capsys, ev.cli_leaderboard, ['--data', str(data_dir), '--quiet', '--out', str(tmp_path / 'r')],
                   'cannot reach the MLflow server', '--no-mlflow')
    one_line_error(capsys, ev.cli_rescore, [], 'cannot reach the MLflow server')
    assert not (tmp_path / 'r').exists()


def test_cli_evaluate_and_leaderboard(capsys, data_dir, tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', mlflow_uri)
    assert ev.cli_evaluate(['--agents', 'rsi,buy_and_hold', '--tasks', 'easy', '--split', 'val', '--episodes', '3',
                            '--data', str(data_dir), '--json', '--quiet']) == 0
    s = json.loads(capsys.readouterr().out)
    assert [r['spec'] for r in s['rows']] == ['rsi', 'buy_and_hold'] and s['meta']['split'] == 'val'
    assert s['meta']['mlflow_uri'] == mlflow_uri and s['out'] is None
    out = tmp_path / 'lb'
    assert ev.cli_leaderboard(['--episodes', '2', '--tasks', 'easy', '--data', str(data_dir), '--out', str(out), '--no-llm',
                               '--no-mlflow', '--quiet']) == 0
    text = capsys.readouterr().out
    assert '| do_nothing | 0.300 [0.300, 0.300]' in text and 'wrote' in text
    md = (out / 'leaderboard.md').read_text()
    assert '# tradellm leaderboard' in md and '--no-llm' in md and 'Split **test**' in md


def test_rescore_lists_stale_runs_and_reevaluates(capsys, data_dir, mlflow_uri, monkeypatch, synth_panel):
    from mlflow import MlflowClient
    _, exp = ev.check_tracking(mlflow_uri)
    c = MlflowClient(mlflow_uri)
    for agent in ('random:5', 'ppo:/no/such/model'):
        run = c.create_run(exp, tags=dict(tradellm_kind='evaluate', agent=agent, task='easy', split='val',
                                          env_version='0.9.0', task_version='1.0.0'))
        c.log_param(run.info.run_id, 'episodes', '2')
        c.set_terminated(run.info.run_id)
    monkeypatch.setenv('MLFLOW_TRACKING_URI', mlflow_uri)
    assert ev.cli_rescore(['--episodes', '1', '--data', str(data_dir), '--quiet', '--stale-only']) == 0
    out = capsys.readouterr().out
    assert 'random:5 easy val: env 0.9.0' in out and 'skipped ppo:/no/such/model' in out and 'easy (rescored)' in out
    runs = runs_of(mlflow_uri, agent='random:5')
    assert sorted((r.data.tags['env_version'], r.info.status) for r in runs) == [('0.9.0', 'FINISHED'), (ENV_VERSION, 'FINISHED')]
    # now random:5 is current: only the model that cannot be loaded is left, and it is skipped
    res = ev.rescore(episodes=1, data=synth_panel, tracking_uri=mlflow_uri, stale_only=True, progress=False)
    assert {r['agent'] for r in res['stale']} == {'random:5', 'ppo:/no/such/model'}
    assert res['rows'] == [] and [s['agent'] for s in res['skipped']] == ['ppo:/no/such/model']
    assert ev.cli_rescore(['--stale-only', '--json', '--quiet', '--data', str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)['env_version'] == ENV_VERSION


def test_rescore_skips_agents_its_spec_does_not_rebuild(synth_panel, data_dir, tmp_path, monkeypatch, capsys):
    "An Agent object with its own settings is recorded under the plain spec: rescore says so instead of scoring the default."
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = ev.evaluate([RSIAgent(buy_below=50, trend_veto=-100), RandomAgent(seed=7), 'random:3'], 'easy', 'val', 3, data=synth_panel,
                      tracking_uri=uri, progress=False, n_resamples=300)
    assert [r['spec'] for r in res['rows']] == ['rsi', 'random', 'random:3']
    out = ev.rescore(data=synth_panel, tracking_uri=uri, progress=False)
    reasons = {s['agent']: s['reason'] for s in out['skipped']}
    assert sorted(reasons) == ['random', 'rsi']
    assert 'buy_below 50 recorded, 35.0 now; ' in reasons['rsi'] and 'trend_veto -100 recorded, 0.0 now' in reasons['rsi']
    assert 'seed 7 recorded, 0 now' in reasons['random']
    # the agent its spec rebuilds is re-scored as recorded: the same episodes, and the same 300 resamples for its interval
    (new,), old = out['rows'], res['rows'][2]
    assert new['spec'] == 'random:3' and new['mlflow_run_id'] != old['mlflow_run_id']
    assert [new[k] for k in ('score_mean', 'score_lo', 'score_hi')] == [old[k] for k in ('score_mean', 'score_lo', 'score_hi')]
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    assert ev.cli_rescore(['--data', str(data_dir), '--quiet']) == 0
    assert "skipped rsi (easy, val): run " in capsys.readouterr().out


# ---------------------------------------------------------------- the real data

def test_leaderboard_on_real_data(real_data_dir, tmp_path, monkeypatch):
    "The rule agents on nifty68's test split, a few episodes: do-nothing shows 0.300 with a zero-width interval."
    monkeypatch.setattr(ev, '_ppo_model', lambda task: None)  # a trained PPO model in the cache would add rows
    res = ev.leaderboard(episodes=3, out=tmp_path / 'results', data=real_data_dir, llm=False, track=False, progress=False,
                         n_resamples=1_000)
    assert len(res['rows']) == 12
    md = (tmp_path / 'results' / 'leaderboard.md').read_text()
    assert md.count('| do_nothing | 0.300 [0.300, 0.300] | +0.000 [+0.000, +0.000] |') == 3
    assert 'Split **test** (2024-07-01 ..' in md and '68 symbols' in md
    bh = [r for r in res['rows'] if r['spec'] == 'buy_and_hold']
    assert [r['trades_mean'] for r in bh] == [1, 10, 25]


def test_leaderboard_shows_format_errors_when_language_models_play():
    row = dict(score_mean=0.4, score_lo=0.3, score_hi=0.5, return_mean=0.01, sharpe_mean=1.0, max_drawdown_mean=0.02,
               trades_mean=3.0, beat_buy_and_hold=0.5)
    rules = ev._task_table([dict(row, spec='rsi', format_error_rate=0.0)])
    assert 'format errors' not in rules[0] and rules[2].endswith('| 50% |')
    both = ev._task_table([dict(row, spec='rsi', format_error_rate=0.0), dict(row, spec='llm:smollm2', score_mean=0.3, format_error_rate=0.25)])
    assert both[0].endswith('| format errors |') and both[1].count('|') == both[0].count('|')
    assert both[2].startswith('| rsi |') and both[2].endswith('| 0.0% |') and both[3].endswith('| 25.0% |')
