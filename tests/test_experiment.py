"""`tradellm experiment`: resumable stages (stub stages that train nothing), a run killed mid-stage and resumed, and the
smoke profile end to end (slow)."""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# An experiment whose stages are stubs: the real stage table's names and wiring, no training. Every stage appends its name to
# CALLS when it runs; the `grpo` stub sleeps SLEEP seconds (so a test can kill the run there); the evaluation stubs write
# seeded episodes the report reads, so results.md/json come from the real report code.
STUBS = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import numpy as np
    from tradellm.data import synthetic_panel
    from tradellm.experiment import AGENTS, EvalSettings, Stage, get_profile, run_experiment
    from dataclasses import replace

    out, calls = Path(sys.argv[1]), Path(os.environ['CALLS'])
    steps = int(os.environ.get('GRPO_STEPS', '2'))
    ev = EvalSettings(tasks=('easy',), episodes=6)

    def stub(name, sleep=0.0, value=1.0):
        def run(folder, up):
            with open(calls, 'a') as f: f.write(name + '\\n')
            if sleep: time.sleep(sleep)
            (folder / 'done.txt').write_text(name)
            return {'value': value}
        return run

    def eval_stub(label):
        def run(folder, up):
            with open(calls, 'a') as f: f.write(f'eval_{label}\\n')
            bump = sum(v.get('value', 0) for v in up.values())
            with open(folder / 'episodes.jsonl', 'w') as f:
                for i in range(ev.episodes):
                    rng = np.random.default_rng([i, len(label)])
                    f.write(json.dumps(dict(agent=label, task='easy', split='test', episode=i, seed=i, score=float(0.5 + 0.05 * rng.random() + 0.01 * bump),
                                            days=20, format_errors=int(label in ('zero-shot',)), total_return=0.01 * i, exposure=0.5,
                                            trades=2.0, buy_and_hold_return=0.0, env_version='3.0.0', task_version='2.0.0')) + '\\n')
            return {'episodes': str(folder / 'episodes.jsonl')}
        return run

    sleep = float(os.environ.get('SLEEP', '0'))
    stages = [Stage('teacher', stub('teacher'), {'x': 1}), Stage('sft_data', stub('sft_data'), {}, after=('teacher',)),
              Stage('sft', stub('sft'), {}, after=('sft_data',)),
              Stage('grpo', stub('grpo', sleep, value=steps), {'steps': steps}, after=('sft',))]
    reads = {'sft': ('sft',), 'grpo': ('grpo',), 'teacher': ('teacher',)}
    stages += [Stage(f'eval_{k}', eval_stub(k), {'agent': k}, after=reads.get(k, ())) for k in AGENTS if k != 'ppo']
    p = replace(get_profile('smoke'), evaluation=ev)
    run_experiment(p, out, synthetic_panel(n_days=1100, symbols=12, start='2021-01-04', seed=7), progress=False,
                   command='stub experiment', stages=stages)
