"""Seconds per GRPO step of the default run, and where they go (generation, reward, reference/old log-probs, update).

Runs `train_grpo` for a few steps with the settings of the default run (SmolLM2-135M, easy task, groups of 4, one
prompt a step, the adapter's completion budget, KL 0.04, 2 torch threads) and extrapolates to 50 steps. The first
step is a warm-up and is not counted. GRPO starts from an SFT adapter: pass `--adapter DIR`; without one a fresh
LoRA of the SFT adapter's shape (rank 64 on every linear layer, compact prompts) stands in, with the completion
budget the SFT adapter of `09_sft` had (80 tokens) -- zero-shot answers run to it, as the SFT model's long trade
explanations nearly do, so the generation cost is the same or higher.

Two or more `--variants` run one after another in the same process, on the same prompts, so their ratio is a
same-run A/B; on a shared machine the absolute times are an upper bound, and the output says how loaded it was
(load average at the start and the end).

    python benchmarks/bench_grpo.py                         # default vs before (tasks-1.x settings), 3 steps each
    python benchmarks/bench_grpo.py --steps 6 --json
    python benchmarks/bench_grpo.py --generation --adapter SFT   # one group's generation: TRL's vs one prefill per group
    python benchmarks/bench_grpo.py --full --adapter SFT --data ../shared/data/nifty68 --json   # the default run itself

`--generation` times only what the default changed: one group's sampling (4 completions of exactly the completion
budget, from a real train-split prompt) by TRL's path (`generate` on the 4 identical rows) and with one prefill per
group, alternating, in wall and in process CPU seconds (CPU seconds move less with the machine's load).

`--full` runs the default run itself, end to end: `train_grpo` with `tradellm grpo`'s defaults (50 steps, 256 prompts,
groups of 4, the score reward, checkpoints every 25 steps, completion tables) from `--adapter`, and reports its wall
minutes (model loading and saving included), seconds per step, and the run's group statistics: the zero-spread share
(groups whose four rewards are all equal, so GRPO learns nothing from them), format errors, truncation and KL.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# What each variant changes from train_grpo's defaults. 'before': the settings of the 25.5-minute run of tasks 1.x
# (five-day reward; TRL's own generation, one prefill per completion; no truncation mask; no completion tables).
VARIANTS = {
    'default': {},
    'before': dict(reward='pnl5', share_prefill=False, mask_truncated_completions=False, log_completions=False),
    'trlgen': dict(share_prefill=False),
    'nokl': dict(beta=0.0),
    'spg2': dict(steps_per_generation=2),
}


def _timers(trainer_cls):
    "Wrap GRPOTrainer's phases with timers; returns a dict name -> list of seconds (one per call)."
    spent = {'generate': [], 'rewards': [], 'score_batch': []}

    def wrap(name, key):
        f = getattr(trainer_cls, name)

        def timed(self, *a, **k):
            t0 = time.perf_counter()
            try: return f(self, *a, **k)
            finally: spent[key].append(time.perf_counter() - t0)
        setattr(trainer_cls, name, timed)
    wrap('_generate', 'generate')
    wrap('_calculate_rewards', 'rewards')
    wrap('_generate_and_score_completions', 'score_batch')
    return spent


def generation_ab(a, panel):
    "One group's generation, TRL's way and with a shared prefill, alternating `a.steps` times; wall and CPU seconds."
    import torch
    from tradellm.grpo import _shared_prefill_generate, completion_budget, prompt_rows
    from tradellm.llm import adapter_prompt_style, load_model
    style = adapter_prompt_style(a.adapter) if a.adapter else 'compact'
    n = a.max_completion_length or (completion_budget(a.adapter, 'easy')[0] if a.adapter else 80)
    lm, tok = load_model('smollm2', adapter=a.adapter, device='cpu')
    row = prompt_rows('easy', 1, 'train', 0, 1, 'mixed', panel, style=style)[0]
    ids = tok.apply_chat_template(row['prompt'], add_generation_prompt=True, return_tensors='pt', return_dict=True)
    inp = {k: v.repeat(4, 1) for k, v in ids.items()}
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, pad_token_id=tok.pad_token_id)
    ways = {'trl': lm.generate, 'shared_prefill': _shared_prefill_generate(lm, lm.generate, 4)}
    out = {w: {'wall': [], 'cpu': []} for w in ways}
    with torch.no_grad():
        for i in range(a.steps + 1):
            for w, gen in ways.items():
                t0, c0 = time.perf_counter(), time.process_time()
                gen(**inp, **kw)
                if i: out[w]['wall'].append(time.perf_counter() - t0); out[w]['cpu'].append(time.process_time() - c0)
                print(f"{w} rep {i}: {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    res = {'what': 'one group of 4 completions', 'prompt_tokens': int(ids['input_ids'].shape[1]), 'completion_tokens': n,
           'adapter': a.adapter, 'reps': a.steps, 'threads': a.threads}
    for w, v in out.items(): res[w] = {k: round(sum(x) / len(x), 2) for k, x in v.items()}
    res['ratio_wall'] = round(res['shared_prefill']['wall'] / res['trl']['wall'], 3)
    res['ratio_cpu'] = round(res['shared_prefill']['cpu'] / res['trl']['cpu'], 3)
    return res


def full_run(a, panel):
    "The default run from `a.adapter`, end to end: wall minutes, seconds per step and its group statistics."
    from tradellm.grpo import train_grpo
    out = Path(tempfile.mkdtemp(prefix='bench_grpo_full_'))
    load0, t0 = os.getloadavg()[0], time.time()
    s = train_grpo(adapter=a.adapter, out=out, data=panel, device='cpu', track=False, progress=True, seed=a.seed)
    keep = ('steps', 'prompts', 'group_size', 'reward.reward', 'redraws', 'redraws_done', 'trained_zero_spread_share', 'max_completion_length', 'beta', 'lr', 'loss_type', 'scale_rewards', 'seed',
            'seconds_per_step', 'zero_spread_share', 'trade_zero_spread_share', 'format_error_rate', 'truncated_share',
            'group_reward_std', 'reward_mean', 'trade_mean', 'kl', 'task_version', 'env_version', 'torch_threads')
    res = {k: s.get(k) for k in keep}
    res.update(what='the default run (tradellm grpo defaults) end to end', adapter=a.adapter, data=panel.source,
               data_fingerprint=panel.fingerprint(), wall_minutes=round((time.time() - t0) / 60, 2),
               minutes_in_steps=round(sum(s['step_seconds']) / 60, 2), step_seconds=s['step_seconds'],
               load_average_start=round(load0, 2), load_average_end=round(os.getloadavg()[0], 2), out=str(out))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--adapter', default=None, help='SFT adapter folder (default: a fresh rank-64 LoRA stands in)')
    ap.add_argument('--steps', type=int, default=3, help='measured steps per variant, after one warm-up step (default 3)')
    ap.add_argument('--variants', default='default,before', help=f"comma-separated, from {', '.join(VARIANTS)} (default: default,before)")
    ap.add_argument('--max-completion-length', type=int, default=None,
                    help="tokens per completion (default: the adapter's budget; 80 for the stand-in LoRA)")
    ap.add_argument('--threads', type=int, default=2, help='torch threads (default 2: the project machine)')
    ap.add_argument('--data', default=None, help='a folder of prices (default: the data lookup, else a synthetic panel)')
    ap.add_argument('--json', action='store_true', help='print the results as JSON')
    ap.add_argument('--generation', action='store_true', help="time one group's generation only: TRL's vs one prefill per group")
    ap.add_argument('--full', action='store_true', help='run the default run itself (50 steps) from --adapter and time it end to end')
    ap.add_argument('--seed', type=int, default=0, help='seed of the --full run (default 0)')
    a, unknown = ap.parse_known_args(argv)
    if unknown: print(f"bench_grpo: ignoring options meant for other benchmarks: {' '.join(unknown)}", file=sys.stderr)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    import numpy as np
    import torch
    from trl import GRPOTrainer
    from tradellm.data import DataError, load_panel, synthetic_panel
    from tradellm.grpo import train_grpo
    torch.set_num_threads(a.threads)
    try: panel = load_panel(a.data)
    except DataError: panel = synthetic_panel(n_days=1100, symbols=30, start='2021-01-04', seed=7)
    if a.full:
        if not a.adapter: ap.error('--full starts from an SFT adapter, as the default run does: pass --adapter DIR')
        print(json.dumps(full_run(a, panel), indent=1))
        return 0
    if a.generation:
        load0 = os.getloadavg()[0]
        res = generation_ab(a, panel)
        res.update(load_average_start=round(load0, 2), load_average_end=round(os.getloadavg()[0], 2))
        print(json.dumps(res, indent=1))
        return 0
    names = [v.strip() for v in a.variants.split(',') if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad: ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    spent = _timers(GRPOTrainer)
    base = dict(model='smollm2', adapter=a.adapter, task='easy', steps=1, group_size=4, prompts=64, save_steps=10_000, track=False,
                data=panel, progress=False, device='cpu', max_completion_length=a.max_completion_length or (None if a.adapter else 80),
                lora_rank=64, prompt_style=None if a.adapter else 'compact')
    tmp = Path(tempfile.mkdtemp(prefix='bench_grpo_'))
    load0, t_start = os.getloadavg()[0], time.time()
    per, parts, zero = {}, {}, {}
    for v in names:  # one run per variant; its first step (first-call overheads) is not counted
        for k in spent: spent[k].clear()
        s = train_grpo(**dict(base, **VARIANTS[v], out=tmp / v, steps=a.steps + 1))
        per[v] = s['step_seconds'][1:]
        zero[v] = s['zero_spread_share']
        parts[v] = {k: sum(x[1:]) / a.steps for k, x in spent.items()}  # the phases' calls after the first, per measured step
        print(f"{v}: steps {[round(x, 1) for x in s['step_seconds']]} s", file=sys.stderr)
    res = {'threads': a.threads, 'adapter': a.adapter or 'fresh LoRA r64 (stand-in)', 'group_size': 4, 'prompts_per_step': 1,
           'max_completion_length': base['max_completion_length'], 'steps_measured': a.steps, 'data': panel.source,
           'load_average_start': round(load0, 2), 'load_average_end': round(os.getloadavg()[0], 2),
           'minutes': round((time.time() - t_start) / 60, 1), 'variants': {}}
    for v in names:
        sec = float(np.mean(per[v]))
        p = {k: round(float(x), 2) for k, x in parts[v].items()}
        # score_batch holds generate and rewards, plus the reference (and old) log-prob passes
        p['ref_logps'] = round(p['score_batch'] - p['generate'] - p['rewards'], 2)
        p['update'] = round(sec - p['score_batch'], 2)
        res['variants'][v] = dict(settings=VARIANTS[v], seconds_per_step=round(sec, 2), minutes_per_50_steps=round(sec * 50 / 60, 1),
                                  step_seconds=per[v], zero_spread_share=zero[v], parts=p)
    if len(names) > 1:
        ref = res['variants'][names[-1]]['seconds_per_step']
        for v in names: res['variants'][v]['ratio_to_' + names[-1]] = round(res['variants'][v]['seconds_per_step'] / ref, 3)
    if a.json: print(json.dumps(res, indent=1))
    else:
        print(f"GRPO steps on {a.threads} threads, {res['adapter']}, groups of 4, {res['max_completion_length']} tokens; "
              f"load average {res['load_average_start']} -> {res['load_average_end']}")
        for v, r in res['variants'].items():
            print(f"  {v:8s} {r['seconds_per_step']:6.1f} s/step = {r['minutes_per_50_steps']:5.1f} min / 50 steps   {r['parts']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
