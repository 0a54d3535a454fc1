"""plait: a multi-GPU LLM inference engine that spends as little time as possible talking between GPUs."""

from plait.entrypoints.llm import LLM
from plait.outputs import CompletionOutput, Logprob, RequestOutput
from plait.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob"]