''')


def run_stubs(tmp_path, out, mlflow_db, wait=True, **env):
    script = tmp_path / 'stubs.py'
    script.write_text(STUBS)
    e = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}", CALLS=str(tmp_path / f'calls-{out.name}.txt'),
             **{k: str(v) for k, v in env.items()})
    p = subprocess.Popen([sys.executable, str(script), str(out)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return p


def calls(tmp_path, out) -> list:
    f = tmp_path / f'calls-{out.name}.txt'
    return f.read_text().split() if f.exists() else []


def stage_runs(mlflow_db) -> list:
    from mlflow import MlflowClient
    c = MlflowClient(f"sqlite:///{mlflow_db}")
    exp = c.get_experiment_by_name('tradellm')
    return c.search_runs([exp.experiment_id], order_by=['attributes.start_time ASC'])


def test_stages_reuse_rerun_and_invalidate(tmp_path):
    "A finished stage is reused, a changed input re-runs it and what reads from it, a failed stage re-runs."
    from tradellm.experiment import Stage, read_stage, run_stages
    log = []

    def stub(name, fail=False):
        def run(folder, up):
            log.append(name)
            if fail: raise RuntimeError(f"{name} failed")
            return {'n': 1 + sum(u['n'] for u in up.values())}
        return run

    def table(steps=2, fail=()):
        return [Stage('sft', stub('sft', 'sft' in fail), {'steps': 1}), Stage('grpo', stub('grpo', 'grpo' in fail), {'steps': steps}, after=('sft',)),
                Stage('eval_grpo', stub('eval_grpo', 'eval_grpo' in fail), {}, after=('grpo',)), Stage('eval_bh', stub('eval_bh'), {})]

    out = tmp_path / 'exp'
    r = run_stages(table(), out, log=None)
    assert log == ['sft', 'grpo', 'eval_grpo', 'eval_bh'] and r['eval_grpo']['outputs'] == {'n': 3}
    log.clear()
    r = run_stages(table(), out, log=None)
    assert log == [] and {v['status'] for v in r.values()} == {'reused'} and r['eval_grpo']['outputs'] == {'n': 3}
    log.clear()
    run_stages(table(steps=3), out, log=None)
    assert log == ['grpo', 'eval_grpo']  # a changed input: that stage and its downstream, nothing else
    log.clear()
    with pytest.raises(RuntimeError, match='eval_grpo failed'): run_stages(table(steps=4, fail=('eval_grpo',)), out, log=None)
    assert read_stage(out / 'grpo')['status'] == 'done' and read_stage(out / 'eval_grpo')['status'] == 'failed'
    log.clear()
    run_stages(table(steps=4), out, log=None)
    assert log == ['eval_grpo']  # the failed stage re-runs; grpo finished under the same key and is reused
    rec = read_stage(out / 'grpo')
    assert rec['inputs'] == {'steps': 4} and rec['seconds'] is not None and rec['versions']['tradellm']


def check_report(out, db):
    "The stub run's report (results.md/json, the figure) and its MLflow runs: one experiment run, a child run per stage."
    res = json.loads((out / 'results.json').read_text())
    rows = {r['agent']: r for r in res['tasks']['easy']}
    assert list(rows) == ['zero-shot', 'sft', 'grpo', 'teacher', 'buy_and_hold', 'do_nothing']
    assert rows['grpo']['score_lo'] <= rows['grpo']['score'] <= rows['grpo']['score_hi'] and 'vs_sft' in rows['grpo'] and 'vs_bh' in rows['sft']
    md = (out / 'results.md').read_text()
    for label in rows: assert f"| {label} | " in md
    assert 'Reproduce: `stub experiment`' in md and res['meta']['data_fingerprint'] in md and (out / 'chain.png').stat().st_size > 1000
    runs = stage_runs(db)
    parent = [r for r in runs if r.data.tags.get('tradellm_kind') == 'experiment']
    assert len(parent) == 1 and parent[0].info.status == 'FINISHED'
    stages = [r for r in runs if r.data.tags.get('tradellm_kind') == 'experiment-stage']
    assert len(stages) == 4 + 6 and {r.data.tags['mlflow.parentRunId'] for r in stages} == {parent[0].info.run_id}


def test_killed_mid_stage_resumes_to_the_same_table(tmp_path):
    """SIGTERM during GRPO: its MLflow run ends FAILED; the same command again re-runs GRPO only (then what follows), same table
    as an uninterrupted run (whose report and MLflow runs are checked first)."""
    db = tmp_path / 'mlflow.db'
    ref = tmp_path / 'uninterrupted'
    run_stubs(tmp_path, ref, tmp_path / 'ref.db')
    check_report(ref, tmp_path / 'ref.db')
    out = tmp_path / 'killed'
    p = run_stubs(tmp_path, out, db, wait=False, SLEEP=60)
    t0 = time.time()
    while not (out / 'grpo' / 'done.txt').exists() and time.time() - t0 < 120:
        st = out / 'grpo' / 'stage.json'
        if st.exists() and json.loads(st.read_text()).get('mlflow_run_id') and 'grpo' in calls(tmp_path, out): break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode != 0
    assert calls(tmp_path, out) == ['teacher', 'sft_data', 'sft', 'grpo']
    assert json.loads((out / 'grpo' / 'stage.json').read_text())['status'] == 'failed'
    runs = {r.data.tags.get('stage', r.data.tags.get('tradellm_kind')): r.info.status for r in stage_runs(db)}
    assert runs == {'teacher': 'FINISHED', 'sft_data': 'FINISHED', 'sft': 'FINISHED', 'grpo': 'FAILED', 'experiment': 'FAILED'}
    assert not (out / 'results.md').exists()

    run_stubs(tmp_path, out, db, SLEEP=0)
    assert calls(tmp_path, out)[4:] == ['grpo'] + [f'eval_{k}' for k in ('zero-shot', 'sft', 'grpo', 'teacher', 'buy_and_hold', 'do_nothing')]
    got, want = (json.loads((d / 'results.json').read_text()) for d in (out, ref))
    assert got['tasks'] == want['tasks']
    statuses = [r.info.status for r in stage_runs(db) if r.data.tags.get('stage') == 'grpo']
    assert statuses == ['FAILED', 'FINISHED']
    # and a changed GRPO setting re-runs GRPO and the evaluations that read it, nothing before it
    run_stubs(tmp_path, out, db, GRPO_STEPS=3)
    assert calls(tmp_path, out)[11:] == ['grpo', 'eval_grpo']


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path, real_data_dir):
    "`tradellm experiment --profile smoke`: rows with intervals for zero-shot, SFT, GRPO, buy-and-hold and doing nothing on every task."
    out = tmp_path / 'smoke'
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, '-m', 'tradellm.cli', 'experiment', '--profile', 'smoke', '--out', str(out),
                        '--data', str(real_data_dir), '--quiet'], env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # under 15 minutes of CPU: the wall time on a quiet machine, whatever else shares this one (26 min wall at load 10 on 2 cores)
    assert (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime) < 15 * 60
    res = json.loads((out / 'results.json').read_text())
    md = (out / 'results.md').read_text()
    assert res['tasks'] and set(res['tasks']) == set(res['meta']['tasks'])
    for rows in res['tasks'].values():
        by = {row['agent']: row for row in rows}
        for label in ('zero-shot', 'sft', 'grpo', 'buy_and_hold', 'do_nothing'):
            row = by[label]
            assert row['score_lo'] <= row['score'] <= row['score_hi'] and row['episodes'] == res['meta']['episodes']
            assert f"| {label} | {row['score']:.3f} [{row['score_lo']:.3f}, {row['score_hi']:.3f}] |" in md
    # the same command again reuses every stage
    r = subprocess.run([sys.executable, '-m', 'tradellm.cli', 'experiment', '--profile', 'smoke', '--out', str(out),
                        '--data', str(real_data_dir), '--quiet', '--json'], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    assert {v['status'] for v in again['meta']['stages'].values()} == {'reused'} and again['tasks'] == res['tasks']
