"""Evaluation harness: BCa bootstrap against known distributions, paired comparisons (to do-nothing and buy-and-hold), MLflow runs (FAILED on errors,
Ctrl-C and SIGTERM), atomic results, the CLI's bad-input errors, rescore, and the real-data leaderboard."""
import json
import math
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tradellm import evaluate as ev
from tradellm.agents import Agent, RSIAgent, RandomAgent, make_agent
from tradellm.data import save_panel, synthetic_panel
from tradellm.env import TradingEnv
from tradellm.tasks import ENV_VERSION, TASKS
from tests.conftest import runs_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(synth_panel, tmp_path_factory):
    "The synthetic panel as a folder of CSVs, for the CLI."
    return save_panel(synth_panel, tmp_path_factory.mktemp('prices'))


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


def test_bootstrap_covers_the_true_mean_of_skewed_samples():
    "Skewed scores (exponential, 30 episodes), where BCa corrects the percentile interval: still about 95% coverage."
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(400):
        x = rng.exponential(0.1, 30)
        lo, hi = ev.bootstrap_ci(x, n_resamples=2_000, seed=k)
        hits += lo <= 0.1 <= hi
    assert 0.90 <= hits / 400 <= 0.98, hits / 400


@pytest.mark.parametrize('n', [50, 2_000, 10_000])
def test_bootstrap_matches_the_analytic_interval(n):
    "BCa bootstrap of the mean vs mean +- 1.96 sd/sqrt(n) on normal samples (resampled in batches for long inputs)."
    x = np.random.default_rng(n).normal(0.4, 0.1, n)
    lo, hi = ev.bootstrap_ci(x, n_resamples=4_000 if n < 5_000 else 1_000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(n)
    tol = 0.15 * half
    assert abs(lo - (x.mean() - half)) < tol and abs(hi - (x.mean() + half)) < tol


def test_bootstrap_is_scipys_bca_seeded():
    "The interval is scipy's BCa with the given resamples and seed, so a leaderboard prints the same numbers every time."
    from scipy import stats
    x = np.random.default_rng(5).beta(2, 5, 50)
    ci = stats.bootstrap((x,), np.mean, n_resamples=3_000, method='BCa', rng=np.random.default_rng(9)).confidence_interval
    assert ev.bootstrap_ci(x, n_resamples=3_000, seed=9) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert ev.bootstrap_ci(x, n_resamples=3_000, seed=9) == ev.bootstrap_ci(x, n_resamples=3_000, seed=9)
    assert ev.bootstrap_ci(x, n_resamples=3_000, seed=9) != ev.bootstrap_ci(x, n_resamples=3_000, seed=10)


def test_bootstrap_degenerate_inputs_give_no_warning_and_no_nan():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # scipy's DegenerateDataWarning, numpy's 0/0: none may escape
        assert ev.bootstrap_ci([0.575] * 50) == (0.575, 0.575)  # all equal: zero width
        assert ev.bootstrap_ci([0.61]) == (0.61, 0.61)  # one episode: no interval
        assert ev.paired_diff([0.5] * 9, [0.5] * 9)['lo'] == 0.0
        lo, hi = ev.bootstrap_ci([0.575] * 49 + [0.575 + 1e-16])  # BCa's acceleration is 0/0: the percentile interval
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
        lo, hi = ev.bootstrap_ci([0.0] * 48 + [0.01, 0.02])  # sparse differences (an agent that trades on 2 episodes of 50)
        assert math.isfinite(lo) and 0 <= lo <= hi


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
                 env_version=ENV_VERSION, task_version=TASKS['easy'].version,
                 metrics=dict(total_return=r, sharpe=1.0, max_drawdown=0.02, trades=2, buy_and_hold_return=b, costs=10.0 * k,
                              exposure=0.5, seed_score=0.3 + 0.1 * k, risk_score=0.5, pnl_score=0.5 + r / 0.2, drawdown_score=0.9,
                              alpha_score=0.5 + (r - b) / 0.1))
            for k, (s, sc, r, b) in enumerate(zip(seeds, scores, returns, bh))]


