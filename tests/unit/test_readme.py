"""The README's Python API example runs as written and learns."""
import os
import re

from tests.helpers import ROOT


def test_readme_python_example_trains(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    example = re.search(r'```python\n(.*?)```', text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, 'README.md', 'exec'), namespace)
    test = namespace['result']['test']
    assert (tmp_path / 'runs' / 'api' / 'result.json').exists()
    for i in range(3):
        assert test[f'head{i}/accuracy'] > 0.8, test


def test_the_docs_state_cupy_13s_numpy_range_as_cupy_documents_it():
    # CuPy 13.6 documents NumPy 2.0 to 2.3 as tested; the docs once said it required numpy<2.
    texts = {}
    for name in ['README.md'] + [os.path.join('docs', f) for f in os.listdir(
            os.path.join(ROOT, 'docs'))] + [os.path.join('docker', 'README.md')]:
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            texts[name] = ' '.join(f.read().split())
    wrong = [name for name, text in texts.items()
             if re.search(r'CuPy 13[^.|]*(requires|needs) numpy ?(<|older than) ?2', text, re.I)]
    assert not wrong, wrong
    assert 'CuPy 13.6 does not hold numpy back (its documentation lists NumPy 2.0 to 2.3 as ' \
           'tested' in texts[os.path.join('docs', 'compat.md')]
