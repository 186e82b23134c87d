"""Scale-out end to end: Ray stays out of local runs; a three-node Ray cluster on 127.0.0.1 (a head and two CPU
workers) plays the same episodes as a local run, also when a worker is killed mid-run; MLflow on a tracking server.

The cluster tests are `slow` (the cluster takes 10 to 30 s to start on two busy cores); they start one cluster for
the module with `ray.cluster_utils.Cluster` and remove its nodes (their processes only) in the fixture's teardown.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# Ray turns 127.0.0.1 into this machine's network address, where a cluster kept on the loopback does not listen
os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')

from tradellm import evaluate as ev  # noqa: E402
from tradellm.data import save_panel  # noqa: E402
from tradellm.scale import RayEpisodes, ScaleError, seed_chunks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get('TRADELLM_TEST_DATA', ROOT.parent / 'shared' / 'data' / 'nifty68'))
ALL_RULES = 'do_nothing,buy_and_hold,rsi,random'


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, '-m', 'tradellm.cli', *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def prices(synth_panel, tmp_path_factory):
    "nifty68 where it lies beside the checkout, else the synthetic panel as a folder of CSVs."
    return REAL_DATA if REAL_DATA.is_dir() else save_panel(synth_panel, tmp_path_factory.mktemp('prices'))


def same_records(a, b):
    "Equal values in every field of every episode (the price windows as lists)."
    def canon(r): return {k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in r.items()}
    assert len(a) == len(b)
    for x, y in zip(a, b): assert canon(x) == canon(y), (x['agent'], x['task'], x['seed'])


def same_rows(a, b):
    drop = ('seconds', 'mlflow_run_id')
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [{k: v for k, v in r.items() if k not in drop} for r in b]


# ---------------------------------------------------------------- without a cluster

def test_tradellm_and_local_runs_never_import_ray(tmp_path):
    code = ("import sys\nimport tradellm, tradellm.evaluate, tradellm.scale, tradellm.cli\n"
            "from tradellm.data import synthetic_panel\n"
            "p = synthetic_panel(n_days=1100, symbols=12, start='2021-01-04', seed=1)\n"
            "tradellm.evaluate.evaluate(['rsi'], ['easy'], 'test', 2, data=p, track=False, progress=False, n_resamples=100)\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\nprint('ok')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr


@pytest.mark.parametrize('command', ['evaluate', 'leaderboard'])
def test_backend_ray_without_ray_says_how_to_install_it(prices, command, tmp_path):
    "Ray made unimportable in the subprocess: one line on stderr, exit status 2, no traceback."
    code = ("import sys\nsys.modules['ray'] = None  # import ray now raises ImportError\n"
            "from tradellm.cli import main\n"
            f"sys.exit(main([{command!r}, '--backend', 'ray', '--data', {str(prices)!r}, '--episodes', '2', '--no-mlflow', '--quiet']"
            f" + (['--out', {str(tmp_path / 'out')!r}, '--no-llm'] if {command!r} == 'leaderboard' else [])))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'tradellm {command}: --backend ray needs Ray')
    assert "pip install 'tradellm[scale]'" in lines[0]


def test_an_unreachable_head_is_one_line(prices):
    r = cli('evaluate', '--backend', 'ray', '--ray-address', '127.0.0.1:9', '--data', str(prices), '--episodes', '2', '--no-mlflow', '--quiet')
    if 'needs Ray' in r.stderr: pytest.skip('ray is not installed')
    assert r.returncode == 2 and r.stderr.strip().startswith('tradellm evaluate: cannot reach the Ray head at 127.0.0.1:9'), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_backend_arguments_are_checked(synth_panel):
    with pytest.raises(ValueError, match="use 'local' or 'ray'"): ev.evaluate(['rsi'], ['easy'], 'test', 2, data=synth_panel, track=False, backend='spark')
    with pytest.raises(ValueError, match='ray_address is for backend'):
        ev.evaluate(['rsi'], ['easy'], 'test', 2, data=synth_panel, track=False, ray_address='127.0.0.1:6379')
    with pytest.raises(ValueError, match='chunk must be at least 1'): RayEpisodes(chunk=0)
    assert issubclass(ScaleError, ValueError)  # the CLI prints it as one line


def test_chunks_cover_every_episode_once():
    for episodes in (1, 5, 50, 97):
        for chunk in (1, 3, 16, 200):
            idx = [s + i for s, n in seed_chunks(episodes, chunk) for i in range(n)]
            assert idx == list(range(episodes))


# ---------------------------------------------------------------- a three-node cluster on 127.0.0.1

@pytest.fixture(scope='module')
def cluster():
    "A head (no CPU of its own, so it runs no episodes) and two worker nodes of one CPU each, on 127.0.0.1."
    ray = pytest.importorskip('ray')
    from ray.cluster_utils import Cluster
    if ray.is_initialized(): ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, node_ip_address='127.0.0.1', include_dashboard=False))
    try:
        workers = [c.add_node(num_cpus=1, node_ip_address='127.0.0.1') for _ in range(2)]
        c.wait_for_nodes()
        c.workers = workers
        yield c
    finally:
        if ray.is_initialized(): ray.shutdown()
        c.shutdown()


@pytest.fixture
def driver(cluster):
    "This process connected to the cluster (RayEpisodes then uses the connection and leaves it open)."
    import ray
    if not ray.is_initialized(): ray.init(address=cluster.address, logging_level='warning')
    yield ray
    ray.shutdown()


def _processes_titled(cluster, prefix):
    "The worker processes of the cluster's worker nodes whose title starts with `prefix` (Ray titles them ray::NAME)."
    import psutil
    out = []
    for node in cluster.workers:
        raylet = psutil.Process(node.all_processes['raylet'][0].process.pid)
        for p in raylet.children(recursive=True):
            try:
                if ' '.join(p.cmdline()).startswith(prefix): out.append(p)
            except psutil.Error: pass
    return out


def _kill_one_when_seen(cluster, prefix, stop, killed):
    "Kill (SIGKILL) the first process titled `prefix` that shows up, unless `stop` is set first."
    while not stop.is_set():
        for p in _processes_titled(cluster, prefix):
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_cli_evaluate_on_ray_plays_the_local_episodes(cluster, prices, tmp_path):
    "Every episode of the rule agents on every task: the same records, scores and intervals as a local run."
    common = ['--agents', ALL_RULES, '--tasks', 'easy,medium,hard', '--split', 'test', '--episodes', '8', '--data', str(prices),
              '--no-mlflow', '--quiet', '--json']
    on_ray = cli('evaluate', *common, '--out', str(tmp_path / 'ray'), '--backend', 'ray', '--ray-address', cluster.address)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    local = cli('evaluate', *common, '--out', str(tmp_path / 'local'))
    assert local.returncode == 0, local.stderr[-3000:]
    for f in ('episodes.jsonl', 'episodes.csv'):
        assert (tmp_path / 'ray' / f).read_text() == (tmp_path / 'local' / f).read_text(), f
    rows = [json.loads(r.stdout)['rows'] for r in (on_ray, local)]
    assert len(rows[0]) == 12
    same_rows(*rows)
    assert len((tmp_path / 'ray' / 'episodes.jsonl').read_text().splitlines()) == 12 * 8


@pytest.mark.slow
def test_a_worker_killed_mid_run_has_its_chunk_run_again(cluster, driver, prices):
    "SIGKILL the worker process playing a chunk: Ray runs the chunk again; nothing is lost or doubled."
    from tradellm.data import load_panel
    from tradellm.scale import RayEpisodes
    panel = load_panel(prices)
    args = (['rsi', 'random'], ['easy', 'medium', 'hard'], 'test', 24)
    kw = dict(data=panel, track=False, progress=False, n_resamples=500)
    stop, killed, out = threading.Event(), [], {}
    watcher = threading.Thread(target=_kill_one_when_seen, args=(cluster, 'ray::_play_task', stop, killed))
    watcher.start()
    try: out['ray'] = ev.evaluate(*args, **kw, backend=RayEpisodes(chunk=4))
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 1, 'no chunk was running to kill'
    local = ev.evaluate(*args, **kw)
    same_rows(out['ray']['rows'], local['rows'])
    assert out['ray']['records'].keys() == local['records'].keys()
    for k in local['records']: same_records(out['ray']['records'][k], local['records'][k])


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_its_chunks_rerun(cluster, driver, prices):
    "A model agent's actor killed mid-run restarts (building its agent again) and plays its chunks: the same episodes."
    from tradellm.data import load_panel
    from tradellm.scale import RayEpisodes, RemoteAgent
    panel = load_panel(prices)
    stop, killed = threading.Event(), []
    with RayEpisodes(chunk=6, actors=1) as shards:
        agent = shards.agent('random:5')  # any spec can live in actors; a model spec always does
        assert isinstance(agent, RemoteAgent) and agent.config() == {'name': 'random', 'seed': 5, 'p_hold': 0.5}
        watcher = threading.Thread(target=_kill_one_when_seen, args=(cluster, 'ray::EpisodeActor', stop, killed))
        watcher.start()
        try: recs = shards.episodes(agent, 'hard', 'test', 30, 7, panel, progress=False)
        finally:
            stop.set()
            watcher.join()
    assert len(killed) == 1
    same_records(recs, ev.run_episodes('random:5', 'hard', 'test', 30, 7, panel, progress=False))


@pytest.mark.slow
def test_language_model_agents_run_in_actors_with_the_local_batches(cluster, driver, synth_panel, tmp_path):
    "A tiny LLM: by spec (the model loaded in the actors only), and as an object with batch_size 2: the local episodes."
    pytest.importorskip('torch')
    from test_llm import _tiny_model
    from tradellm.llm import LLMAgent, load_model
    from tradellm.scale import RayEpisodes
    folder = _tiny_model(tmp_path / 'tiny')
    agent = LLMAgent(*load_model(folder, device='cpu'), max_new_tokens=8, batch_size=2)
    local = ev.run_episodes(agent, 'easy', 'test', 4, 3, synth_panel, progress=False)
    with RayEpisodes(chunk=2) as shards:
        remote = shards.agent(f'llm:{folder}')
        assert remote.name == 'llm:tiny' and remote.config()['model'] == str(folder)
        same_records(shards.episodes(agent, 'easy', 'test', 4, 3, synth_panel, progress=False), local)


@pytest.mark.slow
def test_a_ray_evaluation_logs_to_a_tracking_server(cluster, driver, prices, tmp_path):
    "mlflow server on 127.0.0.1 (sqlite store, temporary artifact folder); runs, metrics and artifacts read back."
    from mlflow import MlflowClient
    from tradellm.scale import RayEpisodes, tracking_server
    with tracking_server(tmp_path / 'mlflow') as uri:
        assert uri.startswith('http://127.0.0.1:')
        res = ev.evaluate(['rsi', 'random'], ['easy'], 'test', 6, data=prices, tracking_uri=uri, progress=False,
                          n_resamples=500, backend=RayEpisodes(chunk=2))
        client = MlflowClient(uri)
        runs = {r['run_id']: r for r in ev.recorded_runs(uri)}
        for row in res['rows']:
            run = client.get_run(row['mlflow_run_id'])
            assert run.info.status == 'FINISHED' and run.data.tags['backend'] == 'ray'
            assert run.data.metrics['score_mean'] == pytest.approx(row['score_mean'])
            assert 'episodes.csv' in {a.path for a in client.list_artifacts(run.info.run_id)}
            assert runs[row['mlflow_run_id']]['episodes'] == 6
        port = int(uri.rsplit(':', 1)[1])
    import socket
    with pytest.raises(OSError): socket.create_connection(('127.0.0.1', port), timeout=1).close()  # the server is gone


# ---------------------------------------------------------------- vLLM (CUDA only)

def test_vllm_paths_fail_in_one_line_without_cuda(prices):
    torch = pytest.importorskip('torch')
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA: see the gpu test')
    r = cli('evaluate', '--agents', 'llm:smollm2@vllm', '--tasks', 'easy', '--episodes', '1', '--no-mlflow', '--quiet', '--data', str(prices))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith('tradellm evaluate: llm:smollm2@vllm: vLLM runs on CUDA GPUs and torch')
    r = cli('grpo', '--use-vllm', '--fresh-lora', '--steps', '1', '--no-mlflow', '--data', str(prices))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and 'grpo --use-vllm: vLLM runs on CUDA GPUs' in lines[0], r.stderr


@pytest.mark.gpu
def test_vllm_agent_plays_episodes_on_a_gpu(synth_panel):
    "On a CUDA machine with vllm: SmolLM2 through vLLM plays greedy episodes with the same prompts and parser."
    torch = pytest.importorskip('torch')
    pytest.importorskip('vllm')
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA GPU')
    from tradellm.agents import make_agent
    agent = make_agent('llm:smollm2@vllm')
    assert agent.spec == 'llm:smollm2@vllm' and agent.config()['engine'] == 'vllm'
    recs = ev.run_episodes(agent, 'easy', 'test', 4, 0, synth_panel, progress=False)
    assert [r['seed'] for r in recs] == [0, 1, 2, 3] and all(len(r['completions']) == 20 for r in recs)
    again = ev.run_episodes(agent, 'easy', 'test', 4, 0, synth_panel, progress=False)
    assert [r['actions'] for r in again] == [r['actions'] for r in recs]  # greedy: the same answers


class StandInEngine:
    "vLLM's `LLM.generate` in shape: one RequestOutput per prompt, answering `text` (cut at the limit when `cut`)."
    def __init__(self, tok, text='HOLD', cut=False): self.tok, self.text, self.cut, self.calls = tok, text, cut, []
    def get_tokenizer(self): return self.tok
    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.calls.append(dict(prompts=prompts, params=params, lora_request=lora_request))
        out = SimpleNamespace(text=self.text, token_ids=[7] * 5, finish_reason='length' if self.cut else 'stop')
        return [SimpleNamespace(prompt_token_ids=[1] * 11, outputs=[out]) for _ in prompts]


def test_vllm_agent_sends_the_llm_agents_prompts_and_reads_the_answers(synth_panel):
    "A stand-in engine on the CPU: the LLMAgent's prompts, one SamplingParams per chat, its answers parsed and logged."
    pytest.importorskip('transformers')
    from tradellm.llm import build_messages
    from tradellm.scale import VLLMAgent
    from test_llm import _tiny_model
    from transformers import AutoTokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(_tiny_model(Path(d) / 'tiny'))
    engine = StandInEngine(tok, 'BUY 0.5')
    agent = VLLMAgent(engine, sampling_params=dict, lora_request='LORA', max_new_tokens={'easy': 40}, prompt_style='compact')
    recs = ev.run_episodes(agent, 'easy', 'test', 3, 2, synth_panel, progress=False)
    first = engine.calls[0]
    envs_obs = ev.TradingEnv('easy', 'test', 'text', data=synth_panel).reset(seed=2)[0]
    assert first['prompts'][0] == tok.apply_chat_template(build_messages('easy', envs_obs, style='compact'), add_generation_prompt=True, tokenize=False)
    assert first['lora_request'] == 'LORA' and len(engine.calls) == 20
    p = first['params'][0]
    assert (p['max_tokens'], p['temperature'], p['seed'], p['skip_special_tokens']) == (40, 0.0, None, True)  # greedy
    assert tok.convert_tokens_to_ids('<|im_end|>') in p['stop_token_ids']
    assert all(r['format_errors'] == 0 and r['fills'][0]['side'] == 'BUY' for r in recs)
    assert agent.episode_logs()[0]['prompt_tokens'] == 20 * 11 and agent.episode_logs()[0]['generated_tokens'] == 20 * 5
    assert agent.name == 'llm:StandInEngine@vllm' and agent.config()['engine'] == 'vllm'
    cut = VLLMAgent(StandInEngine(tok, 'I think', cut=True), sampling_params=dict, temperature=0.8, seed=1)
    ev.run_episodes(cut, 'easy', 'test', 2, 0, synth_panel, progress=False)
    assert cut.episode_logs()[0]['issues'][0]['reason'] == 'endless'  # cut at the limit without an answer
    seeds = [p['seed'] for p in cut.engine.calls[0]['params']]
    assert len(set(seeds)) == 2 and None not in seeds


def test_vllm_spec_and_launcher_devices_on_a_cpu(monkeypatch):
    torch = pytest.importorskip('torch')
    from tradellm.agents import make_agent
    from tradellm.scale import VLLMError, is_main_process, process_device
    if not torch.cuda.is_available():
        with pytest.raises(VLLMError, match=r"llm:smollm2@vllm: vLLM runs on CUDA GPUs"): make_agent('llm:smollm2@vllm')
        with pytest.raises(VLLMError, match=r'llm:smollm2\+x@vllm: '): make_agent('llm:smollm2+x@vllm')
    monkeypatch.setenv('LOCAL_RANK', '2'); monkeypatch.setenv('WORLD_SIZE', '4'); monkeypatch.setenv('RANK', '2')
    assert (process_device(None), process_device('cpu'), is_main_process()) == ('cuda:2', 'cpu', False)
