"""Stage runners for the exported graphs. The runtime chains them by the manifest's names."""
from __future__ import annotations

import numpy as np

from .errors import BundleError
from .manifest import REBUILD, Manifest

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxStage:
    """One ONNX graph in ONNX Runtime. Inputs and outputs are named as in the manifest."""

    def __init__(self, manifest: Manifest, name: str, providers=None, threads: int | None = None):
        import onnxruntime as ort

        self.name = name
        art = manifest.artifact(name)
        if art.get("backend", "onnxruntime") != "onnxruntime":
            raise BundleError(f"artifact '{name}' is for backend {art.get('backend')!r}, not onnxruntime")
        path = manifest.path(art["file"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = list(providers or DEFAULT_PROVIDERS)
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BundleError(f"ONNX Runtime here lacks {', '.join(missing)} (available: "
                              f"{', '.join(ort.get_available_providers())})",
                              hint="install onnxruntime-gpu for CUDA/TensorRT providers")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise BundleError(f"cannot load {art['file']}: {str(e).splitlines()[0]}", hint=REBUILD) from None
        self.input_names = [t["name"] for t in art["inputs"]]
        self.output_names = [t["name"] for t in art["outputs"]]
        got = [i.name for i in self.session.get_inputs()]
        if got != self.input_names:
            raise BundleError(f"{art['file']} has inputs {got}, manifest says {self.input_names}", hint=REBUILD)
        self.providers = self.session.get_providers()

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))
