"""Shared fixtures: offline reference checkpoints (llama, opt, t5) and their fp32 bundles,
built once per test session into a temporary directory."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the LLM kernel by the documented rule, not measured per machine (tests/test_kernel_choice.py
# unsets it), so that every test sees the same engine on every CPU
os.environ.setdefault("IB_EDGE_LLM_KERNEL", "rule")
# int8 bundles keep every stage int8 (tests of --int8-stages faster/auto unset it and stub the
# timing): the int8 accuracy tests must test int8 graphs whatever the CPU times
os.environ.setdefault("IB_EDGE_INT8_STAGES", "all")

FAMILIES = ("llama", "opt", "t5")


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    from ib_edge.export.reference_models import save_reference

    root = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_reference(family, root / family, seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, reference_dir):
    from ib_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = export_bundle(str(reference_dir(family)), root / family, quiet=True)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def rtn_bundle(reference_dir, tmp_path_factory):
    """The reference Llama with its LLM in int4 (RTN, group 32): the fast-runtime bundle."""
    from ib_edge.export.bundle import export_bundle

    return export_bundle(str(reference_dir("llama")), tmp_path_factory.mktemp("rtn") / "b", llm_quant="rtn",
                         group_size=32, quiet=True)


@pytest.fixture(scope="session")
def torch_model():
    cache = {}

    def get(path):
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        key = str(path)
        if key not in cache:
            model = InstructBlipForConditionalGeneration.from_pretrained(key, use_safetensors=True).eval()
            cache[key] = (model, InstructBlipProcessor.from_pretrained(key))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def quant_bundle_dir(tmp_path_factory, reference_dir):
    """(family, precision) -> bundle exported at that precision with the default calibration set."""
    from ib_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("qbundles")
    cache = {}

    def get(family: str, precision: str):
        key = (family, precision)
        if key not in cache:
            cache[key] = export_bundle(str(reference_dir(family)), root / f"{family}-{precision}",
                                       precision=precision, quiet=True)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def heldout_images():
    """Images never calibrated on: scikit-image photos outside the calibration set, plus
    proof-task scenes from a fresh random stream."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from ib_edge.bench import proof_task
    from ib_edge.quant.calibration import CALIB_PHOTOS, HELDOUT_PHOTOS

    assert not set(HELDOUT_PHOTOS) & set(CALIB_PHOTOS)
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in HELDOUT_PHOTOS]
    seed = int.from_bytes(os.urandom(4), "little")
    scenes = [proof_task.render_scene(np.random.default_rng([0x68656C64, seed, i]))[0] for i in range(4)]
    return photos, scenes


# (name, precision, llm_quant) -> bundle of a shipped proof model; here, not in one test file, so
# test_proof_models and test_serve share one proof-llama export per session.
@pytest.fixture(scope="session")
def proof_bundle(tmp_path_factory):
    from ib_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("proof")
    cache = {}

    def get(name, precision="fp32", llm_quant=None):
        key = (name, precision, llm_quant)
        if key not in cache:
            cache[key] = export_bundle(name, root / "-".join(map(str, key)), precision=precision,
                                       llm_quant=llm_quant, quiet=True)
        return cache[key]

    return get
