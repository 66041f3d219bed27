"""Known chatter of the libraries the runtime imports lazily (torch, torchao, bitsandbytes),
silenced where it starts, so a Python API user or ``ib-bench`` sees answers, not import noise;
``IB_EDGE_DEBUG=1`` keeps all of it.

Targeted, not global: only these loggers and warning messages (measured on this project's
venv, issue 15 item 7): torchao's "Failed to load .../_C_mxfp8...so" (logger ``torchao``, once
per missing CUDA extension), torch's pytree "Enum subclass ... register_constant()" (logger
``torch.utils._pytree``, from torchao's enums), ``torch.distributed.reduce_op`` deprecation
(FutureWarning), bitsandbytes' "please pip install kernels" (logger ``bitsandbytes...``).
Errors from those loggers still show.
"""
from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")
NOISY_WARNINGS = (r".*torch\.distributed\.reduce_op.* is deprecated",)


def quiet_libraries() -> None:
    if os.environ.get("IB_EDGE_DEBUG"):
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
