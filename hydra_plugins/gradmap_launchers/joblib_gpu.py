"""``hydra/launcher=parallel``: joblib processes, at most one job per visible GPU at once."""

from __future__ import annotations

import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from hydra_plugins.gradmap_launchers import host_view, refuse, task_device


class GpuJoblibLauncher(JoblibLauncher):
    """Refuses a plan that would put two concurrent jobs on one GPU; each job then locks a free GPU itself
    (gradmap.devices.job_placement), since joblib cannot say which worker runs which job."""

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
            )
        except ValueError as err:
            refuse(str(err))
        return super().launch(job_overrides, initial_job_idx)
