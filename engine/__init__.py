"""MeZO Engine's inference engine: paged KV, radix prefix cache, continuous batching."""
from .engine import Completion, Engine
from .sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion"]
