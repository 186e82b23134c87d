"""The HTTP server and its client: remote episodes equal local ones, bad requests get clear 4xx answers,
sessions are isolated, capped and expire, and 50 concurrent clients play whole episodes without errors."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip('openenv.core.env_server')
pytest.importorskip('httpx')
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tradellm.client import RemoteEnvError, RemoteTradingEnv  # noqa: E402
from tradellm.env import TradingEnv  # noqa: E402
from tradellm.market import Order  # noqa: E402
from tradellm.server import (MAX_ACTION_CHARS, MAX_BODY_BYTES, TradingEnvironment, background_server,  # noqa: E402
                             cli_serve, make_app)
from tradellm.tasks import ENV_VERSION, TASKS  # noqa: E402


@pytest.fixture(scope='module')
def app(synth_panel):
    return make_app(synth_panel, max_sessions=64)


@pytest.fixture(scope='module')
def http(app):
    return TestClient(app)


def policy(symbols, day, seed):
    "A deterministic mix of buys, sells, holds and junk, different for each seed and day."
    n = len(symbols)
    k = (seed * 7 + day) % 5
    if k == 0: return 'HOLD'
    if k == 1: return f"BUY {symbols[(seed + day) % n]} 0.{(seed % 8) + 1}"
    if k == 2: return f"SELL {symbols[(seed + day + 1) % n]} 0.5\nBUY {symbols[day % n]} 0.25"
    if k == 3: return f"<think>rsi low</think> BUY {symbols[(3 * seed + day) % n]} 1.0; SELL {symbols[seed % n]} 1"
    return 'sell everything please'  # unparseable: HOLD with the reason in info


def same_step(remote, local):
    "Assert one remote step result equals the local one, exactly."
    (ro, rr, rt, rtr, ri), (lo, lr, lt, ltr, li) = remote, local
    if isinstance(lo, np.ndarray):
        assert ro.dtype == np.float32 and ro.shape == lo.shape and np.array_equal(ro, lo)
    else:
        assert ro == lo
    assert (rr, rt, rtr) == (lr, lt, ltr)
    assert ri == li


def play_pair(remote, local, seed, **reset):
    "Play one whole episode on both envs with `policy`; returns the number of steps."
    ro, ri = remote.reset(seed=seed, **reset)
    lo, li = local.reset(seed=seed, **reset)
    same_step((ro, 0, 0, 0, ri), (lo, 0, 0, 0, li))
    assert remote.symbols == local.symbols
    done, day = False, 0
    while not done:
        action = policy(local.symbols, day, seed)
        r, l = remote.step(action), local.step(action)
        same_step(r, l)
        done, day = l[2], day + 1
    return day


# --- remote == local -------------------------------------------------------------------------------

@pytest.mark.parametrize('task,mode', [('easy', 'text'), ('medium', 'numeric'), ('hard', 'text'), ('hard', 'numeric')])
def test_remote_episode_equals_local(http, synth_panel, task, mode):
    remote = RemoteTradingEnv(task=task, split='test', obs_mode=mode, client=http)
    local = TradingEnv(task, 'test', mode, data=synth_panel)
    for seed in (0, 11):  # two episodes in the same session
        days = play_pair(remote, local, seed)
        assert days == TASKS[task].days
        v, lv = remote.view, local.view
        assert (v.day, v.date, v.symbols, v.cash, v.equity, v.buy_blocked) == (lv.day, lv.date, lv.symbols, lv.cash, lv.equity, lv.buy_blocked)
        assert np.array_equal(v.market, lv.market) and np.array_equal(v.avg_cost, lv.avg_cost) and (v.labels == lv.labels).all()
        assert v.feature('rsi', 0) == lv.feature('rsi', 0) and v.feature('cash') == lv.feature('cash')
    assert remote.actions == local.actions[-TASKS[task].days:]
    assert (remote.env_version, remote.task_version) == (ENV_VERSION, TASKS[task].version)
    assert remote.observation_space.contains(remote.reset(seed=1)[0])
    assert remote.state()['task'] == task
    remote.close()


def test_pinned_episode_and_order_objects(http, synth_panel):
    local = TradingEnv('medium', 'val', data=synth_panel)
    local.reset(seed=2)
    opts = {'start': local._dates[0], 'symbols': list(local.symbols)}
    with RemoteTradingEnv(task='medium', split='val', client=http) as remote:
        obs, info = remote.reset(options=opts)
        assert obs == local.reset(options=opts)[0] and info['date'] == opts['start']
        orders = [Order('BUY', local.symbols[0], 0.3), Order('BUY', local.symbols[1], 1 / 3)]
        r, l = remote.step(orders), local.step(orders)
        same_step(r, l)
        assert r[4]['orders'][1]['status'] == 'filled' and remote.actions[-1].startswith('BUY')
        same_step(remote.step([]), local.step([]))  # no orders: HOLD
        sid = remote.session_id
    assert http.get('/state', params={'session_id': sid}).status_code == 404  # closed on exit


def test_order_lists_fill_remotely_as_locally(http, synth_panel):
    "numpy sizes trade as the floats they equal, and orders `execute` refuses are refused remotely too, in their places."
    from fractions import Fraction
    local = TradingEnv('medium', 'test', data=synth_panel)
    with RemoteTradingEnv(task='medium', client=http) as remote:
        remote.reset(seed=4), local.reset(seed=4)
        s = local.symbols
        orders = [Order('BUY', s[0], np.float32(0.25)), Order('buy', s[1], 0.5), Order('BUY', s[2].lower(), 0.5),
                  Order('BUY', s[3], np.float64(1.5)), Order('SELL', s[4], 0.5), Order(None, 7, 0.5), Order('BUY', s[5], Fraction(1, 8)),
                  Order('BUY', s[6], np.float64(0.0)), Order('BUY', s[7], np.int64(1)), Order('BUY', s[8], 0.1),
                  Order('BUY', s[9], 0.1), Order('BUY', s[9], 0.1)]
        r, l = remote.step(orders), local.step(orders)
        same_step(r, l)
        assert remote.actions == local.actions
        fills = r[4]['orders']
        assert [f['status'] for f in fills] == ['filled', 'rejected', 'rejected', 'rejected', 'rejected', 'rejected', 'filled',
                                                'rejected', 'reduced', 'filled', 'rejected', 'rejected']  # (np.int64(1): all the cash, cut to the 30% cap)
        assert fills[2]['reason'] == f'{s[2].lower()} is not in this episode' and fills[5]['reason'] == '7 is not in this episode'
        assert fills[1]['reason'].endswith('got buy 0.5') and fills[7]['reason'].endswith('got BUY np.float64(0.0)')
        assert fills[-1]['reason'] == fills[-2]['reason'] == 'beyond the daily limit of 10 orders'
        # the float32 quarter of 200,000 buys floor(50,000 / (price incl. slippage and costs)) shares
        assert fills[0]['shares'] == int(50_000 / (fills[0]['price'] * 1.001)) > 0
        # everything refused: the server gets a HOLD, and the refusals still come back
        r, l = remote.step([Order('BUY', 'nope', 0.5)]), local.step([Order('BUY', 'nope', 0.5)])
        same_step(r, l)
        assert [f['status'] for f in r[4]['orders']] == ['rejected'] and r[4]['format_ok']
        with pytest.raises(TypeError, match='list of tradellm.market.Order'): remote.step(['BUY X 0.5'])


def test_openenv_environment_reuses_one_env_per_combination(synth_panel):
    env = TradingEnvironment(synth_panel)
    env.reset(seed=0, task='easy')
    first = env.env
    env.reset(seed=1, task='easy')
    assert env.env is first and env.state.seed == 1
    env.reset(seed=1, task='medium', obs_mode='numeric', view=False)
    assert env.env is not first and len(env._envs) == 2
    obs = env.step('HOLD')
    assert obs.view is None and len(obs.vector) == len(env.env.feature_names) and obs.reward == 0.0
    assert env.get_metadata().version == ENV_VERSION


# --- every response carries the versions; health and metadata answer ---------------------------------

def test_health_metadata_schema(http):
    h = http.get('/health')
    assert h.status_code == 200 and h.headers['x-env-version'] == ENV_VERSION
    d = h.json()
    assert d['status'] == 'healthy' and d['env_version'] == ENV_VERSION
    assert d['task_versions'] == {n: t.version for n, t in TASKS.items()} and d['max_sessions'] == 64
    m = http.get('/metadata').json()
    assert m['name'] == 'tradellm' and m['env_version'] == ENV_VERSION and m['version'] == ENV_VERSION
    assert m['tasks']['medium']['n_stocks'] == 10 and m['tasks']['hard']['regime_gate'] is True
    assert set(m['splits']) == {'train', 'val', 'test'} and m['data']['symbols'] == 30 and m['openenv_core']
    s = http.get('/schema')  # OpenEnv's own route, kept
    assert s.status_code == 200 and 'text' in s.json()['action']['properties']
    assert s.headers['x-env-version'] == ENV_VERSION
    r = http.post('/reset', json={'task': 'hard', 'seed': 4})
    assert r.headers['x-task-version'] == r.json()['task_version'] == TASKS['hard'].version
    assert http.get('/nowhere').json()['env_version'] == ENV_VERSION  # errors too


# --- bad requests: a clear 4xx, and the server keeps serving ----------------------------------------

@pytest.fixture
def session(http):
    sid = http.post('/reset', json={'task': 'easy', 'seed': 0}).json()['session_id']
    yield sid
    http.delete(f'/sessions/{sid}')


def check(r, status, *phrases):
    assert r.status_code == status, (r.status_code, r.text)
    d = r.json()
    assert d['env_version'] == ENV_VERSION and d['error']
    for p in phrases: assert p in d['detail'], (p, d['detail'])
    return d


def test_bad_requests(http, session):
    J = {'content-type': 'application/json'}
    check(http.post('/reset', content=b'{"task": "easy", ', headers=J), 400, 'malformed JSON')
    check(http.post('/step', content=b'not json at all', headers=J), 400, 'malformed JSON')
    check(http.post('/reset', json={'task': 'impossible'}), 400, "unknown task 'impossible'", 'easy, medium, hard')
    check(http.post('/reset', json={'split': 'future'}), 400, "unknown split 'future'")
    check(http.post('/reset', json={'obs_mode': 'pixels'}), 400, "unknown obs_mode 'pixels'")
    check(http.post('/reset', json={'seed': -1}), 422, 'seed', 'greater than or equal to 0')
    check(http.post('/reset', json={'tsak': 'easy'}), 422, 'tsak', 'Extra inputs')
    check(http.post('/reset', json=[1, 2]), 422)
    check(http.post('/reset', json={'options': {'start': '1999-01-04'}}), 400, "is not a valid test start")
    check(http.post('/reset', json={'options': {'symbols': ['NOPE']}}), 400, "symbol 'NOPE' is not in the data")
    check(http.post('/step', json={'action': 'HOLD'}), 400, 'step before reset', 'POST /reset')
    check(http.post('/step', json={'session_id': 'deadbeef', 'action': 'HOLD'}), 404, "'deadbeef' is unknown")
    check(http.post('/step', json={'session_id': session}), 422, 'action', 'Field required')
    check(http.post('/step', json={'session_id': session, 'action': 42}), 422, 'action must be a string')
    check(http.post('/step', json={'session_id': session, 'action': {'txt': 'HOLD'}}), 422, 'action')
    check(http.post('/step', json={'session_id': session, 'action': {}}), 422, "no 'text'")  # not a silent HOLD
    long = 'HOLD;' * 2000  # 10,000 characters: under the body limit, over the action limit
    check(http.post('/step', json={'session_id': session, 'action': long}), 422, f'the limit is {MAX_ACTION_CHARS}')
    big = 'B' * 2**20  # 1 MB: refused before it is parsed
    check(http.post('/step', json={'session_id': session, 'action': big}), 413, f'limit of {MAX_BODY_BYTES} bytes')
    chunks = (b'{"session_id": "x", "action": "' + b'B' * 2**16 for _ in range(16))  # chunked, no Content-Length
    check(http.post('/step', content=chunks, headers=J), 413, 'more than')
    check(http.get('/state'), 422, 'session_id')
    check(http.delete('/sessions/nope'), 404, "'nope' is unknown")
    # after all that, the session still plays, in both action forms
    r = http.post('/step', json={'session_id': session, 'action': {'text': 'BUY 0.5'}})
    assert r.status_code == 200 and r.json()['info']['orders'][0]['status'] == 'filled'
    for _ in range(19): r = http.post('/step', json={'session_id': session, 'action': 'HOLD'})
    assert r.json()['done'] and 'score' in r.json()['info']
    d = check(http.post('/step', json={'session_id': session, 'action': 'HOLD'}), 409, 'the episode is over')
    assert d['task_version'] == TASKS['easy'].version and d['session_id'] == session
    assert http.post('/reset', json={'session_id': session, 'seed': 1}).status_code == 200  # a new episode, same session
    assert http.get('/health').json()['status'] == 'healthy'


def test_failed_reset_does_not_leak_sessions(app, http):
    before = len(app.state.sessions)
    for _ in range(5): http.post('/reset', json={'task': 'nope'})
    assert len(app.state.sessions) == before


def test_busy_session_and_internal_errors(app, http, session, monkeypatch):
    s = app.state.sessions.get(session)
    with s.lock:  # another request of this session is running
        check(http.post('/step', json={'session_id': session, 'action': 'HOLD'}), 409, 'busy')
    def boom(self, action, **kw): raise ZeroDivisionError('bug')
    monkeypatch.setattr(TradingEnvironment, 'step', boom)
    check(http.post('/step', json={'session_id': session, 'action': 'HOLD'}), 500, 'ZeroDivisionError: bug')
    monkeypatch.undo()
    assert http.post('/step', json={'session_id': session, 'action': 'HOLD'}).status_code == 200


def test_client_errors(http):
    remote = RemoteTradingEnv(task='easy', client=http)
    with pytest.raises(RuntimeError, match=r'call reset\(\) before step'): remote.step('HOLD')
    with pytest.raises(RuntimeError, match='no view yet'): _ = remote.view
    with pytest.raises(RuntimeError, match='reset'): remote.state()
    with pytest.raises(ValueError, match="obs_mode must be 'text' or 'numeric'"): RemoteTradingEnv(obs_mode='x', client=http)
    with pytest.raises(ValueError, match='unknown task'): RemoteTradingEnv(task='x', client=http)
    remote.reset(seed=0)
    remote.session_id = 'forged'
    with pytest.raises(RemoteEnvError, match="HTTP 404 unknown_session: session 'forged' is unknown") as e:
        remote.step('HOLD')
    assert e.value.status == 404 and e.value.kind == 'unknown_session'
    remote.reset(seed=0)  # an unknown session on reset: the client opens a new one
    assert remote.session_id != 'forged'
    with pytest.raises(RemoteEnvError, match='HTTP 413'): remote.step('x' * 2**20)
    remote.close(); remote.close()
    lean = RemoteTradingEnv(task='medium', obs_mode='numeric', client=http, view=False)
    obs, info = lean.reset(seed=3)
    assert obs.shape == lean.observation_space.shape and len(info['symbols']) == 10
    with pytest.raises(RuntimeError, match='view=False'): _ = lean.view
    lean.close()


def test_client_against_a_dead_server():
    with pytest.raises(httpx.ConnectError):
        RemoteTradingEnv('http://127.0.0.1:9', timeout=2).reset(seed=0)


# --- sessions: cap and expiry ----------------------------------------------------------------------

def test_session_cap_and_expiry(synth_panel):
    now = [1000.0]
    app = make_app(synth_panel, max_sessions=2, session_ttl=60, clock=lambda: now[0])
    http = TestClient(app)
    a = http.post('/reset', json={'seed': 0}).json()['session_id']
    b = http.post('/reset', json={'seed': 1}).json()['session_id']
    r = http.post('/reset', json={'seed': 2})
    check(r, 503, 'maximum of 2 sessions', 'DELETE /sessions/ID')
    assert r.headers['retry-after'] == '5'
    assert http.get('/health').json()['sessions'] == 2
    now[0] += 50
    assert http.post('/step', json={'session_id': a, 'action': 'HOLD'}).status_code == 200  # a used at t+50
    now[0] += 20  # b idle 70 s > 60: expired; a idle 20 s
    check(http.post('/step', json={'session_id': b, 'action': 'HOLD'}), 404, 'expired after 60 s idle')
    c = http.post('/reset', json={'seed': 2})
    assert c.status_code == 200  # b's slot is free again
    assert http.delete(f'/sessions/{a}').json()['closed'] is True
    now[0] += 61
    assert http.get('/health').json()['sessions'] == 0  # c expired too
    remote = RemoteTradingEnv(client=http)
    remote.reset(seed=0)
    first = remote.session_id
    now[0] += 61
    remote.reset(seed=0)  # its session expired: the client opens another
    assert remote.session_id != first
    with pytest.raises(ValueError, match='max_sessions'): make_app(synth_panel, max_sessions=0)


# --- OpenEnv's WebSocket sessions -----------------------------------------------------------------

def test_websocket_sessions(app, synth_panel):
    local = TradingEnv('medium', 'test', data=synth_panel)
    with TestClient(app) as http, http.websocket_connect('/ws') as ws, http.websocket_connect('/ws') as other:
        ws.send_json({'type': 'step', 'data': {'text': 'HOLD'}})
        err = ws.receive_json()
        assert err['type'] == 'error' and 'step before reset' in err['data']['message']
        ws.send_json({'type': 'reset', 'data': {'seed': 8, 'task': 'medium'}})
        other.send_json({'type': 'reset', 'data': {'seed': 9, 'task': 'easy'}})
        d = ws.receive_json()['data']
        obs, info = local.reset(seed=8)
        assert d['observation']['text'] == obs and d['observation']['info'] == info and d['done'] is False
        assert d['observation']['env_version'] == ENV_VERSION and d['observation']['task_version'] == TASKS['medium'].version
        assert other.receive_json()['data']['observation']['info']['symbols'] != info['symbols']
        for day in range(30):
            action = policy(local.symbols, day, 8)
            ws.send_json({'type': 'step', 'data': {'text': action}})
            d = ws.receive_json()['data']
            lo, lr, lt, _, li = local.step(action)
            assert (d['observation']['text'], d['reward'], d['done'], d['observation']['info']) == (lo, lr, lt, li)
        ws.send_json({'type': 'state'})
        st = ws.receive_json()['data']
        assert st['day'] == 30 and st['done'] is True and st['task'] == 'medium' and st['step_count'] == 30
        ws.send_json({'type': 'step', 'data': {'text': 'x' * (MAX_ACTION_CHARS + 1)}})
        assert ws.receive_json()['type'] == 'error'


# --- load test on loopback -------------------------------------------------------------------------

def test_load_50_concurrent_clients(synth_panel, capsys):
    """50 clients at once, each a whole medium episode of its own seed; afterwards each episode is replayed
    on a local env and must match step by step (a session that saw another's state would not)."""
    clients, task = 50, 'medium'
    app = make_app(synth_panel, max_sessions=clients)
    failures, episodes = [], {}

    def play(seed):
        try:
            mode = 'text' if seed % 2 else 'numeric'
            with RemoteTradingEnv(base_url, task=task, obs_mode=mode, timeout=120) as remote:
                steps = [(*remote.reset(seed=seed), None)]
                done, day = False, 0
                while not done:
                    action = policy(remote.symbols, day, seed)
                    steps.append((remote.step(action), action))
                    done, day = steps[-1][0][2], day + 1
            episodes[seed] = (mode, steps)
        except Exception as e:  # collected, so one failure does not hide the others
            failures.append(f"seed {seed}: {type(e).__name__}: {e}")

    with background_server(app) as base_url:
        assert base_url.startswith('http://127.0.0.1:')
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(play, range(100, 100 + clients), timeout=300))
        wall = time.perf_counter() - t0
        assert httpx.get(f'{base_url}/health').json()['sessions'] == 0  # every client closed its session
    assert not failures, failures[:5]
    assert sorted(episodes) == list(range(100, 100 + clients))
    n_steps = sum(len(steps) - 1 for _, steps in episodes.values())
    with capsys.disabled():
        print(f"\nload test: {clients} concurrent clients, {n_steps + clients} requests ({n_steps} steps) in {wall:.1f} s: "
              f"{n_steps / wall:.0f} steps/s")
    for seed, (mode, steps) in episodes.items():  # replay locally: every observation, reward and info must match
        local = TradingEnv(task, 'test', mode, data=synth_panel)
        (obs, info, _), (lo, li) = steps[0], local.reset(seed=seed)
        same_step((obs, 0, 0, 0, info), (lo, 0, 0, 0, li))
        for result, action in steps[1:]: same_step(result, local.step(action))
        assert len(steps) - 1 == TASKS[task].days
    assert wall < 300