def test_summarize_by_hand():
    recs = fake_records([0.4, 0.6, 0.5, 0.3], [0.01, 0.02, -0.01, 0.00005], [0.0, 0.03, -0.02, 0.0])
    row = ev.summarize(recs, fake_records([0.3] * 4, [0] * 4, [0] * 4), buy_and_hold=fake_records([0.5, 0.7, 0.3, 0.3], [0] * 4, [0] * 4))
    assert row['score_mean'] == pytest.approx(0.45) and row['return_mean'] == pytest.approx(0.0050125)
    assert row['beat_buy_and_hold'] == 0.5  # episodes 0 and 2 beat their buy-and-hold; 3 is ahead by half a basis point: a tie
    assert row['diff_do_nothing'] == pytest.approx(0.15) and row['trades_mean'] == 2
    assert row['diff_buy_and_hold'] == pytest.approx(0.0, abs=1e-12) and row['diff_buy_and_hold_lo'] < 0 < row['diff_buy_and_hold_hi']
    assert (row['exposure_mean'], row['costs_mean'], row['seed_score_mean']) == (0.5, 15.0, pytest.approx(0.45))
    assert row['alpha_score_mean'] == pytest.approx(0.5 + (0.01 - 0.01 + 0.01 + 0.00005) / 4 / 0.1)
    assert row['format_error_rate'] == pytest.approx(0.5 / 20) and row['seeds'] == '0..3'
    assert row['score_std'] == pytest.approx(np.std([0.4, 0.6, 0.5, 0.3], ddof=1))
    with pytest.raises(ValueError, match='same seeds'): ev.summarize(recs, fake_records([0.3] * 4, [0] * 4, [0] * 4, [5, 6, 7, 8]))
    with pytest.raises(ValueError, match='buy_and_hold baseline must be run on the same seeds'):
        ev.summarize(recs, buy_and_hold=fake_records([0.3] * 4, [0] * 4, [0] * 4, [5, 6, 7, 8]))
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
        assert (r['seed'], r['episode'], r['start'], r['symbols']) == (10 + i, i, env.dates[0], list(env.symbols))
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
    for task in ('easy', 'hard'):  # do-nothing's score moves with the market; its difference to itself does not
        dn = [x for x in res['rows'] if x['spec'] == 'do_nothing' and x['task'] == task][0]
        assert (f"| do_nothing | {dn['score_mean']:.3f} [{dn['score_lo']:.3f}, {dn['score_hi']:.3f}] | +0.000 [+0.000, +0.000] | "
                f"{dn['diff_buy_and_hold']:+.3f} [") in md
        bh = [x for x in res['rows'] if x['spec'] == 'buy_and_hold' and x['task'] == task][0]
        assert f"| buy_and_hold | {bh['score_mean']:.3f} [" in md and '| +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |' not in md
        assert (bh['diff_buy_and_hold'], bh['diff_buy_and_hold_lo'], bh['diff_buy_and_hold_hi']) == (0.0, 0.0, 0.0)
        assert f"doing nothing scores {dn['score_mean']:.3f} on them" in md
    assert '| agent | score [95% CI] | vs do-nothing [95% CI] | vs B&H [95% CI] | return | Sharpe | max DD | exposure | trades/ep | costs | beats B&H |' in md
    assert '0.40 risk + 0.30 P&L + 0.15 drawdown + 0.15 alpha' in md and '0.575 in a flat window' in md and 'BCa' in md
    assert f'Environment {ENV_VERSION}' in md and 'seeds 3..7' in md
    assert 'tradellm evaluate --agents rsi,do_nothing,buy_and_hold --tasks easy,hard --split test --episodes 5 --seed 3' in md
    df = pd.read_csv(out / 'episodes.csv')
    assert len(df) == 30 and set(df.agent) == {'rsi', 'do_nothing', 'buy_and_hold'}
    assert {'seed_score', 'exposure', 'costs', 'risk_score', 'alpha_score', 'excess_return'} <= set(df.columns)
    assert not {'sharpe_score', 'activity_score'} & set(df.columns)
    assert (df[df.agent == 'do_nothing'].seed_score.round(12) == 0.3).all()  # the tasks-1.x score, beside
    # paired: every agent saw the same stocks and windows
    assert df.groupby(['task', 'seed']).symbols.nunique().max() == 1 and df.groupby(['task', 'seed']).start.nunique().max() == 1
    summ = json.loads((out / 'summary.json').read_text())
    assert summ['meta']['episodes'] == 5 and len(summ['rows']) == 6 and summ['meta']['n_resamples'] == 1_000
    assert 'BCa' in summ['meta']['interval'] and summ['meta']['beat_margin'] == 1e-4
    assert all({'seed_score_mean', 'exposure_mean', 'costs_mean', 'diff_buy_and_hold'} <= set(x) for x in summ['rows'])
    lines = (out / 'episodes.jsonl').read_text().splitlines()
    assert len(lines) == 30 and 'equity' in json.loads(lines[0])
    # MLflow: one FINISHED run per agent x task, with versions, params, metrics and artifacts
    from mlflow import MlflowClient
    runs = {(r.data.tags['agent'], r.data.tags['task']): r for r in runs_of(mlflow_uri, split='test')
            if r.info.run_id in {row['mlflow_run_id'] for row in res['rows']}}
    assert len(runs) == 6
    r = runs[('rsi', 'hard')]
    assert r.info.status == 'FINISHED' and r.data.tags['env_version'] == ENV_VERSION and r.data.tags['task_version'] == TASKS['hard'].version
    assert r.data.params['episodes'] == '5' and r.data.params['agent.buy_below'] == '35.0' and r.data.params['seeds'] == '3..7'
    assert r.data.metrics['score_mean'] == pytest.approx([x for x in res['rows'] if x['spec'] == 'rsi' and x['task'] == 'hard'][0]['score_mean'])
    dn = [x for x in res['rows'] if x['spec'] == 'do_nothing' and x['task'] == 'easy'][0]
    assert runs[('do_nothing', 'easy')].data.metrics['score_hi'] == dn['score_hi']
    assert runs[('do_nothing', 'easy')].data.metrics['seed_score_mean'] == pytest.approx(0.3)
    assert 'diff_buy_and_hold_hi' in r.data.metrics and 'exposure_mean' in r.data.metrics
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
    assert not any('diff_buy_and_hold' in r for r in res['rows'])  # buy-and-hold is not run unlisted: its column stays blank
    r = res['rows'][0]
    cash = ev.run_episodes('do_nothing', 'easy', 'val', 3, data=synth_panel, progress=False)
    assert r['diff_do_nothing'] == pytest.approx(r['score_mean'] - ev.mean([x['score'] for x in cash]))
    md = ev.leaderboard_markdown(res)
    assert '| rsi | ' in md and "`buy_and_hold` is not among these agents, so *vs B&H* is blank" in md
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
    assert '(`scipy.stats.bootstrap`, 321 resamples, seeded)' in (tmp_path / 'out' / 'leaderboard.md').read_text()
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


