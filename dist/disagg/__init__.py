"""Prefill/decode disaggregated serving: paged KV cache, KV transfer, workers, router, HTTP API.

Read top to bottom: roles.py (who does what) -> kvcache.py (pages and the block manager) ->
runner.py (the model over pages) -> sampling.py (tokens, stop rules) -> channel.py (messages and
links) -> transfer.py (KV from prefill to decode) -> worker.py (schedule -> execute -> update) ->
router.py (admission, fan-out) -> api.py (OpenAI-compatible HTTP). dist/serve.py wires them per rank.
"""

from .kvcache import BlockManager, KVLayout, PagedKVCache
from .roles import Roles
from .sampling import SamplingParams, Sequence, sample
from .transfer import KVPoll

__all__ = ["BlockManager", "KVLayout", "PagedKVCache", "Roles", "SamplingParams", "Sequence", "sample", "KVPoll"]
