"""The model stack's imports: what loading a model needs, imported once, and nothing else.

Importing `infinity_emb` imports everything it can serve (its server, audio and vision models, every
backend) and, through sentence-transformers and transformers, scikit-learn and SciPy (for evaluators
and assisted generation that serving never runs): 5-6 s of a 7-9 s cold start on 2 cores. Here the
stack is imported narrowly and faster, four ways, each scoped to the start-up imports:

- **Deferred package `__init__`s** (`infinity_emb`, `infinity_emb.inference`): the package module
  exists with its real `__path__`, so its submodules import on their own (the model classes this
  project uses, `EngineArgs`), and its `__init__.py` runs, in place, the first time a name that file
  defines is read (`from infinity_emb import AsyncEmbeddingEngine` still works, and then costs what
  it always did).
- **Deferred optional packages** (scikit-learn, SciPy): while the stack is imported, a module of
  transformers or sentence-transformers that imports them at module level (`from sklearn.metrics
  import roc_curve`) gets a placeholder whose names import the real function when first called. The
  packages stay visible as installed (`find_spec` finds them), and any other importer, or any import
  after the start-up imports, gets the real package.
- **No garbage collection while the stack imports**: the imports create about a million objects
  and nearly no garbage, yet the cyclic collector ran 6 full collections over them (0.7-1.0 s of
  the 3-4 s on 2 cores, 281 objects found). It is off while they run; what they created is then
  frozen (`gc.freeze`: never scanned again, so no collection while serving walks torch's module
  graph either) and collection resumes.
- **transformers' index of its models, remembered**: `import transformers` reads every file of its
  ~400 model folders to learn which names each defines (`define_import_structure`), twice (the
  package and `transformers.models`), 0.5 s of every start on 2 cores. The index is kept in a file
  beside this module's bytecode (INDEX_FILE, built with the image as the bytecode is) and read back
  when transformers' version, the folder scanned and its modification time are the same.

`python -X importtime` before/after and the test that keeps these modules off the start-up path:
docs/performance.md (Cold start), tests/test_startup_imports.py.
"""

from __future__ import annotations

import ast
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Imported at module level by the packages named (evaluators, assisted generation), never used on a
# serving path: deferred while the stack is imported. torch._dynamo and torch.distributed.tensor (with
# SymPy) stay: transformers' modeling_utils needs dynamo at import (flex attention's
# `torch.compiler.disable`), and dynamo imports them (docs/performance.md, Cold start).
DEFERRED_OPTIONAL: dict[str, tuple[str, ...]] = {
    "sklearn": ("transformers", "sentence_transformers"),
    "scipy": ("transformers", "sentence_transformers"),
}
# Packages whose __init__ imports far more than the submodules this project uses.
DEFERRED_PACKAGES = ("infinity_emb", "infinity_emb.inference")
# Never on the start-up path of a text-only configuration (tests/test_startup_imports.py).
HEAVY_MODULES = ("sklearn", "scipy", "torchaudio", "torchvision", "timm", "soundfile", "librosa", "onnxruntime",
                 "optimum.onnxruntime", "infinity_emb.infinity_server", "infinity_emb.transformer.vision",
                 "infinity_emb.transformer.audio", "infinity_emb.inference.batch_handler")

_lock = threading.RLock()  # the stack's import, once
_init_lock = threading.RLock()  # a deferred __init__, once
_imported_in: float | None = None


# ---- deferred package __init__ ----


def _names_bound_by(path: str) -> frozenset[str] | None:
    """Top-level names a module file binds; None when it binds names it cannot be read for (star imports)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return frozenset(names)


class DeferredPackage(types.ModuleType):
    """A package whose `__init__.py` runs in place the first time a name it defines is read."""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            names = _DEFERRED_NAMES.get(types.ModuleType.__getattribute__(self, "__name__"))
            if names is None or name in names:
                run_deferred_init(self)
        return types.ModuleType.__getattribute__(self, name)


_DEFERRED_NAMES: dict[str, frozenset[str] | None] = {}


def run_deferred_init(module: types.ModuleType) -> None:
    """Run a deferred package's `__init__.py` (once); the module becomes an ordinary module."""
    with _init_lock:
        if type(module) is not DeferredPackage:
            return
        module.__class__ = types.ModuleType
        spec = module.__spec__
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            module.__class__ = DeferredPackage
            raise