def test_leaderboard_agents(monkeypatch, tmp_path):
    import tradellm.ppo as ppo
    monkeypatch.setattr(ppo, 'default_model_dir', lambda task: tmp_path / 'ppo' / task)
    monkeypatch.setattr(ev, '_default_llm_available', lambda: True)
    monkeypatch.setattr(ev, '_gpu_present', lambda: False)  # installed but no GPU: left out unless asked for (hours on a CPU)
    assert ev.leaderboard_agents(['easy'])['easy'] == ['do_nothing', 'buy_and_hold', 'rsi', 'random']
    assert ev.leaderboard_agents(['easy'], llm=True)['easy'][-1] == 'llm:smollm2'
    monkeypatch.setattr(ev, '_gpu_present', lambda: True)
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
    monkeypatch.setitem(sys.modules, 'tradellm.llm', types.SimpleNamespace(leaderboard_spec=lambda task: broken()))
    assert ev._default_llm_available() is False
    monkeypatch.setitem(sys.modules, 'tradellm.llm', types.SimpleNamespace(leaderboard_spec=lambda task: 'llm:smollm2'))
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
    assert [r['spec'] for r in s['rows']] == ['buy_and_hold', 'rsi'] and s['meta']['split'] == 'val'  # buy-and-hold first: rsi's baseline
    assert s['rows'][1]['diff_buy_and_hold'] == pytest.approx(s['rows'][1]['score_mean'] - s['rows'][0]['score_mean'])
    assert s['meta']['mlflow_uri'] == mlflow_uri and s['out'] is None
    out = tmp_path / 'lb'
    assert ev.cli_leaderboard(['--episodes', '2', '--tasks', 'easy', '--data', str(data_dir), '--out', str(out), '--no-llm',
                               '--no-mlflow', '--quiet']) == 0
    text = capsys.readouterr().out
    assert re.search(r"\| do_nothing \| 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] \| \+0\.000 \[\+0\.000, \+0\.000\] \| [+-]0\.\d{3} \[", text)
    assert '| vs B&H [95% CI] |' in text and 'wrote' in text
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
    assert re.search(r"rescored random:5 \(easy, val\): run \w{8} \(env 0\.9\.0, task 1\.0\.0, no score recorded\) -> run \w{8} "
                     rf"\(env {re.escape(ENV_VERSION)}, task {re.escape(TASKS['easy'].version)}, score 0\.\d{{3}}\)", out), out
    runs = runs_of(mlflow_uri, agent='random:5')
    assert sorted((r.data.tags['env_version'], r.info.status) for r in runs) == [('0.9.0', 'FINISHED'), (ENV_VERSION, 'FINISHED')]
    # now random:5 is current: only the model that cannot be loaded is left, and it is skipped
    res = ev.rescore(episodes=1, data=synth_panel, tracking_uri=mlflow_uri, stale_only=True, progress=False)
    assert {r['agent'] for r in res['stale']} == {'random:5', 'ppo:/no/such/model'}
    assert res['rows'] == [] and res['rescored'] == [] and sorted(s['agent'] for s in res['skipped']) == ['ppo:/no/such/model', 'random:5']
    old = [s for s in res['skipped'] if s['agent'] == 'random:5'][0]  # the 0.9.0 run: its later run is current
    assert old['env_version'] == '0.9.0' and old['reason'].endswith('is already on the current versions')
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


