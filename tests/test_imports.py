"""The package's modules import one way down (data -> indicators -> market -> tasks -> env -> agents -> evaluate ->
training and scale-out), counting imports inside functions; modules above reach down, never the reverse. Agent kinds
served from above (`llm`, `ppo`, `scale`) are named in `tradellm.agents` by entry points, which import nothing."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'tradellm'


def imports_of(path: Path, modules: set) -> set:
    "The package modules a module imports, at the top or inside functions (`from .x import`, `from tradellm.x import`, `import tradellm.x`)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: found.add(node.module.split('.')[0])
            elif node.level == 1: found |= {a.name for a in node.names}
            elif node.module == 'tradellm': found |= {a.name for a in node.names}
            elif node.module and node.module.startswith('tradellm.'): found.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('tradellm.')}
    return {m for m in found if m in modules} - {path.stem}


def import_graph() -> dict:
    modules = {p.stem for p in PACKAGE.glob('*.py') if not p.stem.startswith('_')}
    return {m: imports_of(PACKAGE / f'{m}.py', modules) for m in sorted(modules)}


def find_cycle(graph: dict):
    "One import cycle as a list of modules, or None."
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'; stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 'open': return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[m] = 'done'; stack.pop()
        return None

    for m in graph:
        if m not in state and (c := visit(m)): return c
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) >= 15 and 'agents' in graph and graph['env'] >= {'market', 'tasks'}  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


@pytest.mark.parametrize('lower, upper', [('agents', 'llm'), ('agents', 'ppo'), ('agents', 'scale'), ('evaluate', 'ppo'),
                                          ('evaluate', 'llm'), ('evaluate', 'scale'), ('env', 'agents'), ('tasks', 'env')])
def test_layers_point_down(lower, upper):
    assert upper not in import_graph()[lower], f"{lower} imports {upper}, a module above it"


def test_tracking_sits_below_evaluation_and_training():
    "MLflow tracking is its own module: it reads only the data folder's location, and the trainers reach it without evaluate."
    graph = import_graph()
    assert graph['tracking'] <= {'data'}, graph['tracking']
    for m in ('evaluate', 'ppo', 'sft', 'grpo', 'experiment'): assert 'tracking' in graph[m], m


def test_light_imports():
    "`import tradellm.evaluate` (what the leaderboard needs) loads no model library and none of the modules above it."
    code = ("import sys, tradellm, tradellm.evaluate; heavy = {'torch', 'transformers', 'trl', 'ray', 'stable_baselines3', "
            "'tradellm.llm', 'tradellm.ppo', 'tradellm.scale', 'tradellm.sft', 'tradellm.grpo'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == '[]', out


def test_agent_kinds_resolve_to_real_functions():
    from tradellm.agents import AGENT_KINDS, entry_point
    for kind, k in AGENT_KINDS.items():
        if kind == 'llm@vllm': continue  # (imports tradellm.scale, which needs nothing at import; checked below)
        assert callable(entry_point(k.make)), kind
    import tradellm.scale as scale
    assert callable(scale.vllm_agent_from_spec)
