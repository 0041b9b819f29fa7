"""lorakit: turn a base LLM plus task data into a quantized release model you can trust.

The library is plain Python (no orchestrator): ``lorakit.merge``, ``lorakit.models`` and the other
sub-packages are usable on their own; Prefect tasks and flows wrap them from the outside.
"""

__version__ = "0.1.0"

from lorakit.runtime import compile_cache_per_capability as _compile_cache
from lorakit.runtime import quiet_third_party_logs as _quiet

_quiet()
_compile_cache()