def test_rescore_of_a_store_with_tasks_1x_runs(capsys, data_dir, tmp_path, monkeypatch):
    "A store as tasks 1.x left it (env 2.0.0, task 1.0.0): rescore re-scores what it can rebuild and says what it skipped and why."
    from mlflow import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, exp = ev.check_tracking(uri)
    c = MlflowClient(uri)
    def old_run(agent, task='easy', split='val', score=0.3, **params):
        run = c.create_run(exp, tags=dict(tradellm_kind='evaluate', agent=agent, task=task, split=split, env_version='2.0.0',
                                          task_version='1.0.0'))
        for k, v in dict(episodes=3, seed=4, n_resamples=500, **params).items(): c.log_param(run.info.run_id, k, str(v))
        c.log_metric(run.info.run_id, 'score_mean', score)
        c.set_terminated(run.info.run_id)
        time.sleep(0.01)  # distinct start times: the later run is the latest
        return run.info.run_id
    first = old_run('do_nothing', score=0.3)
    second = old_run('do_nothing', score=0.3)  # a later run of the same agent, task and split stands for the first
    bh = old_run('buy_and_hold', task='medium', score=0.577)
    gone = old_run('ppo:/no/such/model', score=0.625)
    tuned = old_run('rsi', **{'agent.buy_below': 50})  # an Agent object with its own settings, recorded under 'rsi'
    odd = old_run('random:1', task='extreme')  # a task that no longer exists
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    assert ev.cli_rescore(['--data', str(data_dir), '--quiet']) == 0
    out = capsys.readouterr().out
    assert '6 runs on older versions:' in out
    for rid, agent in ((first, 'do_nothing'), (second, 'do_nothing'), (bh, 'buy_and_hold'), (gone, 'ppo:/no/such/model')):
        assert f"  {rid[:8]} {agent} " in out and 'env 2.0.0, task 1.0.0' in out
    v = re.escape(TASKS['easy'].version)
    assert re.search(rf"rescored do_nothing \(easy, val\): run {second[:8]} \(env 2\.0\.0, task 1\.0\.0, score 0\.300\) -> "
                     rf"run \w{{8}} \(env {re.escape(ENV_VERSION)}, task {v}, score 0\.\d{{3}}\)", out), out
    assert re.search(rf"rescored buy_and_hold \(medium, val\): run {bh[:8]} \(env 2\.0\.0, task 1\.0\.0, score 0\.577\) -> ", out), out
    assert f"skipped do_nothing (easy, val): run {first[:8]} is an older run of do_nothing on easy val: its latest run {second[:8]} was re-scored" in out
    assert f"skipped ppo:/no/such/model (easy, val): run {gone[:8]}: " in out
    assert f"skipped rsi (easy, val): run {tuned[:8]} recorded another agent than 'rsi' builds now (buy_below 50 recorded, 35.0 now" in out
    assert f"skipped random:1 (extreme, val): run {odd[:8]}: task 'extreme' no longer exists" in out
    # the re-scored runs are in the store on the current versions, with the recorded episodes, seed and resamples
    res = ev.rescore(tracking_uri=uri, data=data_dir, stale_only=True, progress=False)
    assert res['rescored'] == [] and {r['agent'] for r in ev.recorded_runs(uri) if r['env_version'] == ENV_VERSION} >= {'do_nothing', 'buy_and_hold'}
    new = [r for r in ev.recorded_runs(uri) if r['env_version'] == ENV_VERSION and r['agent'] == 'buy_and_hold'][0]
    assert (new['task_version'], new['episodes'], new['seed'], new['n_resamples']) == (TASKS['medium'].version, 3, 4, 500)
    assert {s['run_id'] for s in res['skipped']} >= {first, second, bh, gone, tuned, odd}


