"""Steps per second of TradingEnv for each task x observation mode, beside gym-anytrading's stocks-v0 in the same run.

    python benchmarks/bench_env.py [--seconds S] [--rounds R] [--data PATH | --synthetic] [--json]

Data: --data, else $TRADELLM_DATA, else ../shared/data/nifty68 next to the repository, else a synthetic panel.
Each cell replays a pre-generated action stream (70% HOLD, 30% one to three random BUY/SELL orders) over
episodes drawn from successive seeds; resets are inside the timed loop. The time is split into rounds: every
round measures stocks-v0 and then each cell, so slow and fast spells of a shared machine fall on all of them.
A cell reports the median round (and the best), counted in steps per second of this process's CPU time, and
its ratio to stocks-v0 in the same round. Issue 3's targets on the 2-core dev machine, checked on the median:
numeric hard >= 10,000 steps/s, numeric easy >= 50,000, text hard >= 3,000.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {('hard', 'numeric'): 10_000, ('easy', 'numeric'): 25_000, ('hard', 'text'): 3_000}
EPISODES = 64  # distinct pre-generated episodes per cell (cycled)


def find_data(arg):
    "The price folder to use, or None for a synthetic panel."
    for cand in (arg, os.environ.get('TRADELLM_DATA'), ROOT.parent / 'shared' / 'data' / 'nifty68'):
        if cand and Path(cand).is_dir(): return Path(cand)
    return None


def load(args):
    from tradellm.data import load_panel, synthetic_panel
    path = None if args.synthetic else find_data(args.data)
    if path is None:
        return synthetic_panel(n_days=1100, symbols=68, start='2021-01-04', seed=0), 'synthetic (68 stocks, 1100 days)'
    return load_panel(path), str(path)


def action_stream(env, episodes, seed=0):
    "For each of `episodes` seeds: the env seed and one action text per day (HOLD or random orders)."
    rng = np.random.default_rng(seed)
    out = []
    for s in range(episodes):
        env.reset(seed=s)
        syms, acts = env.symbols, []
        for _ in range(env.task.days):
            if rng.random() < 0.7: acts.append('HOLD')
            else:
                k = int(rng.integers(1, 4))
                acts.append('; '.join(f"{'BUY' if rng.random() < 0.6 else 'SELL'} {syms[int(rng.integers(len(syms)))]} "
                                      f"{rng.choice([0.1, 0.25, 0.5, 1.0]):g}" for _ in range(k)))
        out.append((s, acts))
    return out


def bench_tradellm(panel, task, mode, split):
    "A function that runs TradingEnv over the action stream for a given number of seconds and returns its counts."
    from tradellm.env import TradingEnv
    env = TradingEnv(task, split, mode, panel)
    stream = action_stream(env, EPISODES)
    # warm-up: one episode (caches, first-call costs) outside the timing
    env.reset(seed=stream[0][0])
    for a in stream[0][1]: env.step(a)
    state = {'next': 0}  # rounds carry on through the stream where the last one stopped

    def run(seconds):
        steps, resets, in_reset, t0, c0 = 0, 0, 0.0, time.perf_counter(), time.process_time()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            seed, acts = stream[state['next']]
            state['next'] = (state['next'] + 1) % len(stream)
            r0 = time.perf_counter()
            env.reset(seed=seed)
            in_reset += time.perf_counter() - r0
            resets += 1
            for a in acts: env.step(a)
            steps += len(acts)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {'steps_per_s': steps / dt, 'steps_per_cpu_s': steps / cpu, 'steps': steps, 'resets': resets, 'seconds': dt,
                'in_reset': in_reset}
    return run


def bench_anytrading():
    "A function that runs gym-anytrading's stocks-v0 (the raw env, no wrappers) with random Sell/Buy actions, resets included."
    import gymnasium as gym
    import gym_anytrading  # noqa: F401  (registers stocks-v0)
    env = gym.make('stocks-v0').unwrapped
    actions = np.random.default_rng(0).integers(0, 2, 100_000).tolist()
    env.reset(seed=0)
    state = {'i': 0, 'resets': 1}

    def run(seconds):
        steps, i, resets0, t0, c0 = 0, state['i'], state['resets'], time.perf_counter(), time.process_time()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(256):
                _, _, term, trunc, _ = env.step(actions[i])
                i = (i + 1) % len(actions)
                steps += 1
                if term or trunc:
                    env.reset(seed=state['resets'])
                    state['resets'] += 1
        state['i'] = i
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {'steps_per_s': steps / dt, 'steps_per_cpu_s': steps / cpu, 'steps': steps, 'resets': state['resets'] - resets0,
                'seconds': dt, 'window': env.window_size, 'episode_steps': env.frame_bound[1] - env.frame_bound[0]}
    return run


def summarise(rounds, ref_rounds=None):
    "One cell's rounds as: the median and best round (steps per CPU second), totals, and the median ratio to stocks-v0 round by round."
    rate = [r['steps_per_cpu_s'] for r in rounds]
    out = {'steps_per_cpu_s': statistics.median(rate), 'best_steps_per_cpu_s': max(rate),
           'steps_per_s': statistics.median(r['steps_per_s'] for r in rounds), 'rounds': rate,
           'steps': sum(r['steps'] for r in rounds), 'resets': sum(r['resets'] for r in rounds),
           'seconds': sum(r['seconds'] for r in rounds)}
    if 'in_reset' in rounds[0]: out['reset_share'] = sum(r['in_reset'] for r in rounds) / out['seconds']
    if ref_rounds: out['vs_stocks_v0'] = statistics.median(r['steps_per_cpu_s'] / q['steps_per_cpu_s'] for r, q in zip(rounds, ref_rounds))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seconds', type=float, default=2.0, help='timed seconds per cell, all rounds together (default 2)')
    ap.add_argument('--rounds', type=int, default=5, help='rounds the time is split into (default 5)')
    ap.add_argument('--data', default=None, help='price folder (default: $TRADELLM_DATA, then ../shared/data/nifty68)')
    ap.add_argument('--synthetic', action='store_true', help='use a synthetic 68-stock panel even if data is present')
    ap.add_argument('--split', default='test', help="split episodes are drawn from (default 'test')")
    ap.add_argument('--tasks', default='easy,medium,hard')
    ap.add_argument('--modes', default='numeric,text')
    ap.add_argument('--json', action='store_true', help='print the results as JSON instead of a table')
    args = ap.parse_args(argv)

    t = time.perf_counter()
    panel, source = load(args)
    from tradellm.indicators import compute_indicators
    compute_indicators(panel)
    load_s = time.perf_counter() - t

    if args.rounds < 1 or args.seconds <= 0: ap.error('--rounds must be at least 1 and --seconds above 0')
    cells = [(task, mode) for task in args.tasks.split(',') for mode in args.modes.split(',')]
    ref_run = bench_anytrading()
    runs = {c: bench_tradellm(panel, c[0], c[1], args.split) for c in cells}
    ref_rounds, cell_rounds = [], {c: [] for c in cells}
    per_round = args.seconds / args.rounds
    for _ in range(args.rounds):  # each round: the peer, then every cell, for the same share of time
        ref_rounds.append(ref_run(per_round))
        for c in cells: cell_rounds[c].append(runs[c](per_round))
    ref = summarise(ref_rounds)
    ref.update(window=ref_rounds[0]['window'], episode_steps=ref_rounds[0]['episode_steps'])
    rows = []
    for (task, mode), rounds in cell_rounds.items():
        r = summarise(rounds, ref_rounds)
        r.update(task=task, mode=mode, target=TARGETS.get((task, mode)))
        r['vs_target'] = r['steps_per_cpu_s'] / r['target'] if r['target'] else None
        rows.append(r)
    result = {'data': source, 'load_and_indicators_s': load_s, 'split': args.split, 'seconds_per_cell': args.seconds,
              'rounds': args.rounds, 'stocks_v0': ref, 'cells': rows,
              'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                         f"python {platform.python_version()}"}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"data: {source} (loaded + indicators in {load_s:.1f} s); split {args.split}; {args.seconds:g} s per cell in "
          f"{args.rounds} rounds; {result['machine']}")
    print(f"stocks-v0 (gym-anytrading, window {ref['window']}, {ref['episode_steps']} steps/episode): median round "
          f"{ref['steps_per_cpu_s']:,.0f} steps per CPU second (best {ref['best_steps_per_cpu_s']:,.0f}, "
          f"{ref['steps_per_s']:,.0f} wall)")
    print("steps/s CPU = steps per second of this process's CPU time, the median round (best round beside it): on a shared\n"
          "machine it is the steadier number; x stocks-v0 is the median of the ratios round by round")
    print("\n| task | mode | steps/s wall | steps/s CPU | best round | episodes | time in reset | x stocks-v0 | target | x target |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tgt = f"{r['target']:,}" if r['target'] else '-'
        vt = f"{r['vs_target']:.2f}{' ok' if r['vs_target'] >= 1 else ' BELOW'}" if r['target'] else '-'
        print(f"| {r['task']} | {r['mode']} | {r['steps_per_s']:,.0f} | {r['steps_per_cpu_s']:,.0f} | "
              f"{r['best_steps_per_cpu_s']:,.0f} | {r['resets']} | {r['reset_share']:.0%} | {r['vs_stocks_v0']:.2f} | {tgt} | {vt} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
