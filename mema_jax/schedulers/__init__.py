"""Functional diffusion schedulers mirroring diffusers' DDPM, DDIM and DPM-Solver++ (2M)."""
from mema_jax.schedulers import ddim, ddpm, dpm_solver, guidance
from mema_jax.schedulers.common import SchedulerConfigError, read_scheduler_config
from mema_jax.schedulers.ddim import DDIMConfig
from mema_jax.schedulers.ddpm import DDPMConfig
from mema_jax.schedulers.dpm_solver import DPMSolverConfig

__all__ = [
    "DDIMConfig",
    "DDPMConfig",
    "DPMSolverConfig",
    "SchedulerConfigError",
    "ddim",
    "ddpm",
    "dpm_solver",
    "guidance",
    "read_scheduler_config",
]
