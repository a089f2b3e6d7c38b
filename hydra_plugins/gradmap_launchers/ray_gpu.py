"""``hydra/launcher=ray``: Ray tasks on a local or existing cluster, one GPU per job where there are GPUs."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import OmegaConf, open_dict

from hydra_plugins.gradmap_launchers import refuse, task_device


class GpuRayLauncher(RayLauncher):
    """Resolves ``num_gpus: auto`` against the cluster it joined (1 per job with GPUs, 0 without; Ray then sets
    each task's ``CUDA_VISIBLE_DEVICES`` to its own GPU), refuses settings that would share or hide GPUs, and
    shuts down the Ray instance it started (a cluster joined by ``address`` is only disconnected from)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray
        from hydra_plugins.hydra_ray_launcher import _core

        from gradmap.devices import plan_ray

        init = {k: v for k, v in OmegaConf.to_container(self.ray_cfg.init, resolve=True).items() if v is not None}
        if not init.get("address"):
            init.setdefault("object_store_memory", 78643200)  # the stock launcher's default, local instances only
        started = not ray.is_initialized()
        if started:
            ray.init(**init)
        try:
            cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
            try:
                num_gpus = plan_ray(self.ray_cfg.remote.get("num_gpus"), cluster_gpus, task_device(self.config))
            except ValueError as err:
                refuse(str(err))
            with open_dict(self.ray_cfg):
                self.ray_cfg.remote.num_gpus = num_gpus
            return _core.launch(launcher=self, job_overrides=job_overrides, initial_job_idx=initial_job_idx)
        finally:
            if started:
                ray.shutdown()
