"""Render every notebook to HTML with nbconvert, without Quarto (`make docs-preview`).

One page per notebook in `_preview/` (ignored by git), with the outputs stored in the notebook
(figures embedded as PNG): `index.html` is `nbs/index.ipynb`, as on the docs site, and `toc.html`
links every page. Cells marked `#| hide` are left
out, as on the docs site; `#| echo: false` cells show their outputs only. Nothing is executed:
`make docs-nbs` refreshes the outputs first.

    python scripts/preview_docs.py                  # every notebook into _preview/
    python scripts/preview_docs.py --only 06_evaluate --out /tmp/preview
"""
from __future__ import annotations

import argparse
import functools
import html
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_notebooks import notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
PREVIEW = ROOT / '_preview'
_DIRECTIVE = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*)$')


def directives(source:str) -> dict:
    "The leading `#| name value` lines of a cell's source, as {name: value} (`#| eval: false` -> {'eval': 'false'})."
    out = {}
    for line in source.splitlines():
        if not line.strip(): continue
        m = _DIRECTIVE.match(line)
        if not m: break
        out[m.group(1)] = m.group(2).strip().lower()
    return out


notebook_paths = notebooks  # the notebooks `make docs-nbs` executes (nbdev_test's own list), or those in `only`


def _for_reading(nb):
    "A copy of `nb` as the docs show it: `#| hide` cells dropped, inputs of `#| echo: false` cells hidden."
    import copy
    nb = copy.deepcopy(nb)
    cells = []
    for c in nb.cells:
        d = directives(c.source) if c.cell_type == 'code' else {}
        if 'hide' in d or d.get('include') == 'false': continue
        if d.get('echo') == 'false': c.metadata['jupyter'] = {'source_hidden': True}
        cells.append(c)
    nb.cells = cells
    return nb


@functools.lru_cache(maxsize=1)
def _exporter():
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name='lab')


def render_html(path:Path) -> str:
    "The HTML page of the notebook at `path` (nbconvert's lab template, outputs as stored)."
    import nbformat
    nb = nbformat.read(path, as_version=4)
    body, _ = _exporter().from_notebook_node(_for_reading(nb), resources={'metadata': {'name': path.stem}})
    return body


def _index(pages:list[tuple[str, str]]) -> str:
    items = '\n'.join(f'<li><a href="{html.escape(f)}">{html.escape(n)}</a></li>' for n, f in pages)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>tradellm notebooks (preview)</title></head>'
            f'<body><h1>tradellm notebooks</h1><p>A local preview of the stored outputs, made by '
            f'<code>make docs-preview</code>.</p><ul>\n{items}\n</ul></body></html>\n')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', default=None, help='comma-separated notebook names (default: all)')
    p.add_argument('--out', default=str(PREVIEW), help='folder for the pages (default: _preview)')
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for path in notebook_paths(a.only):
        rel = path.relative_to(NBS).with_suffix('.html')
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(render_html(path), encoding='utf-8')
        pages.append((path.stem, rel.as_posix()))
    (out / 'toc.html').write_text(_index(pages), encoding='utf-8')  # (index.html is nbs/index.ipynb's page)
    n_out = sum(bool(c.get('outputs')) for q in notebook_paths(a.only) for c in json.loads(q.read_text())['cells'])
    print(f"wrote {len(pages)} pages to {out}/ ({n_out} cells with outputs); open {out / 'toc.html'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
