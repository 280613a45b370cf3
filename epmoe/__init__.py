"""epmoe: expert-parallel Mixture-of-Experts layers for LLM inference."""

from epmoe.config import MoEConfig, preset_names
from epmoe.experts import ExpertWeights
from epmoe.group import EPGroup, Placement, VirtualGroup
from epmoe.layer import MoELayer, SharedExperts
from epmoe.routing import Routing, RoutingCapture, route

__version__ = "0.1.0"

__all__ = ["EPGroup", "ExpertWeights", "MoEConfig", "MoELayer", "Placement", "Routing", "RoutingCapture",
           "SharedExperts", "VirtualGroup", "preset_names", "route"]
