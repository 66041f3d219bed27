"""The on-disk LLM formats the runtime reads, by name and version (torch-free: the CLIs and the
export options use these without loading torch).

- ``ib-edge-int4`` (``runtime.int4``): Llama-family checkpoints for the fast runtime (backend
  "fastllm"), every linear group-wise asymmetric int4; written by ``quant.int4``.
- ``ib-edge-weight-only`` (``runtime.lowbit``): any family through transformers (backend
  "transformers"), each linear int4, int8 or fp32; written by ``quant.weight_only``.
- plain ``safetensors``: float checkpoints, either backend.
"""
INT4_FORMAT = "ib-edge-int4"
INT4_FORMAT_VERSION = "1"
WO_FORMAT = "ib-edge-weight-only"
WO_FORMAT_VERSION = "1"
KERNEL_GROUP_SIZES = (32, 64, 128, 256)   # torch's CPU int4 kernel
# the one default for every int4 producer (ib-export --group-size, quant.int4, the decode bench):
# GPTQ/AWQ's usual group, and the group of the README's proof-llama 4-bit figures
DEFAULT_GROUP_SIZE = 128
CPU_ENGINES = ("ort", "torch")                # the fast path's CPU engines (runtime/engines.py)
