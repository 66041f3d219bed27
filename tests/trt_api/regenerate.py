"""Regenerate tests/trt_api/tensorrt-<version>.json: the Python API of real TensorRT releases.

    python tests/trt_api/regenerate.py            # both versions below; needs pip, gcc, strings

For each version it downloads the ``tensorrt-cu12-bindings`` wheel from the package index
(``pip download --no-deps``), extracts the compiled module ``tensorrt_bindings/tensorrt.so``
and lists its API two ways:

* by import: the module is loaded against stand-in ``libnvinfer``/``libnvonnxparser``/
  ``libnvinfer_plugin`` libraries that define only the nine C entry points it links to (all
  returning NULL, so nothing can be built or run), then every class's ``dir()``, every enum's
  ``__members__`` and every method's pybind11 signature (parameter names, return type) is read;
* by ``strings`` on the .so: every name found by import must appear among its symbol strings,
  else the script fails (the two readings must agree).

The JSON keeps the classes and enums the engine builder and runner can reach (``CLASSES``);
``tests/test_tensorrt.py`` builds a stand-in module per version from it and fails when
``export/tensorrt.py`` or ``runtime/tensorrt_stage.py`` touch a name that version lacks.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSIONS = ("10.3.0", "11.4.0.106")
HERE = Path(__file__).resolve().parent
# What a builder or runner of ONNX graphs can reach from the module: the factories, the objects
# they return, and the enums their calls take.
CLASSES = ("Logger", "ILogger", "Builder", "INetworkDefinition", "ITensor", "OnnxParser", "ParserError",
           "IBuilderConfig", "IOptimizationProfile", "ITimingCache", "IHostMemory", "Runtime", "ICudaEngine",
           "IExecutionContext", "Dims", "ErrorCode", "ErrorCodeTRT")
ENUMS = ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "TensorIOMode", "DataType",
         "OnnxParserFlag", "ProfilingVerbosity", "PreviewFeature", "TacticSource", "EngineCapability",
         "HardwareCompatibilityLevel", "TensorLocation", "DeviceType")

STUB_C = """
#include <stddef.h>
void *createInferBuilder_INTERNAL(void *l, int v) { return NULL; }
void *createInferRefitter_INTERNAL(void *e, void *l, int v) { return NULL; }
void *createInferRuntime_INTERNAL(void *l, int v) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *r, void *l, int v) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *n, void *l, int v) { return NULL; }
void *getBuilderPluginRegistry(int c) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void *l, const char *n) { return 0; }
"""

# Run inside a subprocess whose LD_LIBRARY_PATH holds the stand-in libraries.
INTROSPECT = r'''
import inspect, json, re, sys
sys.path.insert(0, sys.argv[1])
import tensorrt as t
classes, enums = sys.argv[2].split(","), sys.argv[3].split(",")

def signatures(fn):
    """Every pybind11 signature of ``fn`` (overloads listed as "1. name(...) -> T")."""
    out = []
    for line in (getattr(fn, "__doc__", None) or "").splitlines():
        m = re.match(r"(?:\d+\.\s+)?\w+\((.*)\)\s*->\s*(\S+)\s*$", line.strip())
        if not m or m.group(1) == "*args, **kwargs":
            continue
        params = [p.split(":")[0].split("=")[0].strip() for p in re.split(r",\s*(?![^\[]*\])", m.group(1)) if p.strip()]
        out.append({"params": [p for p in params if p not in ("self", "*", "/")], "returns": m.group(2)})
    return out

out = {"module": sorted(n for n in dir(t) if not n.startswith("_")), "classes": {}, "enums": {}}
for name in classes:
    cls = getattr(t, name, None)
    if cls is None:
        continue
    members = {}
    for attr in sorted(a for a in dir(cls) if not a.startswith("_") or a == "__init__"):
        raw = inspect.getattr_static(cls, attr, None)
        kind = "property" if isinstance(raw, property) else "method" if callable(getattr(cls, attr)) else "value"
        rec = {"kind": kind}
        if kind == "method" and attr != "__init__":
            sigs = signatures(getattr(cls, attr))
            if sigs:
                rec["signatures"] = sigs
        members[attr] = rec
    out["classes"][name] = members
for name in enums:
    e = getattr(t, name, None)
    if e is not None:
        out["enums"][name] = {k: int(v) for k, v in e.__members__.items()}
print(json.dumps(out))
'''


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def extract(version: str, work: Path) -> dict:
    major = version.split(".")[0]
    wheel_dir = work / version
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir),
          f"tensorrt-cu12-bindings=={version}"])
    wheel, = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(wheel_dir / "x")
    so = wheel_dir / "x" / "tensorrt_bindings" / "tensorrt.so"
    libs = wheel_dir / "libs"
    libs.mkdir()
    (libs / "stub.c").write_text(STUB_C)
    for lib in ("nvinfer", "nvonnxparser", "nvinfer_plugin"):
        _run(["gcc", "-shared", "-fPIC", "-o", str(libs / f"lib{lib}.so.{major}"),
              f"-Wl,-soname,lib{lib}.so.{major}", str(libs / "stub.c")])
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs))
    api = json.loads(_run([sys.executable, "-c", INTROSPECT, str(so.parent), ",".join(CLASSES), ",".join(ENUMS)],
                          env=env, cwd=str(work)))
    # The linker merges a string into a longer one it ends ("INT8" into "UINT8"): a name is found
    # when some string equals it or ends with it.
    strings = "\n" + _run(["strings", "-n", "2", str(so)])
    names = set(api["module"]) | {m for c in api["classes"].values() for m in c} | \
        {m for e in api["enums"].values() for m in e}
    absent = sorted(n for n in names if f"{n}\n" not in strings and n != "__init__")
    if absent:
        raise SystemExit(f"{version}: names found by import but not among the .so's strings: {absent}")
    return {"tensorrt_version": version, "source": f"tensorrt-cu12-bindings=={version} ({wheel.name})",
            "regenerate": "python tests/trt_api/regenerate.py", **api}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        for version in VERSIONS:
            api = extract(version, Path(tmp))
            path = HERE / f"tensorrt-{version}.json"
            path.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
            print(f"{path.name}: {len(api['module'])} module names, {len(api['classes'])} classes, "
                  f"{len(api['enums'])} enums")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
