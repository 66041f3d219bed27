"""ib_edge.serve: ib-serve, an OpenAI-compatible HTTP server over a deploy bundle.

Needs the ``serve`` extra (fastapi, uvicorn, pydantic). ``ib_edge.runtime`` never imports it.
"""
