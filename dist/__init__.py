"""dist: long-context LLM training and serving across many GPUs.

Entry point: ``torchrun -m dist.launch train|serve``. See README.md.
"""

__version__ = "0.1.0"