def defer_package_init(name: str) -> types.ModuleType:
    """Put `name` in sys.modules with its real path but without running its `__init__.py` (yet)."""
    with _lock:
        if name in sys.modules:
            return sys.modules[name]
        parent, _, child = name.rpartition(".")
        parent_module = defer_package_init(parent) if parent else None
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None or spec.loader is None:
            raise ModuleNotFoundError(f"{name} is not an installed package", name=name)
        module = importlib.util.module_from_spec(spec)
        _DEFERRED_NAMES[name] = _names_bound_by(spec.origin) if spec.origin else None
        module.__class__ = DeferredPackage
        sys.modules[name] = module
        if parent_module is not None:
            setattr(parent_module, child, module)
        return module


# ---- deferred optional modules ----


class DeferredName:
    """A name imported from a deferred module: the real object is imported when it is first used
    (called, an attribute read, subclassed). `isinstance(x, name)` is False without importing anything
    while the real module is not imported: no instance of its classes can exist yet."""

    __slots__ = ("_module", "_name", "_real")

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name, self._real = module, name, None

    def resolve(self) -> Any:
        if self._real is None:
            module = _import_real(self._module)
            try:
                self._real = getattr(module, self._name)
            except AttributeError:  # `from sklearn import metrics`: a submodule its __init__ does not import
                self._real = _import_real(f"{self._module}.{self._name}")
        return self._real

    def _not_imported(self) -> bool:
        return self._real is None and not _really_imported(self._module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolve(), name)

    def __instancecheck__(self, obj: Any) -> bool:
        return False if self._not_imported() else isinstance(obj, self.resolve())

    def __subclasscheck__(self, cls: type) -> bool:
        return False if self._not_imported() else issubclass(cls, self.resolve())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.resolve(),)

    def __or__(self, other: Any) -> Any:  # `name | None` in an annotation evaluated at import
        return self.resolve() | other

    def __ror__(self, other: Any) -> Any:
        return other | self.resolve()

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"


