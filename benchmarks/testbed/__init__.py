"""Multi-host testbed on one machine: network namespaces joined by tc-shaped links.

See testbed.py for the topology; `python -m benchmarks.testbed --help` for the CLI.
"""

from .testbed import (
    DEFAULT_PREFIX,
    HostResult,
    Testbed,
    TestbedError,
    check_prerequisites,
    list_namespaces,
    parse_rate,
    teardown,
)

__all__ = [
    "DEFAULT_PREFIX",
    "HostResult",
    "Testbed",
    "TestbedError",
    "check_prerequisites",
    "list_namespaces",
    "parse_rate",
    "teardown",
]
