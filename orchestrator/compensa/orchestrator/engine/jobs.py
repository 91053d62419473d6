"""What the durable jobs of replicas share: bulk actions (bulk.py) and audits
(auditor.py) are rows leased to one replica at a time (owner, lease_until,
epoch); the holder renews its lease while it works, and every write it makes
is guarded on (owner, epoch) in the store, so a replica that lost the job
(killed, partitioned, paused) writes nothing more, and another replica claims
it once the lease lapses and carries on from what was written."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from compensa.orchestrator.shared.errors import StoreUnavailable

__all__ = ["keep_lease"]


async def keep_lease(
    renew: Callable[[], Awaitable[bool]], lease_seconds: float, held: asyncio.Event | None, log: logging.Logger,
    what: str,
) -> None:
    """Renews a job's lease every third of it (`renew`: whether it still
    holds it); clears `held` (if given) once it is lost."""
    while True:
        await asyncio.sleep(lease_seconds / 3)
        try:
            renewed = await renew()
        except StoreUnavailable as error:
            log.debug("%s: lease not renewed (%s)", what, error)
            continue
        if not renewed:
            log.info("%s: stopped here (paused, cancelled, completed or taken over)", what)
            if held is not None:
                held.clear()
            return
