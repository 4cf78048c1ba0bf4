"""Training infrastructure shared by every trainer (knows nothing of diffusion or de-identification)."""
