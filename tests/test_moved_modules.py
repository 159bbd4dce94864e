"""Notebooks written before the package had layers import qlora_magic.data, .training, .panel, ...: those
paths still work, and find what moved to another module too."""

import importlib
import subprocess
import sys
import warnings

import pytest

from qlora_magic import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_module_path_imports(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(f"qlora_magic.{old}")
    assert dir(module)  # it finds the names of the modules that hold them now


def test_old_spellings_used_by_the_course_still_import():
    code = """
import warnings
warnings.simplefilter("error", DeprecationWarning)
import qlora_magic
try:
    import qlora_magic.data
except DeprecationWarning as warning:
    assert "qlora_magic.engine.data" in str(warning), warning
else:
    raise AssertionError("no DeprecationWarning")
warnings.simplefilter("ignore", DeprecationWarning)
from qlora_magic.data import ExampleTokenizer, show_masking, make_collator
from qlora_magic.training import StopFlag, run_training, choose_settings
from qlora_magic.reporters import Reporter, NullReporter, HtmlReporter, WidgetReporter, choose_reporter
from qlora_magic.panel import Panel, WidgetReporter
from qlora_magic.loading import resolve_model, saved_run, adapter_base, RUN_FILE
from qlora_magic.speed import parse_memory, plan_batches
from qlora_magic.adapters import parse_weights, using
from qlora_magic.default_model import default_model_path
from qlora_magic.adaptive import short_name, choose_layers_8bit
from qlora_magic.quiet import quiet_bnb_warnings
from qlora_magic.magics import QloraMagics
from qlora_magic import config, parsing
assert callable(qlora_magic.panel) and qlora_magic.panel.__name__ == "panel"  # the verb, not the module
assert StopFlag is qlora_magic.api.StopFlag
try:
    qlora_magic.data.no_such_name
except AttributeError as error:
    assert "engine.data" in str(error), error  # the message says where things went
try:
    from qlora_magic.data import no_such_name
except ImportError:
    pass
else:
    raise AssertionError("a missing name imported")
import sys
assert "torch" not in sys.modules  # the aliases are as lazy as the modules they point at
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
