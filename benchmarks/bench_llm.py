"""Lockstep batched generation vs one episode at a time, for the LLM agent.

Runs N easy episodes twice in the same process, on the same seeds and model: once with one batched
`generate` per day for all episodes (the way the evaluation harness runs LLM agents), once with one
`generate` per episode per day. Reports episodes per minute for each, their ratio, prompt and generated
tokens per second, and whether both ways chose the same actions (greedy decoding).

A full easy episode is 20 days; on a small CPU that is slow, so `--days D` runs only the first D days
of each episode and scales to full episodes (episodes per minute = episodes * D / 20 / minutes). The
output says when it did.

    python benchmarks/bench_llm.py                       # 16 episodes, 2 days, 96 new tokens, SmolLM2
    python benchmarks/bench_llm.py --days 20 --json      # full episodes
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def run(agent, envs, obs, days):
    agent.reset(envs)
    actions = []
    t0 = time.perf_counter()
    for _ in range(days):
        acts = agent.act(envs, obs)
        actions.append(acts)
        obs = [e.step(a)[0] for e, a in zip(envs, acts)]
    return actions, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='smollm2', help="'smollm2', a model folder or a hub id (default: smollm2)")
    ap.add_argument('--episodes', type=int, default=16, help='easy episodes run in lockstep (default 16)')
    ap.add_argument('--days', type=int, default=2, help='days of each episode to run (default 2; 20 = whole episodes)')
    ap.add_argument('--max-new-tokens', type=int, default=96, help='tokens generated per answer at most (default 96)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    ap.add_argument('--data', default=None, help='a folder of prices (default: a synthetic panel, so runs compare)')
    ap.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when present)")
    ap.add_argument('--json', action='store_true', help='print the results as JSON')
    a, unknown = ap.parse_known_args(argv)
    if unknown: print(f"bench_llm: ignoring options meant for other benchmarks: {' '.join(unknown)}", file=sys.stderr)
    import torch
    from tradellm.data import load_panel, synthetic_panel
    from tradellm.env import TradingEnv
    from tradellm.llm import LLMAgent, load_model
    if a.threads: torch.set_num_threads(a.threads)
    panel = load_panel(a.data) if a.data else synthetic_panel(n_days=1100, symbols=30, start='2021-01-04', seed=7)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, device=a.device)
    load_s = time.perf_counter() - t0
    task_days = TradingEnv('easy', 'test', data=panel).task.days
    days = max(1, min(a.days, task_days))
    res = {'model': a.model, 'device': model.tradellm_source['device'], 'torch_threads': torch.get_num_threads(),
           'episodes': a.episodes, 'days_run': days, 'episode_days': task_days, 'max_new_tokens': a.max_new_tokens,
           'data': panel.source, 'load_seconds': round(load_s, 1)}
    acts = {}
    for mode, bs in (('batched', None), ('one_at_a_time', 1)):
        envs = [TradingEnv('easy', 'test', data=panel) for _ in range(a.episodes)]
        obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
        agent = LLMAgent(model, tok, max_new_tokens=a.max_new_tokens, batch_size=bs)
        acts[mode], secs = run(agent, envs, obs, days)
        st = agent.stats
        logs = agent.episode_logs()
        res[mode] = {'seconds': round(secs, 1), 'generate_calls': st['generate_calls'],
                     'episodes_per_minute': round(a.episodes * days / task_days / (secs / 60), 3),
                     'prompt_tokens': st['prompt_tokens'], 'cached_prompt_tokens': st['cached_prompt_tokens'],
                     'generated_tokens': st['generated_tokens'],
                     'tokens_per_second': round((st['prompt_tokens'] + st['generated_tokens']) / secs, 1),
                     'prompt_tokens_per_second': round(st['prompt_tokens'] / secs, 1),
                     'generated_tokens_per_second': round(st['generated_tokens'] / secs, 1),
                     'format_error_rate': round(sum(ep['format_errors'] for ep in logs) / sum(ep['steps'] for ep in logs), 3)}
        print(f"{mode}: {json.dumps(res[mode])}", file=sys.stderr)
    res['speedup'] = round(res['batched']['episodes_per_minute'] / res['one_at_a_time']['episodes_per_minute'], 2)
    res['same_actions'] = acts['batched'] == acts['one_at_a_time']
    res['note'] = (f"ran the first {days} of {task_days} days of each episode; episodes per minute are scaled to whole episodes"
                   if days < task_days else 'whole episodes')
    if a.json: print(json.dumps(res, indent=1))
    else:
        print(f"LLM agent {a.model} on {res['device']} ({res['torch_threads']} threads), {a.episodes} easy episodes, "
              f"{a.max_new_tokens} new tokens at most; {res['note']}")
        for mode in ('batched', 'one_at_a_time'):
            r = res[mode]
            print(f"  {mode:14s} {r['episodes_per_minute']:8.3f} episodes/min  {r['generate_calls']:4d} generate calls  "
                  f"prompt {r['prompt_tokens_per_second']:8.1f} tok/s  generated {r['generated_tokens_per_second']:7.1f} tok/s  "
                  f"format errors {r['format_error_rate']:.0%}")
        print(f"  batched / one at a time: {res['speedup']:.2f}x (target >= 3x); same actions: {res['same_actions']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
