"""The docs show what the notebooks compute (issue #22): the committed notebooks carry their outputs.

Checked on the notebooks as committed (`make docs-nbs` refreshes them): a notebook that draws a figure
stores an image and its nbconvert HTML page (`make docs-preview`) shows it; no output holds an error
or a traceback; a notebook with a cell that prints or displays something has outputs.
"""
import ast
import configparser
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
from preview_docs import directives, notebook_paths, render_html  # noqa: E402

_cfg = configparser.ConfigParser(); _cfg.read(ROOT / 'settings.ini')
SKIP_FLAGS = set(_cfg['DEFAULT']['tst_flags'].split())  # `notest slow gpu`: cells nbdev_test (and make docs-nbs) do not run
DRAWS = re.compile(r'(?<!def )\b(?:plt\.\w+|plot_\w+|Figure)\(|\.plot(?:\.\w+)?\(|\bsubplots\(|\.imshow\(|\.hist\(')
TRACEBACK = 'Traceback (most recent call last)'


def _nb(path): return json.loads(path.read_text(encoding='utf-8'))


def runs(cell) -> bool:
    "Whether `make docs-nbs` (like nbdev_test) executes this cell."
    if cell['cell_type'] != 'code': return False
    src = ''.join(cell['source'])
    d = directives(src)
    return d.get('eval') != 'false' and not (SKIP_FLAGS & d.keys()) and 'nbdev_export(' not in src


def draws_figure(nb) -> bool:
    "A cell that runs, defines nothing for export, and calls a plotting function."
    return any(runs(c) and 'export' not in directives(''.join(c['source'])) and DRAWS.search(''.join(c['source']))
               for c in nb['cells'])


def shows_something(nb) -> bool:
    "A cell that runs, is not an export, and prints, displays, or ends in an expression that is not a `test_*` call."
    for c in nb['cells']:
        src = ''.join(c['source'])
        if not runs(c) or 'export' in directives(src): continue
        if re.search(r'^\s*(print|display)\(', src, re.M): return True
        code = '\n'.join(ln for ln in src.splitlines() if not ln.lstrip().startswith(('!', '%')))
        try: body = ast.parse(code).body
        except SyntaxError: continue
        if not body or not isinstance(body[-1], ast.Expr) or code.rstrip().endswith(';'): continue
        f = getattr(body[-1].value, 'func', None)
        if not (getattr(f, 'id', None) or getattr(f, 'attr', '')).startswith('test_'): return True
    return False


def outputs(nb): return [o for c in nb['cells'] for o in c.get('outputs', [])]


def has_image(nb) -> bool: return any('image/png' in o.get('data', {}) for o in outputs(nb))


NOTEBOOKS = {p.stem: p for p in notebook_paths()}
FIGURES = sorted(n for n, p in NOTEBOOKS.items() if draws_figure(_nb(p)))
SHOWING = sorted(n for n, p in NOTEBOOKS.items() if shows_something(_nb(p)))


def test_figure_and_output_detection():
    "The finders see calls, not definitions or cells that do not run."
    cell = lambda src: {'cell_type': 'code', 'source': src, 'outputs': []}
    assert draws_figure({'cells': [cell("plot_scores(recs)")]}) and draws_figure({'cells': [cell("fig, ax = plt.subplots()")]})
    assert draws_figure({'cells': [cell("df.plot(x='a')")]}) and draws_figure({'cells': [cell("df.plot.bar()")]})
    assert not draws_figure({'cells': [cell("#| export\ndef plot_scores(r):\n    fig, ax = plt.subplots()")]})
    assert not draws_figure({'cells': [cell("#| eval: false\nplot_scores(recs)")]})
    assert not draws_figure({'cells': [cell("#| slow\nplot_scores(recs)")]})
    assert not draws_figure({'cells': [cell("def plot_it(r): pass")]})
    assert shows_something({'cells': [cell("p = f()\np")]}) and shows_something({'cells': [cell("print(1)")]})
    assert not shows_something({'cells': [cell("test_eq(f(), 1)")]}) and not shows_something({'cells': [cell("x = f()")]})
    assert not shows_something({'cells': [cell("#| export\ndef f(): print(1)")]})


@pytest.mark.parametrize('name', SHOWING)
def test_notebook_that_shows_something_has_outputs(name):
    assert outputs(_nb(NOTEBOOKS[name])), f"{name}.ipynb has no outputs: run `make docs-nbs NBS={name}` and commit it"


@pytest.mark.parametrize('name', FIGURES)
def test_figure_is_stored(name):
    assert has_image(_nb(NOTEBOOKS[name])), (f"{name}.ipynb draws a figure but stores no image: "
                                             f"run `make docs-nbs NBS={name}` and commit it")


@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_no_error_in_outputs(name):
    for c in _nb(NOTEBOOKS[name])['cells']:
        for o in c.get('outputs', []):
            text = ''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
            assert o['output_type'] != 'error', f"{name}.ipynb, cell {c.get('id')}: an error output ({o.get('ename')}: {o.get('evalue')})"
            assert TRACEBACK not in text, f"{name}.ipynb, cell {c.get('id')}: an output holds a traceback:\n{text[:500]}"


# nbconvert takes a second or more a page: the JSON checks above cover every notebook, the HTML check the
# leaderboard's page (06_evaluate) and the smallest other notebook that draws (`make docs-preview` renders all).
HTML_CHECKED = sorted({'06_evaluate'} & set(FIGURES)) + sorted((n for n in FIGURES if n != '06_evaluate'),
                                                                key=lambda n: NOTEBOOKS[n].stat().st_size)[:1]


@pytest.mark.parametrize('name', HTML_CHECKED)
def test_figures_render_in_html(name):
    "nbconvert's page of a notebook that draws shows every figure it stores."
    page = render_html(NOTEBOOKS[name])
    n_img = len(re.findall(r'<img[^>]+src="data:image/png;base64,', page))
    n_png = sum('image/png' in o.get('data', {}) for o in outputs(_nb(NOTEBOOKS[name])))
    assert n_img >= n_png >= 1, f"{name}: {n_png} stored figures, {n_img} images in its HTML page"


def test_some_notebook_draws():
    assert FIGURES, 'no notebook draws a figure: the figure finder is broken'