class _Placeholder(types.ModuleType):
    """Stands for a deferred module while the stack is imported; its names are DeferredNames."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = DeferredName(self.__name__, name)
        setattr(self, name, value)
        return value


class _PlaceholderLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Placeholder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _really_imported(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Placeholder)


_MISSING = object()


class DeferringFinder(importlib.abc.MetaPathFinder):
    """Answers imports of the `deferred` modules (and their submodules) made by the packages named for
    each with placeholders; every other import is left to the import system."""

    def __init__(self, deferred: dict[str, tuple[str, ...]] = DEFERRED_OPTIONAL) -> None:
        self.deferred = deferred
        self.placeholders: dict[str, Any] = {}  # name -> what its parent package had under it before
        self._bypass = threading.local()

    def _importers_of(self, fullname: str) -> tuple[str, ...]:
        for name, importers in self.deferred.items():
            if fullname == name or fullname.startswith(name + "."):
                return importers
        return ()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if getattr(self._bypass, "on", False):
            return None
        importers = self._importers_of(fullname)
        if not importers or not _is_or_under(_importer(), importers):
            return None
        with self.bypassed():
            real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None:
            return None  # not installed: the import fails as it would have
        is_package = real.submodule_search_locations is not None
        spec = importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader(), origin=real.origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(real.submodule_search_locations)
        parent, _, child = fullname.rpartition(".")
        parent_module = sys.modules.get(parent) if parent else None
        self.placeholders[fullname] = parent_module.__dict__.get(child, _MISSING) if parent_module is not None else _MISSING
        return spec

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        before = getattr(self._bypass, "on", False)
        self._bypass.on = True
        try:
            yield
        finally:
            self._bypass.on = before

    def remove_placeholders(self, under: str | None = None) -> None:
        """Take the placeholders out of sys.modules and their parents: the next import is the real one."""
        for name, previous in list(self.placeholders.items()):
            if under is not None and not _is_or_under(name, (under,)):
                continue
            module = sys.modules.get(name)
            if isinstance(module, _Placeholder):
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                parent_module = sys.modules.get(parent) if parent else None
                if parent_module is not None and parent_module.__dict__.get(child) is module:
                    if previous is _MISSING:
                        delattr(parent_module, child)
                    else:
                        setattr(parent_module, child, previous)
            del self.placeholders[name]


_active_finder: DeferringFinder | None = None


def _import_real(module: str) -> types.ModuleType:
    finder = _active_finder
    if finder is None or _really_imported(module):
        return importlib.import_module(module)
    with _init_lock, finder.bypassed():
        for name in finder.deferred:
            if _is_or_under(module, (name,)):
                finder.remove_placeholders(name)
        return importlib.import_module(module)


def _is_or_under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _importer() -> str:
    """The module whose code is importing (the first frame outside the import machinery)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (frame.f_code.co_filename.startswith("<frozen importlib") or name == __name__
                or name.startswith("importlib")):
            return name
        frame = frame.f_back
    return ""


@contextmanager
def deferring_optional(deferred: dict[str, tuple[str, ...]] = DEFERRED_OPTIONAL) -> Iterator[DeferringFinder]:
    """Placeholders for the `deferred` modules imported by the packages named for each, within the block."""
    global _active_finder
    finder = DeferringFinder(deferred)
    sys.meta_path.insert(0, finder)
    _active_finder = finder
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        _active_finder = None
        finder.remove_placeholders()


# ---- transformers' index of its models, remembered ----

INDEX_FILE = Path(__file__).resolve().parent / "__pycache__" / "transformers-index.json"
_INDEXED_MODULE = "transformers.utils.import_utils"
Index = dict[frozenset[str], dict[str, set[str]]]


def _index_key(module_path: Any, prefix: str | None) -> str | None:
    """What an index depends on: transformers' version, the path scanned and its folder's mtime."""
    try:
        folder = os.path.dirname(module_path) if os.path.isfile(module_path) else os.fspath(module_path)
        mtime = os.stat(folder).st_mtime_ns
    except (OSError, TypeError):
        return None
    version = getattr(sys.modules.get("transformers"), "__version__", "?")
    return f"{version}|{os.fspath(module_path)}|{prefix}|{mtime}"


def _read_indexes() -> dict[str, Any]:
    try:
        with open(INDEX_FILE, encoding="utf-8") as f:
            stored = json.load(f)
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}


def _decode(stored: Any) -> Index:
    return {frozenset(keys): {module: set(names) for module, names in modules.items()} for keys, modules in stored}


def _encode(index: Index) -> list[Any]:
    return [[sorted(keys), {module: sorted(names) for module, names in modules.items()}]
            for keys, modules in index.items()]


def remembering_index(scan: Callable[..., Index]) -> Callable[..., Index]:
    """`define_import_structure` answered from INDEX_FILE when it holds this scan, else scanned and
    written there (a folder that cannot be written only costs the scan, as before)."""
    stored = _read_indexes()

    def define_import_structure(module_path: Any, prefix: str | None = None) -> Index:
        key = _index_key(module_path, prefix)
        if key is not None and key in stored:
            try:
                return _decode(stored[key])
            except (TypeError, ValueError, AttributeError):
                pass
        index = scan(module_path, prefix)
        if key is not None:
            try:
                encoded = _encode(index)
                if _decode(encoded) == index:  # a shape this file cannot hold is never stored
                    stored[key] = encoded
                    INDEX_FILE.parent.mkdir(parents=True, exist_ok=True)
                    temporary = INDEX_FILE.with_name(f"{INDEX_FILE.name}.{os.getpid()}")
                    try:
                        temporary.write_text(json.dumps(stored), encoding="utf-8")
                        os.replace(temporary, INDEX_FILE)
                    finally:
                        temporary.unlink(missing_ok=True)
            except (OSError, TypeError, ValueError, AttributeError):
                pass
        return index

    define_import_structure.__wrapped__ = scan  # type: ignore[attr-defined]
    return define_import_structure


