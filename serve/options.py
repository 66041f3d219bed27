"""ib-serve's options: one frozen dataclass, the one source of defaults (the CLI is built from it)."""
from __future__ import annotations

import dataclasses
import ipaddress


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    bundle: str | None = None          # None: where ib-export writes without --out
    host: str = "127.0.0.1"            # loopback unless the operator says otherwise
    port: int = 8000                   # 0: any free port (printed at start)
    api_key: str | None = None         # when set, every /v1 request needs "Authorization: Bearer KEY"
    model_name: str | None = None      # None: the bundle's source model (manifest source.model)
    max_queue: int = 32                # requests in flight (waiting + generating); beyond: 429
    max_batch: int = 8                 # images per vision / Q-Former call (lowered to a TensorRT profile)
    cache_mb: float = 256.0            # image_embeds LRU cache; 0 turns it off
    allow_files: str | None = None     # file:// image URLs only below this directory; None: off
    max_body_mb: float = 20.0          # request body limit (413 beyond)
    max_tokens: int = 32               # when a request gives neither max_tokens nor max_completion_tokens
    threads: int | None = None         # CPU threads for ONNX Runtime and torch
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers, as ib-run --providers
    llm_engine: str | None = None      # ort | torch, as ib-run --llm-engine
    verify: bool = True                # sha256 of every bundle file before serving

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
