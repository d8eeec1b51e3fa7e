"""The serving engine's parts: sampling, KV migration (the instances and controller build on them)."""
