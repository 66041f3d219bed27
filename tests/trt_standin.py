"""A stand-in ``tensorrt`` module held to the API of one real TensorRT release.

``strict_module(api, impl)`` wraps a behavioural fake (``impl``: a namespace with Builder,
OnnxParser, Runtime, Logger, ...) so that the code under test can reach only what the real
release has: module names, class members, enum members (with their real values) and keyword
names, read from ``tests/trt_api/tensorrt-<version>.json`` (regenerate with
``python tests/trt_api/regenerate.py``). Objects returned by wrapped methods are wrapped as the
class the real signature returns, so a whole build or run is checked, not only its first call.
A name the release lacks raises ``AttributeError`` naming the release, as the real module would.
"""
from __future__ import annotations

import importlib.machinery
import json
import re
import types
from pathlib import Path

API_DIR = Path(__file__).resolve().parent / "trt_api"
VERSIONS = ("10.3.0", "11.4.0.106")


def load_api(version: str) -> dict:
    path = API_DIR / f"tensorrt-{version}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with: python tests/trt_api/regenerate.py")
    return json.loads(path.read_text())


class Enum(int):
    """An enum member: an int (as pybind11 enums convert) that prints like TensorRT's."""

    def __new__(cls, owner: str, name: str, value: int):
        obj = super().__new__(cls, value)
        obj.owner, obj.member = owner, name
        return obj

    def __repr__(self):
        return f"<{self.owner}.{self.member}: {int(self)}>"

    __str__ = __repr__


class StrictEnum:
    def __init__(self, api: dict, name: str):
        self._version, self._name = api["tensorrt_version"], name
        self._members = {k: Enum(name, k, v) for k, v in api["enums"][name].items()}

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            return self._members[attr]
        except KeyError:
            raise AttributeError(f"TensorRT {self._version}: {self._name} has no member {attr!r}") from None

    @property
    def __members__(self):
        return dict(self._members)


def _returned_class(api: dict, returns: str) -> str | None:
    name = re.split(r"[.:]+", returns)[-1]
    for cand in (name, name[1:] if name.startswith("I") else None):
        if cand and cand in api["classes"]:
            return cand
    return None


class Strict:
    """``obj`` seen through the member list of the real class ``cls``."""

    def __init__(self, obj, cls: str, api: dict):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_api", api)

    def _member(self, name):
        members = self._api["classes"].get(self._cls)
        if members is None:
            raise AssertionError(f"stand-in: no API list for class {self._cls}; add it to CLASSES in "
                                 "tests/trt_api/regenerate.py and regenerate")
        if name not in members:
            raise AttributeError(f"TensorRT {self._api['tensorrt_version']}: {self._cls} has no attribute {name!r}")
        return members[name]

    def __getattr__(self, name):
        info = self._member(name)
        value = getattr(self._obj, name)
        if info["kind"] != "method" or not callable(value):
            return value
        return _checked_call(value, f"{self._cls}.{name}", info, self._api)

    def __setattr__(self, name, value):
        if self._member(name)["kind"] == "method":
            raise AttributeError(f"{self._cls}.{name} is a method")
        setattr(self._obj, name, value)

    def __bool__(self):
        return bool(self._obj)


def _checked_call(fn, qualname: str, info: dict, api: dict):
    sigs = info.get("signatures") or []

    def call(*args, **kwargs):
        if sigs:
            fits = [s for s in sigs if len(args) <= len(s["params"]) and all(k in s["params"] for k in kwargs)]
            if not fits:
                raise TypeError(f"TensorRT {api['tensorrt_version']}: {qualname}() takes "
                                + " or ".join(f"({', '.join(s['params'])})" for s in sigs)
                                + f"; called with {len(args)} positional and keywords {sorted(kwargs)}")
            sigs_used = fits
        else:
            sigs_used = []
        out = fn(*args, **kwargs)
        cls = next((c for c in (_returned_class(api, s["returns"]) for s in sigs_used) if c), None)
        if cls and out is not None and not isinstance(out, (bytes, bytearray, int, float, str, bool, tuple, list)):
            return Strict(out, cls, api)
        return out

    return call


class StrictClass:
    """A class of the module: constructing it gives a Strict instance; class attributes
    (``Logger.WARNING``) are checked against the same member list."""

    def __init__(self, impl_cls, cls: str, api: dict):
        self._impl, self._cls, self._api = impl_cls, cls, api

    def __call__(self, *args, **kwargs):
        self._member("__init__")
        return Strict(self._impl(*args, **kwargs), self._cls, self._api)

    def _member(self, name):
        members = self._api["classes"].get(self._cls, {})
        if name not in members:
            raise AttributeError(f"TensorRT {self._api['tensorrt_version']}: {self._cls} has no attribute {name!r}")
        return members[name]

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        self._member(name)
        return getattr(self._impl, name)


class StrictModule(types.ModuleType):
    def __getattr__(self, name):
        impl, api = self.__dict__["_impl"], self.__dict__["_api"]
        if name.startswith("__") or name not in api["module"]:
            raise AttributeError(f"TensorRT {api['tensorrt_version']}: module tensorrt has no attribute {name!r}")
        if name in api["enums"]:
            return StrictEnum(api, name)
        value = getattr(impl, name)
        if isinstance(value, type) and name in api["classes"]:
            return StrictClass(value, name, api)
        return value


def strict_module(api: dict, impl) -> StrictModule:
    """The stand-in ``tensorrt`` module: ``impl``'s behaviour behind ``api``'s names."""
    mod = StrictModule("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    mod.__version__ = api["tensorrt_version"]
    mod.__dict__["_impl"], mod.__dict__["_api"] = impl, api
    return mod
