"""Expert runners: compute the expert MLPs for dispatched rows.

Importing this package registers every runner; `get_runner(name)` returns its class.
"""

from epmoe.experts import reference  # noqa: F401  (registers "reference")
from epmoe.experts import triton as _triton  # noqa: F401  (registers "triton")
from epmoe.experts.base import RUNNERS, ExpertRunner, ExpertWeights, get_runner, register_runner
from epmoe.experts.reference import naive_moe, reference_experts

__all__ = [
    "RUNNERS",
    "ExpertRunner",
    "ExpertWeights",
    "get_runner",
    "naive_moe",
    "reference_experts",
    "register_runner",
]
