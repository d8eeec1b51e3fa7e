"""The serving engine: instances on their own meshes, the controller, KV migration, sampling."""

from distllm_jax.engine.config import EngineConfig, InstanceSpec
from distllm_jax.engine.engine import Engine, EngineClosed
from distllm_jax.engine.params_source import CheckpointSource, DeviceRandomSource, RandomSource
from distllm_jax.engine.request import RequestOutput, RequestStream, RequestTimings
from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import FinishReason

__all__ = [
    "CheckpointSource", "Engine", "EngineClosed", "EngineConfig", "FinishReason", "InstanceSpec",
    "DeviceRandomSource", "RandomSource", "RequestOutput", "RequestStream", "RequestTimings", "SamplingParams",
]
