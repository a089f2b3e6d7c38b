"""gradmap's launchers: Hydra's joblib, submitit-local and Ray launchers, each giving every job its own device.

They live here because Hydra instantiates launchers only from the ``hydra_plugins`` namespace. Each subclass
checks the plan before any job starts (gradmap/devices.py: one job per GPU, or a one-line refusal) and otherwise
leaves the launch to the stock plugin. conf/hydra/launcher/{parallel,local,ray}.yaml select them.
"""

from __future__ import annotations

from typing import NoReturn


def refuse(message: str) -> NoReturn:
    """Stop the whole multirun before any job starts with one line (Hydra would print a traceback otherwise)."""
    raise SystemExit(f"error: {message}")


def task_device(config) -> str:
    """The ``device`` every job of the sweep will get (overrides are not swept per device here)."""
    return str(config.get("device", "auto"))


def host_view() -> tuple[list[str], int]:
    """(visible GPUs, the host's GPUs) of this launcher process."""
    import os

    from gradmap.devices import host_gpus, visible_gpus

    n_host = host_gpus()
    return visible_gpus(os.environ, n_host), n_host
