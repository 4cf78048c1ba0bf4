"""Logical axis names of the activations, for ``sharding.constrain``; the mesh rules map them."""

IMAGE_AXES = ("act_batch", "act_height", "act_width", "act_channels")  # NHWC feature maps
TOKEN_AXES = ("act_batch", "act_length", "act_embed")  # (B, L, D) token sequences
