"""A test-only fault switch: make one job of a sweep raise, go NaN or die, to prove that sweeps survive it.

Why it exists: "a failed job is recorded and the others finish" and "a killed job is redone by the rerun" are
promises about the sweep machinery, and the only honest test of them is a real subprocess sweep in which one
job really fails. Monkeypatching cannot reach into a Hydra subprocess, so the pipeline calls :func:`inject`
once, right after pruning, and this module decides from the environment whether to act.

It must be impossible to trigger by accident, so two variables are needed together::

    GRADMAP_ALLOW_FAULTS=1
    GRADMAP_TEST_FAULT=<job-name-substring>:<kind>[,<substring>:<kind>...]

Kinds (all fire after pruning, before evaluation and before ``result.json`` is written):

* ``raise`` — raise :class:`InjectedFault`; the pipeline records ``status: failed`` and ``error.log``.
* ``nan`` — fill every floating-point parameter of the pruned model with NaN, as a numerical blow-up would;
  what the evaluation and the record make of that is what the test is about.
* ``slow`` — sleep ``SLOW_SECONDS`` and carry on: holds the job's claim long enough for a second process on the
  same job to find it taken (``make chaos``).
* ``kill`` — ``os._exit(KILL_EXIT_CODE)``: the process dies like an OOM-killed or pre-empted job, with no
  ``finally`` blocks run, so no ``result.json`` is written and a rerun must redo the job.

A fault spec set without ``GRADMAP_ALLOW_FAULTS=1`` is ignored with a warning; a malformed spec is an error only
when faults are allowed (then the test author wants to know).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV_SPEC = "GRADMAP_TEST_FAULT"
ENV_ALLOW = "GRADMAP_ALLOW_FAULTS"
KINDS = ("raise", "nan", "kill", "slow")
SLOW_SECONDS = 20.0  # long enough for a second process started at the same time to find the job claimed
KILL_EXIT_CODE = 137  # what a SIGKILLed process reports to its shell


class InjectedFault(RuntimeError):
    """The error a ``raise`` fault throws (its message names the job, so the record shows where it came from)."""


@dataclass(frozen=True)
class Fault:
    """One rule: jobs whose name contains ``match`` suffer ``kind``."""

    match: str
    kind: str


def parse(spec: str) -> list[Fault]:
    """Parse ``"substr:kind,substr:kind"``; one-line error naming the bad part and the allowed kinds."""
    faults = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        match, sep, kind = part.rpartition(":")
        if not sep or not match or kind not in KINDS:
            raise ValueError(
                f"bad {ENV_SPEC} entry {part!r}; expected <job-name-substring>:<kind>, kind one of {', '.join(KINDS)}"
            )
        faults.append(Fault(match, kind))
    return faults


def active_faults(environ: Mapping[str, str] | None = None) -> list[Fault]:
    """The faults in force: none unless both variables are set."""
    env = os.environ if environ is None else environ
    spec = env.get(ENV_SPEC, "")
    if not spec:
        return []
    if env.get(ENV_ALLOW) != "1":
        log.warning("%s is set but %s is not 1: fault injection ignored", ENV_SPEC, ENV_ALLOW)
        return []
    return parse(spec)


def fault_for(job_name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The fault kind for this job, or None; the first matching rule wins."""
    for fault in active_faults(environ):
        if fault.match in job_name:
            return fault.kind
    return None


def inject(job_name: str, model: nn.Module | None = None) -> None:
    """Apply the fault configured for ``job_name``, if any (a no-op in every normal run)."""
    kind = fault_for(job_name)
    if kind is None:
        return
    log.warning("injecting test fault %r into %s", kind, job_name)
    if kind == "raise":
        raise InjectedFault(f"injected test fault in {job_name}")
    if kind == "slow":
        import time

        time.sleep(SLOW_SECONDS)
        return
    if kind == "nan":
        if model is None:
            raise ValueError("fault kind 'nan' needs the model")
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.fill_(float("nan"))
        return
    for handler in logging.getLogger().handlers:  # keep the job log readable; then die without cleanup
        handler.flush()
    os._exit(KILL_EXIT_CODE)