def test_background_server_reports_a_failed_start(synth_panel, monkeypatch):
    import uvicorn
    monkeypatch.setattr(uvicorn.Server, 'run', lambda self, sockets=None: None)
    with pytest.raises(RuntimeError, match='did not start'):
        with background_server(make_app(synth_panel), timeout=1): pass


# --- the command --------------------------------------------------------------------------------

def test_cli_serve_arguments(synth_panel, tmp_path, monkeypatch, capsys):
    import uvicorn
    from tradellm.data import save_panel
    assert cli_serve(['--help']) == 0
    assert '127.0.0.1' in capsys.readouterr().out
    assert cli_serve(['--port', 'eighty']) == 2
    assert cli_serve(['--max-sessions', '0']) == 2
    assert cli_serve(['--data', str(tmp_path / 'empty')]) == 1
    assert 'tradellm serve:' in capsys.readouterr().err
    folder = save_panel(synth_panel, tmp_path / 'prices')
    calls = []
    monkeypatch.setattr(uvicorn, 'run', lambda app, **kw: calls.append(kw))
    assert cli_serve(['--data', str(folder), '--json']) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['url'] == 'http://127.0.0.1:8000' and out['env_version'] == ENV_VERSION and out['symbols'] == 30
    assert calls[-1]['host'] == '127.0.0.1' and calls[-1]['port'] == 8000  # loopback by default
    assert cli_serve(['--data', str(folder), '--host', '0.0.0.0', '--port', '9001']) == 0
    assert 'exposes the environment to the network' in capsys.readouterr().err
    assert calls[-1]['host'] == '0.0.0.0' and calls[-1]['port'] == 9001


