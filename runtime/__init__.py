"""ib_edge.runtime: run a deploy bundle. Never imports export/, quant/ or bench/."""
from .embed_cache import EmbedCache
from .errors import BundleError, IbEdgeError, InputError
from .manifest import Manifest
from .pipeline import Pipeline, Result, default_bundle_dir

__all__ = ["Pipeline", "Result", "EmbedCache", "Manifest", "default_bundle_dir", "IbEdgeError", "InputError", "BundleError"]
