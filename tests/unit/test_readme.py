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
