"""The module paths from before the package had layers (qlora_magic.data, qlora_magic.training, ...) keep
working: tutorials and notebooks import them. Each old name is an alias module that finds its attributes in
the modules that now hold them; importing one warns (DeprecationWarning) with the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> the modules (in search order) that now hold what it held
MOVED = {
    "adapters": ("engine.adapters", "front.parsing"),
    "adaptive": ("engine.adaptive",),
    "bnb_cpu": ("engine.bnb_cpu",),
    "chart": ("display.chart",),
    "classification": ("engine.classification",),
    "comparison": ("tasks.comparison",),
    "data": ("engine.data",),
    "default_model": ("engine.default_model",),
    "evaluation": ("tasks.evaluation",),
    "formatting": ("display.formatting",),
    "generation": ("engine.generation",),
    "loading": ("engine.loading", "engine.adapter_folder"),
    "magics": ("front.magics",),
    "memory_usage": ("engine.memory_usage",),
    "merging": ("tasks.merging",),
    "panel": ("front.panel", "display.widget_reporter"),
    "parsing": ("front.parsing",),
    "prompt_lines": ("front.prompt_lines",),
    "quiet": ("engine.quiet",),
    "reporters": ("display.reporters", "display.widget_reporter", "display"),
    "saving": ("engine.adapter_folder",),
    "speed": ("engine.speed", "config"),
    "training": ("engine.training", "engine.stopping", "engine.speed"),
    "tuning": ("tasks.tuning",),
}


class _Alias(types.ModuleType):
    def __init__(self, name, targets):
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        self._targets = targets

    def _modules(self):
        return [importlib.import_module(target) for target in self._targets]

    def __getattr__(self, attribute):
        for module in self._modules():
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r} (it moved to {', '.join(self._targets)})")

    def __dir__(self):
        return sorted({name for module in self._modules() for name in dir(module)})


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix == self.package and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name.rpartition(".")[2]
        targets = [f"{self.package}.{t}" for t in MOVED[old]]
        warnings.warn(f"{spec.name} moved to {targets[0]}; the old path still works.", DeprecationWarning, stacklevel=3)
        return _Alias(spec.name, targets)

    def exec_module(self, module):
        pass


#: old modules whose name is also a public function of the package (qlora_magic.panel()): registered at
#: once, because importing a submodule the usual way would set the package's attribute to the module.
SHADOWED = ("panel",)


def install(package: str):
    """Let `import <package>.<old name>` find the alias (once per process)."""
    if not any(isinstance(f, _AliasFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(package))
    for old in SHADOWED:
        sys.modules.setdefault(f"{package}.{old}", _Alias(f"{package}.{old}", [f"{package}.{t}" for t in MOVED[old]]))
