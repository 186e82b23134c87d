"""Episodes per second of the rule agents: locally, and on a Ray with two worker processes, in the same run.

    python benchmarks/bench_scale.py [--episodes N] [--chunk C] [--workers W] [--data PATH | --synthetic] [--json]

Data: --data, else $TRADELLM_DATA, else ../shared/data/nifty68 next to the repository, else a synthetic panel.
The four baselines play N episodes of each task (12 runs of N episodes), first locally with `run_episodes`, then
through `RayEpisodes` on a Ray started here with W worker processes (`ray.init(num_cpus=W)`). Ray is timed three
ways: its start (`ray.init`), a cold pass (the workers import tradellm and compute the panel's features on
their first chunk), and a warm pass of the same episodes. Every Ray pass is checked to give the local
episodes. It reports wall-clock episodes per second and CPU milliseconds per episode (this process and every
process under it, Ray's daemons and workers included), and the load average: on a machine shared with other
work, more processes get a larger share of the cores, so wall-clock speed-ups there are not Ray's own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AGENTS = ('do_nothing', 'buy_and_hold', 'rsi', 'random')
TASKS = ('easy', 'medium', 'hard')


def find_data(arg):
    for cand in (arg, os.environ.get('TRADELLM_DATA'), ROOT.parent / 'shared' / 'data' / 'nifty68'):
        if cand and Path(cand).is_dir(): return Path(cand)
    return None


def load(args):
    from tradellm.data import load_panel, synthetic_panel
    path = None if args.synthetic else find_data(args.data)
    if path is None: return synthetic_panel(n_days=1100, symbols=68, start='2021-01-04', seed=0), 'synthetic (68 stocks, 1100 days)'
    return load_panel(path), str(path)


def cpu_seconds() -> float:
    "CPU seconds used so far by this process and every live process under it (Ray's raylet, GCS and workers)."
    import psutil
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for p in me.children(recursive=True):
        try: total += sum(p.cpu_times()[:2])
        except psutil.Error: pass
    return total


def canon(recs):
    return [{k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in r.items()} for r in recs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--episodes', type=int, default=100, help='episodes per agent and task (default 100)')
    p.add_argument('--chunk', type=int, default=None, help='episodes per Ray chunk (default: about two chunks per worker)')
    p.add_argument('--workers', type=int, default=2, help='Ray worker processes (default 2)')
    p.add_argument('--split', default='test')
    p.add_argument('--data', default=None)
    p.add_argument('--synthetic', action='store_true')
    p.add_argument('--json', action='store_true')
    args, _ = p.parse_known_args(argv)  # (scripts/bench.sh passes every benchmark the same options)
    from tradellm.evaluate import run_episodes
    panel, source = load(args)
    jobs = [(a, t) for t in TASKS for a in AGENTS]
    n = len(jobs) * args.episodes
    run_episodes('rsi', 'easy', args.split, 1, 0, panel, progress=False)  # the panel's features, once (as a worker's first chunk does)

    t0, c0 = time.perf_counter(), cpu_seconds()
    local = {j: run_episodes(j[0], j[1], args.split, args.episodes, 0, panel, progress=False) for j in jobs}
    local_s, local_cpu = time.perf_counter() - t0, cpu_seconds() - c0

    import ray
    from tradellm.scale import RayEpisodes
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level='warning')
    start_s = time.perf_counter() - t0
    passes = []
    try:
        for name in ('cold', 'warm'):
            t0, c0 = time.perf_counter(), cpu_seconds()
            with RayEpisodes(chunk=args.chunk) as shards:
                shards.submit({t: {a: a for a, tt in jobs if tt == t} for t in TASKS}, args.split, args.episodes, 0, panel)
                got = {j: shards.episodes(j[0], j[1], args.split, args.episodes, 0, panel, progress=False) for j in jobs}
            passes.append((name, time.perf_counter() - t0, cpu_seconds() - c0))
            for j in jobs:
                if canon(got[j]) != canon(local[j]): raise SystemExit(f"Ray pass {name}: {j} differs from the local episodes")
    finally:
        ray.shutdown()

    res = dict(episodes=n, runs=len(jobs), data=source, split=args.split, workers=args.workers, chunk=args.chunk,
               cpus=os.cpu_count(), python=platform.python_version(), ray=ray.__version__,
               local_seconds=round(local_s, 3), local_episodes_per_s=round(n / local_s, 1), ray_start_seconds=round(start_s, 2),
               **{f'ray_{k}_seconds': round(s, 3) for k, s, _ in passes}, **{f'ray_{k}_episodes_per_s': round(n / s, 1) for k, s, _ in passes},
               local_cpu_ms_per_episode=round(1000 * local_cpu / n, 2),
               **{f'ray_{k}_cpu_ms_per_episode': round(1000 * c / n, 2) for k, _, c in passes},
               load_average=[round(x, 2) for x in os.getloadavg()], same_episodes=True)
    res['ray_warm_speedup'] = round(local_s / passes[1][1], 3)
    if args.json: print(json.dumps(res, indent=1))
    else:
        print(f"{n} rule-agent episodes ({len(jobs)} agent x task runs of {args.episodes}) on {source}, {os.cpu_count()} CPUs")
        print(f"  local                : {res['local_episodes_per_s']:>8,.1f} episodes/s ({local_s:.2f} s), "
              f"{res['local_cpu_ms_per_episode']:.2f} CPU ms per episode")
        for k, s, c in passes:
            print(f"  Ray, {args.workers} workers, {k:<4} : {n / s:>8,.1f} episodes/s ({s:.2f} s), {1000 * c / n:.2f} CPU ms per episode "
                  "(driver, Ray's daemons and workers)")
        print(f"  Ray start (ray.init) : {start_s:.1f} s;  warm Ray / local speed: {res['ray_warm_speedup']:.2f}x; same episodes: yes")
        print(f"  load average (1, 5, 15 min): {res['load_average']} on {os.cpu_count()} CPUs: other work shares them")


if __name__ == '__main__': main()
