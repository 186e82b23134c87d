"""The GRPO ablation of issue 20: reward designs trained from one SFT adapter, compared on val; the chosen one on test.

    python scripts/grpo_ablation.py train --adapter SFT                   # the arms -> nbs/results/grpo_ablation_train.json
    python scripts/grpo_ablation.py val --adapter SFT --episodes 50       # paired val table -> nbs/results/grpo_ablation.json
    python scripts/grpo_ablation.py test --adapter SFT --arm score --episodes 50   # -> nbs/results/grpo_test.json

Every arm starts from the same SFT adapter with the same seed, prompts, steps and settings (the GRPO stage of an
experiment profile, `--profile cpu` by default: 20 steps, groups of 4, 80 prompts); only the reward design differs,
so the `score` arm is the experiment's own GRPO stage. Stages are resumable: a trained arm (its adapter folder exists) is not retrained, an evaluated one (its
`val_scores.json`) not re-evaluated, and `val --arms NEW` adds rows to the table of the same adapter, episodes and seed
(the evaluations are deterministic: seeded episodes, seeded sampling).
The results files record where they came from (commit, adapter and its metadata, settings, machine, times).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# score_redraws: the score reward with DAPO's dynamic sampling (a step whose groups all earned one reward draws fresh
# prompts, up to twice), the default of train_grpo since; the other arms were trained without it
ARMS = {'pnl5': dict(reward='pnl5', redraws=0), 'score': dict(reward='score', redraws=0),
        'score_redraws': dict(reward='score', redraws=2), 'multiturn': dict(reward='score', multiturn=True, redraws=0)}


def _provenance(a, adapter):
    from tradellm.llm import adapter_meta
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = adapter_meta(adapter)
    sft = Path(adapter) / 'tradellm_sft.json'  # what train_sft recorded: the SFT data version, examples, losses
    if sft.is_file():
        rec = json.loads(sft.read_text())
        meta.update({k: rec.get(k) for k in ('sft_data_version', 'env_version', 'train_loss', 'eval_loss')},
                    train_examples=rec.get('config', {}).get('train_examples'), lora_rank=rec.get('config', {}).get('lora_rank'))
    return dict(commit=commit, adapter=str(adapter), adapter_meta=meta, threads=a.threads,
                machine=f"{os.cpu_count()} CPU cores, shared (load average {os.getloadavg()[0]:.1f} at the end)",
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))


def _agent_scores(agent, split, episodes, seed, panel):
    from tradellm.evaluate import run_episodes
    from tradellm.sft import teacher_agreement
    recs = run_episodes(agent, 'easy', split, episodes, seed, panel, progress=False)
    return dict(scores=[r['score'] for r in recs], trades=[r['metrics']['trades'] for r in recs],
                exposure=[r['metrics']['exposure'] for r in recs], format_errors=[r['format_errors'] for r in recs],
                returns=[r['metrics']['total_return'] for r in recs],
                agreement=teacher_agreement(recs, 'teacher', panel) if getattr(agent, 'obs_mode', '') == 'text' else None)


def _cached_scores(path, make_agent, split, episodes, seed, panel):
    "`_agent_scores`, kept in PATH (one evaluation per agent, episodes and seed) and read back on the next run."
    path = Path(path)
    key = dict(split=split, episodes=episodes, seed=seed, data_fingerprint=panel.fingerprint())
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get('key') == key: return doc['result']
    res = _agent_scores(make_agent(), split, episodes, seed, panel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(key=key, result=res), indent=1))
    return res


def _earlier(path):
    "The results file a previous run of this script wrote at PATH, or {} (its arms are kept when the setup matches)."
    return json.loads(path.read_text()) if path.is_file() else {}


def _row(name, res, ref=None):
    import numpy as np
    from tradellm.evaluate import bootstrap_ci, paired_diff
    from tradellm.tasks import get_task
    lo, hi = bootstrap_ci(res['scores'])
    out = dict(agent=name, score=float(np.mean(res['scores'])), lo=lo, hi=hi, episodes=len(res['scores']),
               trades=float(np.mean(res['trades'])), exposure=float(np.mean(res['exposure'])),
               format_errors=float(np.mean(res['format_errors'])) / get_task('easy').days, return_mean=float(np.mean(res['returns'])),
               as_teacher=res['agreement'] and res['agreement']['decision'],
               on_teacher_trades=res['agreement'] and res['agreement']['on_teacher_trades'])
    if ref is not None:
        d = paired_diff(res['scores'], ref['scores'])
        out.update(diff=d['mean'], diff_lo=d['lo'], diff_hi=d['hi'], wins=d['wins'])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('stage', choices=['train', 'val', 'test'])
    ap.add_argument('--adapter', required=True, help='the SFT adapter every arm starts from')
    ap.add_argument('--arms', default='pnl5,score,multiturn')
    ap.add_argument('--arm', default='score', help='test: the arm chosen on val')
    ap.add_argument('--profile', default='cpu', help="the experiment profile whose GRPO settings every arm uses")
    ap.add_argument('--steps', type=int, default=None, help="optimizer steps per arm (default: the profile's)")
    ap.add_argument('--episodes', type=int, default=50)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default='data/ablation', help='where the arms are trained (ignored by git)')
    ap.add_argument('--data', default=os.environ.get('TRADELLM_DATA', '/work/shared/data/nifty68'))
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--zero-shot', action='store_true', help='test: also evaluate zero-shot SmolLM2 (slow: its answers run to the limit)')
    a = ap.parse_args(argv)
    import torch
    from dataclasses import asdict, replace
    from tradellm.data import load_panel
    from tradellm.experiment import get_profile
    from tradellm.grpo import train_grpo
    torch.set_num_threads(a.threads)
    panel = load_panel(a.data)
    g = get_profile(a.profile).grpo
    if a.steps is not None: g = replace(g, steps=a.steps)
    a.steps, a.seed = g.steps, g.seed
    settings = {k: v for k, v in asdict(g).items() if k not in ('task', 'reward', 'multiturn', 'redraws')}  # the arms set the reward
    out, adapter = Path(a.out), Path(a.adapter)
    arms = [x for x in a.arms.split(',') if x]
    results = ROOT / 'nbs' / 'results'
    results.mkdir(parents=True, exist_ok=True)
    if a.stage == 'train':
        for arm in arms:
            if (out / arm / 'adapter' / 'adapter_config.json').is_file() and (out / arm / 'grpo.json').is_file():
                print(f"{arm}: trained already", file=sys.stderr)
                continue
            t0 = time.time()
            s = train_grpo('smollm2', str(adapter), g.task, out / arm, **settings,
                           resume=(out / arm / 'checkpoints').is_dir() and any((out / arm / 'checkpoints').glob('checkpoint-*')),
                           data=panel, progress=False, **ARMS[arm])
            print(f"{arm}: {s['steps_done']} steps in {time.time() - t0:.0f} s, zero-spread {s['zero_spread_share']:.0%}", file=sys.stderr)
        old = _earlier(results / 'grpo_ablation_train.json')  # arms trained before from the same adapter stay in the record
        runs = {}
        if old.get('provenance', {}).get('adapter') == str(adapter):
            runs = {x: r for x, r in old['runs'].items() if x not in arms}
            arms = list(runs) + arms
        for arm in [x for x in arms if x not in runs]:  # what each arm's training did, step by step (the val and test stages say what it learnt)
            runs[arm] = json.loads((out / arm / 'grpo.json').read_text())  # the whole summary, its history and last samples included
        doc = dict(what='GRPO ablation arms trained from the same SFT adapter (same seed, prompts, steps; only the reward design '
                   'differs): their training signals', profile=a.profile, settings=settings, steps=a.steps, seed=a.seed, arms=arms, runs=runs,
                   provenance=_provenance(a, adapter))
        (results / 'grpo_ablation_train.json').write_text(json.dumps(doc, indent=1, default=str))
        return 0
    if a.stage == 'val':
        from tradellm.llm import make_llm_agent
        sft = _cached_scores(out / 'sft_val_scores.json', lambda: make_llm_agent('smollm2', adapter), 'val', a.episodes, a.seed, panel)
        rows, runs = [_row('SFT', sft)], {}
        old = _earlier(results / 'grpo_ablation.json')  # arms evaluated before on the same adapter, episodes and seed keep their rows
        if (old.get('provenance', {}).get('adapter'), old.get('episodes'), old.get('seed')) == (str(adapter), a.episodes, a.seed):
            keep = [x for x in old['arms'] if x not in arms]
            rows += [r for r in old['rows'] if r['agent'].removeprefix('GRPO ') in keep]
            runs.update({x: old['runs'][x] for x in keep})
            arms = keep + arms
        for arm in [x for x in arms if x not in runs]:
            summ = json.loads((out / arm / 'grpo.json').read_text())
            runs[arm] = {k: v for k, v in summ.items() if k not in ('history', 'last_samples')}
            runs[arm]['zero_spread_by_step'] = [h['zero_spread_share'] for h in summ['history']]
            res = _cached_scores(out / arm / 'val_scores.json', lambda arm=arm: make_llm_agent('smollm2', out / arm / 'adapter'),
                                 'val', a.episodes, a.seed, panel)
            rows.append(_row(f'GRPO {arm}', res, sft))
            print(rows[-1], file=sys.stderr)
        best = max(rows[1:], key=lambda r: r['score'])['agent'].removeprefix('GRPO ')  # the rule fixed before test: best val mean
        doc = dict(what='GRPO ablation on val (issue 20): each arm from the same SFT adapter, same steps and seed; paired '
                   'differences to SFT on the same seeded val episodes', split='val', profile=a.profile, steps=a.steps, seed=a.seed,
                   episodes=a.episodes, arms=arms, rows=rows, chosen=best, chosen_by='the highest mean val score',
                   runs=runs, provenance=_provenance(a, adapter))
        print(f"chosen on val: {best}", file=sys.stderr)
        (results / 'grpo_ablation.json').write_text(json.dumps(doc, indent=1))
        return 0
    from tradellm.llm import make_llm_agent
    grpo = _cached_scores(out / a.arm / 'test_scores.json', lambda: make_llm_agent('smollm2', out / a.arm / 'adapter'), 'test',
                          a.episodes, a.seed, panel)
    from tradellm.agents import make_agent
    teacher = make_agent('teacher')  # the chosen teacher of each task (agents.DEFAULT_TEACHERS), the one the SFT data imitated
    others = [('SFT', lambda: make_llm_agent('smollm2', adapter)), (f"teacher ({teacher.teacher_for('easy').name})", lambda: teacher),
              ('buy-and-hold', lambda: 'buy_and_hold'), ('doing nothing', lambda: 'do_nothing')]
    if a.zero_shot: others.insert(0, ('zero-shot', lambda: make_llm_agent('smollm2')))
    rows = [_row(f'GRPO {a.arm}', grpo)]
    for name, agent in others:  # the language models' evaluations are kept beside the SFT adapter's arms (out/)
        slug = name.split(' (')[0].replace(' ', '_')
        res = _cached_scores(out / f'test_scores_{slug}.json', agent, 'test', a.episodes, a.seed, panel)
        r = _row(name, res)
        from tradellm.evaluate import paired_diff
        d = paired_diff(grpo['scores'], res['scores'])  # GRPO minus this agent, paired
        r.update(grpo_minus=d['mean'], grpo_minus_lo=d['lo'], grpo_minus_hi=d['hi'], grpo_wins=d['wins'])
        rows.append(r)
        print(r, file=sys.stderr)
    doc = dict(what=f'GRPO ({a.arm}, chosen on val) on test against the other agents, paired on the same seeded test episodes',
               split='test', arm=a.arm, episodes=a.episodes, seed=a.seed, rows=rows, teacher=teacher.teacher_for('easy').config(),
               provenance=_provenance(a, adapter))
    (results / 'grpo_test.json').write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
