"""distllm_jax: disaggregated prefill/decode LLM serving on JAX (a DistServe re-implementation).

Importing the package does no I/O and touches no device.
"""

__version__ = "0.1.0"
