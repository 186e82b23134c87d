"""Re-execute the notebooks in place so their stored outputs match the code (`make docs-nbs`).

Cells are run the way `nbdev_test` runs them, with execnb's `CaptureShell` (the engine nbdev uses):
the notebook's folder is the working directory, the repository root is on `sys.path`, `IN_TEST=1`
is set, and a cell is skipped when it carries `#| eval: false`, calls `nbdev_export(`, or carries one
of the `tst_flags` of settings.ini (`notest slow gpu`); a notebook whose front matter says
`skip_exec: true` is left as it is. A skipped cell keeps no output, so no stale output survives.

Each notebook runs in a fresh Python process; the first error stops the run with the notebook, the
cell and the traceback, and leaves that notebook's file untouched. Figures are stored as PNG at
`--dpi` (default 72; `$DOCS_DPI`) to keep `nbs/` small. Written notebooks are then cleaned with
`nbdev_clean` (settings.ini `clear_all = False`: metadata and execution counts go, outputs stay),
and README.md is made again from index.ipynb when that ran (`scripts/make_readme.py`).

    python scripts/run_notebooks.py                          # every notebook nbdev_test would run
    python scripts/run_notebooks.py --only 00_data,01_indicators
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_FLAG = '--run-one'  # internal: execute one notebook in this (fresh) process
# the environment scripts/test.sh gives nbdev_test (values already set win)
RUN_ENV = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false', MPLBACKEND='Agg',
               HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1',
               # ...and no progress bars in the stored outputs (they change on every run and say nothing to a reader)
               HF_HUB_DISABLE_PROGRESS_BARS='1', HF_DATASETS_DISABLE_PROGRESS_BARS='1')


def notebooks(only:str|None=None) -> list[Path]:
    "The notebooks `nbdev_test` would test (nbdev's own glob of `nbs_path`), or those named in `only`."
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    files = sorted(p for p in nbglob(get_config(path=ROOT).nbs_path, as_path=True) if not (p.parent / '.notest').exists())
    if not only: return files
    names = [n.strip().removesuffix('.ipynb') for n in only.split(',') if n.strip()]
    by_stem = {p.stem: p for p in files}
    unknown = [n for n in names if n not in by_stem]
    if unknown: sys.exit(f"--only: no notebook named {', '.join(unknown)} in nbs/; choose from {', '.join(by_stem)}")
    return [by_stem[n] for n in names]


def _skip_reason(cell, flags:set) -> str|None:
    "Why nbdev_test would not run `cell` (None: it runs). Mirrors `nbdev.test.test_nb`'s `_no_eval`."
    from nbdev.process import extract_directives
    if cell.cell_type != 'code': return 'markdown'
    if 'nbdev_export' + '(' in cell.source: return 'nbdev_export'
    direc = extract_directives(cell, remove=False) or {}
    if direc.get('eval:', [''])[0].lower() == 'false': return 'eval: false'
    hit = flags & direc.keys()
    return f"#| {' '.join(sorted(hit))}" if hit else None


def run_one(path:Path, dpi:int) -> int:
    "Execute `path` in this process and write its outputs back; 1 (and the file untouched) on the first error."
    os.environ.setdefault('TQDM_DISABLE', '1')  # before anything imports tqdm (the parent keeps its own bar)
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor, nb_lang
    cfg = get_config()
    flags = set(cfg.tst_flags.split())
    fm = getattr(NBProcessor(path, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {})
    nb = read_nb(path)
    if str(fm.get('skip_exec', False)).lower() in ('true', '1', 'yes') or nb_lang(nb) != 'python':
        print(f"{path.name}: skip_exec in its front matter (or not Python): left as it is")
        return 0
    os.environ['IN_TEST'] = '1'  # as nbdev_test sets it
    sys.path.insert(0, str(cfg.config_path))
    shell = CaptureShell(path, mpl_format='png')
    # a modest dpi for every figure (the inline backend stores them at the figure's dpi)
    shell.run(f"import matplotlib as _mpl; _mpl.rcParams['figure.dpi'] = {dpi}; _mpl.rcParams['savefig.dpi'] = {dpi}; del _mpl")
    with working_directory(path.parent):
        for cell in nb.cells:
            if cell.cell_type != 'code': continue
            if _skip_reason(cell, flags):
                cell.outputs, cell.execution_count = [], None
                continue
            cell.outputs = []  # (execnb keeps a cell's old outputs when it prints nothing)
            shell.cell(cell)
            if shell.exc is not None:
                first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith('#|')), '')
                sys.stderr.write(f"\n{path.name}: cell #{cell.idx_ + 1} (id {cell.get('id', '?')}) failed: {first[:100]}\n")
                sys.stderr.write(shell.prettytb(fname=path) + '\n')
                return 1
    write_nb(nb, path)
    return 0


def _clean(paths:list[Path]):
    "nbdev_clean each written notebook: metadata and execution counts go, outputs stay (clear_all = False)."
    from nbdev.clean import nbdev_clean
    for p in paths: nbdev_clean(fname=str(p))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', default=None, help='comma-separated notebook names, e.g. 00_data,01_indicators (default: all)')
    p.add_argument('--dpi', type=int, default=int(os.environ.get('DOCS_DPI', 72)), help='figure dpi (default 72, or $DOCS_DPI)')
    p.add_argument('--keep-going', action='store_true', help='run the other notebooks after one fails (still exits 1)')
    p.add_argument('--no-clean', action='store_true', help='skip nbdev_clean afterwards')
    p.add_argument(CHILD_FLAG, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run_one: return run_one(Path(a.run_one), a.dpi)

    from tqdm.auto import tqdm
    os.chdir(ROOT)
    for k, v in RUN_ENV.items(): os.environ.setdefault(k, v)
    os.environ.setdefault('MLFLOW_TRACKING_URI', f"sqlite:///{tempfile.mkdtemp(prefix='docs-nbs-')}/mlflow.db")  # never the project's store
    files = notebooks(a.only)
    times, failed, written = {}, [], []
    t_all = time.perf_counter()
    bar = tqdm(files, desc='notebooks', unit='nb', file=sys.stderr)
    for f in bar:
        bar.set_postfix_str(f.name)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, __file__, CHILD_FLAG, str(f), '--dpi', str(a.dpi)], cwd=ROOT)
        times[f.name] = time.perf_counter() - t0
        tqdm.write(f"{f.name}: {times[f.name]:.1f} s{'' if rc == 0 else '  FAILED'}", file=sys.stderr)
        if rc == 0: written.append(f)
        else:
            failed.append(f.name)
            if not a.keep_going: break
    bar.close()
    if written and not a.no_clean: _clean(written)
    if any(f.name == 'index.ipynb' for f in written):  # the README is index.ipynb, outputs included
        subprocess.check_call([sys.executable, str(ROOT / 'scripts' / 'make_readme.py')], cwd=ROOT)
    print(f"\n{'notebook':<32} seconds")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1]): print(f"{name:<32} {t:7.1f}")
    print(f"{'total':<32} {time.perf_counter() - t_all:7.1f}")
    size = sum(q.stat().st_size for q in (ROOT / 'nbs').rglob('*.ipynb'))
    print(f"nbs/*.ipynb: {size / 1e6:.2f} MB")
    if failed:
        print(f"FAILED: {', '.join(failed)} (its file is unchanged; fix the cell above and run again with --only)", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
