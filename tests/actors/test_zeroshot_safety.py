"""A zero-shot task file runs no code: no ``!function``, templates in a sandbox (actors/zeroshot.py)."""

from __future__ import annotations

import types

import pytest
from jinja2 import BaseLoader, Environment, StrictUndefined
from jinja2.exceptions import SecurityError

from actors.zeroshot import refuse_code, sandboxed_templates

PLAIN = "task: tiny\ndataset_path: json\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"


def test_a_plain_task_file_passes(tmp_path):
    (tmp_path / "task.yaml").write_text(PLAIN)
    refuse_code(tmp_path / "task.yaml")


def test_a_function_tag_is_refused(tmp_path):
    (tmp_path / "evil.py").write_text("import os\ndef f(doc):\n    os.system('touch pwned')\n")
    (tmp_path / "task.yaml").write_text(PLAIN + "process_docs: !function evil.f\n")
    with pytest.raises(ValueError, match="names Python code.*runs no code from task files"):
        refuse_code(tmp_path / "task.yaml")
    assert not (tmp_path / "pwned").exists()


def test_a_function_tag_in_an_included_file_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("process_docs: !function evil.f\n")
    (tmp_path / "task.yaml").write_text("include: base.yaml\n" + PLAIN)
    with pytest.raises(ValueError, match="base.yaml names Python code"):
        refuse_code(tmp_path / "task.yaml")


def test_templates_render_in_a_sandbox_and_the_environment_comes_back():
    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["shout"] = str.upper
    utils = types.SimpleNamespace(env=env)
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    assert "class" in utils.env.from_string(escape).render()  # what an open Jinja environment allows
    with sandboxed_templates(utils):
        assert utils.env.from_string("{{ q | shout }}\n").render(q="why") == "WHY\n"  # filters and settings kept
        with pytest.raises(SecurityError):
            utils.env.from_string(escape).render()
    assert utils.env is env
