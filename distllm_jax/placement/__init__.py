"""Placement: the latency model, the discrete-event simulator, and the paper's Algorithms 1 and 2."""
