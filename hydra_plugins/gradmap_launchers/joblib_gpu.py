"""``hydra/launcher=parallel``: joblib processes, at most one job per visible GPU at once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from hydra_plugins.gradmap_launchers import host_view, refuse, task_device


class GpuJoblibLauncher(JoblibLauncher):
    """Refuses a plan that would put two concurrent jobs on one GPU; each job then locks a free GPU itself
    (gradmap.devices.job_placement), since joblib cannot say which worker runs which job. ``jobs_per_gpu`` (ours,
    not joblib's) lets K jobs share each GPU on purpose."""

    def __init__(self, jobs_per_gpu: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jobs_per_gpu = int(jobs_per_gpu)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gradmap.devices import plan_parallel

        gpus, n_host = host_view()
        try:
            plan_parallel(
                int(self.joblib.get("n_jobs") or 1),
                len(job_overrides),
                task_device(self.config),
                gpus,
                n_host,
                os.cpu_count() or 1,
                self.jobs_per_gpu,
            )
        except ValueError as err:
            refuse(str(err))
        return super().launch(job_overrides, initial_job_idx)
