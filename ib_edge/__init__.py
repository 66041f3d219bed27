"""ib-edge: InstructBLIP on edge GPUs. Subpackages: export, runtime, quant, bench."""
__version__ = "0.1.0"
