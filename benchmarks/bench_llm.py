"""Model FLOPs utilisation of the LLM agent's batched evaluation, against the plain path, on easy and medium.

Runs the same episodes, seeds and model down three roads, in turn, for `--rounds` rounds:

- `fast`: `LLMAgent` as the evaluation runs it: every episode's chat in one batch per day, greedy answers by the
  fast path of `07_llm` (a finished answer leaves the batch), the shared system prompt's cache reused;
- `generate`: the same batches through `model.generate` (`fast=False`): the road before the fast path;
- `plain`: one episode at a time through `model.generate` (`batch_size=1, fast=False`), on `--plain-episodes`.

MFU = (prompt tokens computed, the reused prefix excluded, + generated tokens) x 2 x parameters / wall seconds,
over the fp32 matmul rate of this machine (torch, 1024 x 1024) measured right before and right after each run,
so contention from other processes hits both; the rate is the best of torch's default thread count (all cores) and
`--threads`, so a run on fewer threads is not flattered by a slower yardstick. Episodes per minute are scaled to whole episodes when `--days` runs
only the first days of each. The ratio to the plain path is fast over plain episodes per minute, round by round.

Answers: with `--adapter DIR` the adapter answers (its prompt style and token limits, as `make_llm_agent` sets
them). Without one, the stand-in is an SFT adapter that has learned its teacher: the base model runs every step,
but the tokens fed back are the teacher's answer (the RSI rule agent's action with its concise reasons, exactly
what `tradellm sft-data` writes), with the compact prompt and the adapter token limits (192 easy, 640 medium).
These answers are as long as an SFT adapter's and end where its would; `--endless 0.05` makes that share of them
run to the token limit instead (a think block that never closes: the 'endless' format error of `07_llm`, which SFT
keeps under 10% of answers, not at 0). The output says which was measured.

    python benchmarks/bench_llm.py --threads 1                       # easy and medium, teacher-forced answers
    python benchmarks/bench_llm.py --adapter checkpoints/sft-smollm2 # a trained adapter's own answers
    python benchmarks/bench_llm.py --tasks easy --curve 8,16,32,64   # MFU against the batch size
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def matmul_rate(torch, threads=(), n=1024, seconds=1.0):
    "fp32 FLOP/s of an n x n matmul on this machine now: the best of three timed blocks at each thread count in `threads`."
    a, b, run_threads = torch.randn(n, n), torch.randn(n, n), torch.get_num_threads()
    best = 0.0
    for th in sorted(set(threads) | {run_threads}):
        torch.set_num_threads(th)
        a @ b
        for _ in range(3):
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                a @ b
                k += 1
            best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
    torch.set_num_threads(run_threads)
    return best


class TeacherAnswers:
    "The SFT teacher's answer to each env's current day, as token ids, fed to `generate_batch` as `force`."

    def __init__(self, tok, endless=0.0, limits=None, seed=0):
        from tradellm.agents import RSIAgent
        self.tok, self.teacher, self.seed, self.script = tok, RSIAgent(), seed, {}
        self.endless, self.limits = endless, limits  # this share of answers never ends: it runs to the task's token limit

    def prepare(self, envs, observations):
        import zlib
        import numpy as np
        from tradellm.sft import _rule_params, explain
        for env, obs in zip(envs, observations):
            action, decisions = self.teacher.decide(env.view, env.task.max_position, env.task.max_trades)
            rng = np.random.default_rng([self.seed, zlib.crc32(obs.encode())])  # the same words for the same day on every road
            think = explain(env.view, action, decisions, rng, _rule_params(self.teacher), concise=True)
            ids = self.tok(f"<think>\n{think}\n</think>\n{action}", add_special_tokens=False)['input_ids']
            if rng.random() < self.endless:  # a think block that never closes, as in an 'endless' format error
                limit = self.limits.get(env.task.name, max(self.limits.values())) if isinstance(self.limits, dict) else self.limits
                ids = (ids[:-len(self.tok(action, add_special_tokens=False)['input_ids']) - 4] * limit)[:limit]
            self.script[obs] = ids

    def install(self, llm):
        real = llm.generate_batch

        def forced(model, tok, chats, *args, **kw):
            return real(model, tok, chats, *args, force=[self.script[c[-1]['content']] for c in chats], **kw)
        llm.generate_batch = forced
        return real


def run_road(agent, envs, days, teacher, seeds):
    obs = [e.reset(seed=s)[0] for e, s in zip(envs, seeds)]
    agent.reset(envs)
    for k in ('generate_calls', 'prompt_tokens', 'cached_prompt_tokens', 'generated_tokens'): agent.stats[k] = 0
    actions, t0 = [], time.perf_counter()
    for _ in range(days):
        if teacher: teacher.prepare(envs, obs)
        acts = agent.act(envs, obs)
        actions.append(acts)
        obs = [e.step(a)[0] for e, a in zip(envs, acts)]
    return actions, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='smollm2', help="'smollm2', a model folder or a hub id (default: smollm2)")
    ap.add_argument('--adapter', default=None, help='an SFT/GRPO adapter folder: measure its own answers (default: teacher-forced answers)')
    ap.add_argument('--tasks', default='easy,medium', help='tasks, comma-separated (default easy,medium)')
    ap.add_argument('--episodes', type=int, default=32, help='episodes run in lockstep per task (default 32)')
    ap.add_argument('--days', type=int, default=2, help='days of each episode to run (default 2)')
    ap.add_argument('--plain-episodes', type=int, default=4, help='episodes of the one-at-a-time road (default 4)')
    ap.add_argument('--rounds', type=int, default=2, help='rounds of (fast, generate, plain) per task (default 2)')
    ap.add_argument('--roads', default='fast,generate,plain', help='roads to run (default fast,generate,plain)')
    ap.add_argument('--curve', default=None, help='batch sizes to measure the fast road at, e.g. 8,16,32,64 (first task)')
    ap.add_argument('--max-new-tokens', type=int, default=None, help='token limit per answer (default: the adapter limits, 192 easy / 640 medium)')
    ap.add_argument('--endless', type=float, default=0.0, help="teacher-forced answers: the share that never ends (an SFT adapter's 'endless' format errors; default 0)")
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    ap.add_argument('--data', default=None, help='a folder of prices (default: a synthetic panel, so runs compare)')
    ap.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when present)")
    ap.add_argument('--json', action='store_true', help='print the results as JSON')
    a, unknown = ap.parse_known_args(argv)
    if unknown: print(f"bench_llm: ignoring options meant for other benchmarks: {' '.join(unknown)}", file=sys.stderr)
    import torch
    from tradellm import llm
    from tradellm.data import load_panel, synthetic_panel
    from tradellm.env import TradingEnv
    default_threads = torch.get_num_threads()
    if a.threads: torch.set_num_threads(a.threads)
    panel = load_panel(a.data) if a.data else synthetic_panel(n_days=1100, symbols=30, start='2021-01-04', seed=7)
    t0 = time.perf_counter()
    model, tok = llm.load_model(a.model, a.adapter, device=a.device)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    if a.adapter:
        style, limits = llm.adapter_prompt_style(a.adapter), llm.adapter_max_new_tokens(a.adapter)
        answers, teacher = f'the adapter {a.adapter} (greedy)', None
    else:
        style, limits = 'compact', dict(llm.ADAPTER_MAX_NEW_TOKENS)
        answers = 'teacher-forced SFT answers (RSI teacher, concise reasons; the base model runs every step)'
    if a.max_new_tokens: limits = a.max_new_tokens
    if not a.adapter:
        if a.endless: answers += f'; {a.endless:.0%} of them never end (run to the token limit)'
        teacher = TeacherAnswers(tok, a.endless, limits)
        teacher.install(llm)
    res = {'model': a.model, 'adapter': a.adapter, 'answers': answers, 'prompt_style': style, 'max_new_tokens': limits,
           'parameters': n_params, 'device': model.tradellm_source['device'], 'torch_threads': torch.get_num_threads(), 'default_threads': default_threads,
           'torch': torch.__version__, 'episodes': a.episodes, 'plain_episodes': a.plain_episodes, 'days_run': a.days,
           'rounds': a.rounds, 'data': panel.source, 'load_seconds': round(load_s, 1), 'command': ' '.join(sys.argv), 'tasks': {}}
    roads = {'fast': dict(fast=True), 'generate': dict(fast=False), 'plain': dict(fast=False, batch_size=1)}

    def measure(task, road, episodes, batch_size=None):
        envs = [TradingEnv(task, 'test', data=panel) for _ in range(episodes)]
        days = max(1, min(a.days, envs[0].task.days))
        kw = dict(roads[road])
        if batch_size: kw['batch_size'] = batch_size
        agent = llm.LLMAgent(model, tok, max_new_tokens=limits, prompt_style=style, **kw)
        r0 = matmul_rate(torch, (default_threads,))
        actions, secs = run_road(agent, envs, days, teacher, range(episodes))
        r1 = matmul_rate(torch, (default_threads,))
        st = agent.stats
        computed = st['prompt_tokens'] - st['cached_prompt_tokens'] + st['generated_tokens']
        rate = (r0 + r1) / 2
        out = {'seconds': round(secs, 2), 'episodes': episodes, 'generate_calls_per_day': st['generate_calls'] // days,
               'prompt_tokens': st['prompt_tokens'], 'cached_prompt_tokens': st['cached_prompt_tokens'],
               'generated_tokens': st['generated_tokens'], 'tokens_per_second': round(computed / secs, 1),
               'matmul_gflops': [round(r0 / 1e9, 1), round(r1 / 1e9, 1)],
               'mfu': round(computed * 2 * n_params / secs / rate, 4),
               'episodes_per_minute': round(episodes * days / envs[0].task.days / (secs / 60), 3)}
        print(f"{task} {road}: {json.dumps(out)}", file=sys.stderr, flush=True)
        return out, actions

    tasks = [t for t in a.tasks.split(',') if t]
    for ti, task in enumerate(tasks):
        runs = {r: [] for r in a.roads.split(',')}
        same = []
        for _ in range(a.rounds):
            acts = {}
            for road in runs:
                out, acts[road] = measure(task, road, a.plain_episodes if road == 'plain' else a.episodes)
                runs[road].append(out)
            same.append(all(acts[r][d][:a.plain_episodes] == acts['fast'][d][:a.plain_episodes]
                            for r in acts for d in range(len(acts[r]))) if 'fast' in acts else None)
        t = {'same_actions': all(same)}
        for road, outs in runs.items():
            t[road] = {'mfu_min': min(o['mfu'] for o in outs), 'mfu_median': statistics.median(o['mfu'] for o in outs),
                       'episodes_per_minute_median': statistics.median(o['episodes_per_minute'] for o in outs), 'runs': outs}
        for peer in ('plain', 'generate'):
            if 'fast' in runs and peer in runs:
                ratios = [f['episodes_per_minute'] / p['episodes_per_minute'] for f, p in zip(runs['fast'], runs[peer])]
                t[f'fast_vs_{peer}'] = {'min': round(min(ratios), 2), 'median': round(statistics.median(ratios), 2)}
        if a.curve and ti == 0:
            t['curve'] = [measure(task, 'fast', a.episodes, int(b))[0] for b in a.curve.split(',')]
        res['tasks'][task] = t
    if a.json: print(json.dumps(res, indent=1))
    else:
        print(f"LLM agent {a.model} on {res['device']} ({res['torch_threads']} threads), {res['parameters'] / 1e6:.1f}M parameters; "
              f"answers: {answers}; {a.episodes} episodes x {a.days} days per task (plain: {a.plain_episodes}), {a.rounds} rounds")
        print(f"{'task':8s} {'road':9s} {'MFU min':>8s} {'median':>7s} {'episodes/min':>13s} {'matmul GFLOPS':>14s}")
        for task, t in res['tasks'].items():
            for road in runs:
                r = t[road]
                mm = [g for o in r['runs'] for g in o['matmul_gflops']]
                print(f"{task:8s} {road:9s} {r['mfu_min']:8.1%} {r['mfu_median']:7.1%} {r['episodes_per_minute_median']:13.2f} "
                      f"{min(mm):6.0f}-{max(mm):.0f}")
            for peer in ('plain', 'generate'):
                if f'fast_vs_{peer}' in t: print(f"{task:8s} fast / {peer}: {t[f'fast_vs_{peer}']['median']:.2f}x median round")
            print(f"{task:8s} same actions on every road: {t['same_actions']}")
            for c in t.get('curve', []):
                print(f"{task:8s} fast, {c['generate_calls_per_day']:3d} calls a day: MFU {c['mfu']:.1%}  {c['episodes_per_minute']:.2f} episodes/min")
    return 0


if __name__ == '__main__':
    sys.exit(main())