class IndexFinder(importlib.abc.MetaPathFinder):
    """When transformers' import_utils is first imported, its `define_import_structure` becomes
    `remembering_index`'s (before transformers' own modules bind the name)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _INDEXED_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            scan = getattr(module, "define_import_structure", None)
            if callable(scan):
                module.define_import_structure = remembering_index(scan)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextmanager
def remembered_index() -> Iterator[None]:
    finder = IndexFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


# ---- the stack ----


@contextmanager
def without_collection() -> Iterator[None]:
    """The cyclic garbage collector off within the block; what the block created is frozen after it
    (never scanned again: module objects live as long as the process)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()



def import_model_stack() -> float:
    """Import what loading a text model needs (torch, transformers, sentence-transformers and the
    infinity modules of its replicas), narrowly; seconds it took, 0.0 when done before. Thread-safe."""
    global _imported_in
    with _lock:
        if _imported_in is not None:
            return 0.0
        started = time.perf_counter()
        # Infinity replaces the root logger's handlers with a rich console handler when its log module
        # is imported; every access-log line then went through rich, measured at 43 % of the request
        # thread's time at 32 clients (79 -> 96 texts/s once restored). Its own loggers keep working.
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            with without_collection(), remembered_index(), deferring_optional():
                for package in DEFERRED_PACKAGES:
                    defer_package_init(package)
                importlib.import_module("infinity_emb.args")
                importlib.import_module("infinity_emb.inference.loading_strategy")
                importlib.import_module("infinity_emb.transformer.embedder.sentence_transformer")
                importlib.import_module("infinity_emb.transformer.crossencoder.torch")
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        _imported_in = time.perf_counter() - started
        return _imported_in


def stack_import_seconds() -> float:
    """How long the model stack's imports took in this process (0.0 before they ran)."""
    return _imported_in or 0.0


# Infinity's replica class per kind and backend (its `inference.select_model` table, which imports every
# class it knows): "module:Class" under infinity_emb.transformer, imported when a model needs it.
_INFINITY_REPLICAS = {
    ("embed", "torch"): "embedder.sentence_transformer:SentenceTransformerPatched",
    ("embed", "ctranslate2"): "embedder.ct2:CT2SentenceTransformer",
    ("embed", "optimum"): "embedder.optimum:OptimumEmbedder",
    ("rerank", "torch"): "crossencoder.torch:CrossEncoderPatched",
    ("rerank", "optimum"): "crossencoder.optimum:OptimumCrossEncoder",
    ("classify", "torch"): "classifier.torch:SentenceClassifier",
    ("classify", "optimum"): "classifier.optimum:OptimumClassifier",
    ("image", "torch"): "vision.torch_vision:TIMM",
    ("audio", "torch"): "audio.torch:TorchAudioModel",
}


def infinity_replica_class(role: str, backend: str) -> type:
    """Infinity's class for a role (embed, rerank, classify, image, audio) on a backend."""
    try:
        where = _INFINITY_REPLICAS[(role, backend)]
    except KeyError:
        raise ValueError(f"infinity has no {role} model for the {backend} backend") from None
    module, _, cls = where.partition(":")
    import_model_stack()
    return getattr(importlib.import_module(f"infinity_emb.transformer.{module}"), cls)
