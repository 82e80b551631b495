"""The README's FastDPLPrompt code block runs as written (on the built-in tiny CLIP)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_runs(tmp_path, monkeypatch):
    text = README.read_text()
    marker = text.index("<!-- this block is run by tests/test_readme.py -->")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    dpl, subnet = namespace["dpl"], namespace["subnet"]
    assert (tmp_path / "config.json").is_file()
    assert subnet.config == dpl.derive_config()
    # Three alternating steps moved alpha away from its 1e-3-scale initialisation.
    assert max(a.abs().max().item() for a in dpl.arch_logits.values()) > 5e-3
    assert subnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_readme_op_examples_run():
    """Both code blocks of the README's op section (CLIP shapes; a language-model layer with
    grouped-query heads and a padded row) run as written and give finite outputs."""
    text = README.read_text()
    section = text[text.index("## The op"):text.index("## FastDPLPrompt")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
        out = namespace["out"]
        assert out.shape == namespace["q"].shape and torch.isfinite(out).all()
