"""Cache entries that parallel jobs can share: private temporary names, atomic publish, corrupt entries moved aside.

Seven jobs starting together on a fresh cache all build the same entry. Each writes under a name no other process
uses, then publishes with one atomic rename; whoever loses that race finds a finished twin and keeps it (the
entries are deterministic, so either copy is the right one). An entry that fails to load is renamed aside with
one log line naming it and rebuilt once, instead of failing every later job until someone deletes it by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger("gradmap.cache")


def private_temp(final: Path) -> Path:
    """A sibling name of ``final`` that no other process or thread uses (hidden, so scans skip it)."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def publish_file(tmp: Path, final: Path) -> None:
    """Atomically put a finished file in place (a twin published meanwhile is replaced by identical content)."""
    os.replace(tmp, final)


def publish_dir(tmp: Path, final: Path) -> bool:
    """Atomically put a finished folder in place; False (and ``tmp`` removed) when a finished twin got there first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("cache %s: a parallel job published it first; using that copy", final)
        return False


def quarantine(entry: Path, reason: str) -> Path | None:
    """Move a cache entry that failed to load aside (``<name>.corrupt-<time>``) and say so in one line."""
    aside = entry.with_name(f"{entry.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:  # a parallel job moved it already
        return None
    log.warning("cache entry %s failed to load (%s); moved to %s and rebuilding it", entry, reason, aside.name)
    return aside
