"""The changes the mounted tree asks of the share, each under the volume's chain locks.

The fs layer calls these and nothing below them: it never takes a chain lock itself.
`ChainChange` (`vfsnap.share.locks`) takes this process's lock of the volume, the share's CHAIN
lock and its WRITER lock (EBUSY while another host changes the chain or writes the volume),
rereads what other hosts may have changed, and finishes what the volume's journal holds of
operations that committed but could not record it.
"""

from __future__ import annotations

from vfsnap.share import clone, revert, snapshots
from vfsnap.share.locks import ChainChange


async def take_snapshot(volume, snapshot: str) -> None:
    """`mkdir snapshots/<vol>/<snap>`."""
    async with ChainChange(volume):
        await snapshots.take_snapshot(volume, snapshot)


async def delete_snapshot(volume, snapshot: str) -> None:
    """`rmdir snapshots/<vol>/<snap>`: journalled now, merged in the background
    (`snapshots.run_pending`)."""
    async with ChainChange(volume):
        await snapshots.request_delete(volume, snapshot)


async def remove_volume(pool, name: str) -> None:
    """`rm volumes/<vol>`."""
    async with ChainChange(pool.volume(name)):
        await pool.remove_volume(name)


async def rename_volume(pool, old: str, new: str) -> None:
    """`mv volumes/<old> volumes/<new>`."""
    async with ChainChange(pool.volume(old)):
        await pool.rename_volume(old, new)


async def create_clone(pool, source: str, snapshot: str | None, name: str):
    """`vfsnap clone`: the new volume (its background copy is the caller's to start)."""
    volume = pool.volume(source)
    async with ChainChange(volume):
        return await clone.create_clone(pool, volume, snapshot, name)


async def revert_volume(volume, snapshot: str, *, destroy_newer: bool) -> list[str]:
    """`vfsnap revert`: the snapshots destroyed."""
    async with ChainChange(volume):
        return revert.revert(volume, snapshot, destroy_newer=destroy_newer)


async def finish_journal(volume) -> None:
    """Clear the journal entries of operations that committed but could not record it (the
    share failed right after their commit point), without waiting for the next mount: entering
    a chain change does exactly that, with the locks that keep other hosts out meanwhile."""
    async with ChainChange(volume):
        pass


__all__ = ["create_clone", "delete_snapshot", "finish_journal", "remove_volume", "rename_volume", "revert_volume",
           "take_snapshot"]
