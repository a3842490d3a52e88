"""Speed and memory of the frozen backbone: what ptune may do to a backbone because it is frozen (frozen.py: weight
cast, fused projections), and the memory features (memory.py applies them together: activation_checkpointing.py,
quantize.py, sharding.py). Activation checkpointing recomputes the frozen blocks' activations in the backward pass;
it has nothing to do with prompt checkpoints (ptune/checkpoint.py)."""
