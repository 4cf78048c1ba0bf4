"""MeMa-JAX: MeMa generation (Stable Diffusion in Flax) and shared training infrastructure.

Importing the package imports nothing heavy: the PyTorch eval bridge reads
``mema_jax.data.layout`` without pulling in jax.
"""