def test_cli_serve_end_to_end(synth_panel, tmp_path):
    "`tradellm serve` in its own process answers on loopback until stopped."
    from tradellm.data import save_panel
    folder = save_panel(synth_panel, tmp_path / 'prices')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, '-c', 'import sys; from tradellm.cli import main; sys.exit(main(sys.argv[1:]))',
           'serve', '--port', str(port), '--data', str(folder), '--log-level', 'warning']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        url, deadline = f'http://127.0.0.1:{port}', time.monotonic() + 90
        while True:
            try:
                if httpx.get(f'{url}/health', timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, 'server did not answer within 90 s'
            time.sleep(0.3)
        with RemoteTradingEnv(url, task='easy') as remote:
            obs, info = remote.reset(seed=0)
            assert info['env_version'] == ENV_VERSION and obs.startswith('Day 1 of 20')
            assert remote.step('BUY 1.0')[4]['orders'][0]['status'] == 'filled'
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None


def test_threads_do_not_share_state(synth_panel):
    "The same seed played by two threads at once gives each the same episode: no shared mutable state."
    app = make_app(synth_panel)
    http = TestClient(app)
    results = {}
    def run(name):
        remote = RemoteTradingEnv(task='medium', client=http)
        remote.reset(seed=5)
        results[name] = [remote.step(policy(remote.symbols, d, 5))[4]['equity'] for d in range(30)]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    assert len(results) == 4 and all(v == results[0] for v in results.values())


@pytest.mark.parametrize('spec', ['rsi', 'buy_and_hold', 'random:3'])
def test_rule_agents_play_remote_envs_like_local_ones(http, synth_panel, spec):
    "Agents that read `env.view`, `env.symbols` and `env.task` act on remote envs exactly as on local ones, in lockstep."
    from tradellm.agents import make_agent
    seeds = (21, 22, 23)
    remotes = [RemoteTradingEnv(task='medium', client=http) for _ in seeds]
    locals_ = [TradingEnv('medium', 'test', data=synth_panel) for _ in seeds]
    results = []
    for envs in (remotes, locals_):
        agent = make_agent(spec)
        obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
        agent.reset(envs)
        actions, infos = [], []
        for _ in range(TASKS['medium'].days):
            acts = agent.act(envs, obs)
            steps = [env.step(a) for env, a in zip(envs, acts)]
            obs = [s[0] for s in steps]
            actions.append(acts); infos.append([s[4] for s in steps])
        results.append((actions, infos))
    assert results[0] == results[1]
    if spec != 'rsi': assert any('BUY' in a for day in results[0][0] for a in day)  # it did trade
    if spec == 'random:3': assert any('SELL' in a for day in results[0][0] for a in day)  # and sold what the view shows held
    assert [i['score'] for i in results[0][1][-1]] == [e.metrics()['score'] for e in locals_]
    for r in remotes: r.close()
