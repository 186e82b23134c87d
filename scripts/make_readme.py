"""Write README.md from nbs/index.ipynb without Quarto (which renders it on the docs site).

Markdown cells are copied; code cells become ```python blocks, with their text outputs (if any)
below; cells marked `#| hide` are skipped. `--check` exits 1 when README.md is out of date.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path=ROOT / 'nbs' / 'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip('\n')
        if cell['cell_type'] == 'markdown':
            parts.append(src)
            continue
        lines = src.splitlines()
        if any(line.strip().replace(' ', '') in ('#|hide', '#|include:false') for line in lines): continue
        code = '\n'.join(line for line in lines if not line.startswith('#|')).strip('\n')
        if code: parts.append(f'```python\n{code}\n```')
        for out in cell.get('outputs', []):
            text = ''.join(out.get('text', '') or out.get('data', {}).get('text/plain', ''))
            if text.strip(): parts.append(f'```\n{text.rstrip()}\n```')
    body = '\n\n'.join(parts) + '\n'
    return '<!-- made from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file -->\n\n' + body


if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run python scripts/make_readme.py')
        sys.exit(0)
    readme.write_text(text, encoding='utf-8')
    print(f'wrote {readme}')