# ---------------------------------------------------------------- the real data

def test_leaderboard_on_real_data(real_data_dir, tmp_path, monkeypatch):
    "The rule agents on nifty68's test split, a few episodes: do-nothing's difference to itself has a zero-width interval."
    monkeypatch.setattr(ev, '_ppo_spec', lambda task: None)  # a trained PPO model in the cache would add rows
    res = ev.leaderboard(episodes=3, out=tmp_path / 'results', data=real_data_dir, llm=False, track=False, progress=False,
                         n_resamples=1_000)
    assert len(res['rows']) == 12
    md = (tmp_path / 'results' / 'leaderboard.md').read_text()
    assert len(re.findall(r"\| do_nothing \| 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] \| \+0\.000 \[\+0\.000, \+0\.000\] \| [+-]0\.\d{3} \[", md)) == 3
    assert md.count('| +0.000 [+0.000, +0.000] | 100% |') == 0 and md.count('doing nothing scores 0.') == 3
    for r in res['rows']:
        if r['spec'] == 'do_nothing': assert 0.50 <= r['score_mean'] <= 0.65 and r['seed_score_mean'] == pytest.approx(0.3)
    assert 'Split **test** (2024-07-01 ..' in md and '68 symbols' in md
    bh = [r for r in res['rows'] if r['spec'] == 'buy_and_hold']
    assert [r['trades_mean'] for r in bh] == [1, 10, 25]


def test_leaderboard_shows_format_errors_when_language_models_play():
    row = dict(task='easy', score_mean=0.4, score_lo=0.3, score_hi=0.5, return_mean=0.01, sharpe_mean=1.0, max_drawdown_mean=0.02,
               exposure_mean=0.5, trades_mean=3.0, costs_mean=120.0, beat_buy_and_hold=0.5)
    rules = ev._task_table([dict(row, spec='rsi', format_error_rate=0.0)])
    assert 'format errors' not in rules[0] and rules[2].endswith('| 50% | 3.0 | 0.12% | 50% |') and '| - | - |' in rules[2]
    both = ev._task_table([dict(row, spec='rsi', format_error_rate=0.0), dict(row, spec='llm:smollm2', score_mean=0.3, format_error_rate=0.25)])
    assert both[0].endswith('| format errors |') and both[1].count('|') == both[0].count('|')
    assert both[2].startswith('| rsi |') and both[2].endswith('| 0.0% |') and both[3].endswith('| 25.0% |')
