"""``hydra/launcher=local``: submitit's local executor, each job in a fresh process with its own GPU(s)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, log

from hydra_plugins.gradmap_launchers import host_view, refuse, task_device


class GpuLocalLauncher(LocalLauncher):
    """Stock submitit-local gives every job the same ``CUDA_VISIBLE_DEVICES`` (empty unless ``gpus_per_node`` is
    set, then ``0``) and starts them all at once. Here each job gets a free GPU group of its own and the next job
    starts when a group frees (gradmap.devices.plan_local / schedule); on a host without GPUs it is the stock
    launcher."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from gradmap.devices import plan_local, schedule

        assert self.config is not None
        gpus, n_host = host_view()
        try:
            groups = plan_local(self.params.get("gpus_per_node"), task_device(self.config), gpus, n_host)
        except ValueError as err:
            refuse(str(err))
        if not groups:
            return super().launch(job_overrides, initial_job_idx)
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        base = {k: v for k, v in self.params.items() if k != "submitit_folder" and v is not None}
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit 'local' sweep output dir : {sweep_dir}; {len(groups)} GPU group(s): {groups}")
        state = Singleton.get_state()

        def submit(i: int, group: tuple[int, ...]) -> Any:
            idx = initial_job_idx + i
            overrides = list(job_overrides[i])
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} (CUDA_VISIBLE_DEVICES={group})")
            executor.update_parameters(**base, gpus_per_node=len(group), visible_gpus=group)
            return executor.submit(self, overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", state)

        jobs = schedule(len(job_overrides), groups, submit, lambda job: job.done())
        return [job.results()[0] for job in jobs]
