"""The serving entry behind `python -m dist.launch serve`.

Prefill/decode disaggregation and the OpenAI-compatible HTTP server arrive
with the serving issue; until then `serve` stops with a clear message.
"""


def serve(cfg) -> None:
    raise ValueError("serve is not available in this version yet: prefill/decode disaggregation and the "
                     "HTTP API land with the serving issue (see README, Roadmap)")
