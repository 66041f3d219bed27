"""ib_edge.triton: a bundle as a Triton Inference Server model repository, and a server for it.

    ib-triton export BUNDLE --out REPO [--variant ngc|python] [--instances N] [--max-batch N]
    ib-triton serve REPO [--http-port N] [--grpc-port N] [--metrics-port N] [--env DIR]

``spec`` describes the four models as data and renders config.pbtxt, ``repository`` writes the
repository from the manifest, ``models`` holds the Python-backend models Triton runs, ``server``
prepares the Python environment the backend's stub needs and runs PyTriton's ``tritonserver``,
``client`` (run in that environment: tritonclient lives there) parses configs and sends queries.
``models`` imports only ``ib_edge.runtime`` (it runs inside Triton's stub, in an environment
without the export tools). The folder is ``triton_deploy/``: a top-level ``triton/`` would be
found as OpenAI's ``triton`` from the repository root (torch then breaks transformers' imports).
"""
