"""Packaging from `settings.ini` (nbdev 2's single source of project metadata)."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']

def _reqs(key): return c.get(key, '').split()

extras = {k[len('extra_'):]: _reqs(k) for k in c if k.startswith('extra_')}
extras['all'] = sorted({r for k, v in extras.items() if k != 'gpu' for r in v})
extras['dev'] = sorted(set(_reqs('dev_requirements')) | set(extras['all']))

readme = Path('README.md')
setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else c['description'], long_description_content_type='text/markdown',
    author=c['author'], author_email=c['author_email'], license='Apache-2.0', url=c['git_url'],
    keywords=c['keywords'].split(), python_requires=f">={c['min_python']}",
    packages=setuptools.find_packages(include=[c['lib_path'], c['lib_path'] + '.*']),
    include_package_data=True, install_requires=_reqs('requirements'), extras_require=extras,
    entry_points={'console_scripts': c['console_scripts'].split(),
                  'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False,
)
