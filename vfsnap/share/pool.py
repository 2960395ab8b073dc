"""The shares of one mount, seen as one set of volumes.

`volumes/` lists the volumes of every share. A name found on two shares is served from the
first share in configuration order, with a warning; capacity is the sum of all shares.
"""

from __future__ import annotations

import logging

from vfsnap.chain.view import MapBudget
from vfsnap.errors import NotFound, ShareNotAnswering
from vfsnap.format import TableCache
from vfsnap.options import MountOptions
from vfsnap.share.share import Capacity, Share
from vfsnap.share.volume import Volume, VolumeStat

log = logging.getLogger(__name__)


class Pool:
    def __init__(self, shares: list[Share], options: MountOptions):
        if not shares:
            raise ValueError("a pool needs at least one share")
        self.shares = shares
        self.options = options
        self._warned_duplicates: set[str] = set()
        # Each share's last answers, given while it does not answer (DESIGN.md section 4).
        self._last_names: dict[str, list[str]] = {}
        self._last_capacity: dict[str, Capacity] = {}

    @classmethod
    def open(cls, paths: list[str], options: MountOptions, *, recover: bool = True) -> "Pool":
        """Open the shares; with `recover=False` the caller runs `recovery()` (the mount does,
        in the background, once it answers)."""
        from vfsnap.share.share import open_share

        cache = TableCache(options.memory_budget)
        maps = MapBudget(options.memory_budget, tables=cache)
        shares = []
        for path in paths:
            share = open_share(path, options, recover=recover)
            share.table_cache, share.map_budget = cache, maps  # one budget for the whole mount
            shares.append(share)
        return cls(shares, options)

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def share_volume_names(self, share: Share) -> list[str]:
        """The volumes of one share; its last listing while it does not answer (waiting at
        most a moment: see vfsnap/share/io.py)."""
        try:
            names = share.volume_names()
        except ShareNotAnswering:
            names = self._last_names.get(share.path, [])
            log.debug("%s: not answering; listing its volumes as last seen", share.path)
        self._last_names[share.path] = names
        return names

    def volume_names(self) -> list[str]:
        seen: dict[str, Share] = {}
        for share in self.shares:
            for name in self.share_volume_names(share):
                if name in seen:
                    self._warn_duplicate(name, seen[name], share)
                    continue
                seen[name] = share
        return sorted(seen)

    def _warn_duplicate(self, name: str, first: Share, other: Share) -> None:
        if name not in self._warned_duplicates:
            self._warned_duplicates.add(name)
            log.warning("volume %s exists on %s and %s; serving the one on %s", name, first.path, other.path, first.path)

    def volume(self, name: str) -> Volume:
        return self._on_first_share(name, Share.volume)

    def listed_stat(self, name: str) -> VolumeStat:
        """What a listing shows of volume `name` (see `Share.listed_stat`)."""
        return self._on_first_share(name, Share.listed_stat)

    def _on_first_share(self, name: str, call):
        """`call(share, name)` on the first share that has volume `name` (the one listed)."""
        hung = None
        for share in self.shares:
            try:
                return call(share, name)
            except NotFound:
                continue
            except ShareNotAnswering as exc:  # the volume may live there: say so if no other has it
                hung = exc
        if hung is not None:
            raise hung
        raise NotFound(f"no volume {name!r}")

    def create_volume(self, name: str, size: int = 0, *, mode: int = 0o644, owner: tuple[int, int] | None = None) -> Volume:
        for share in self.shares:
            if share.is_volume(name):
                from vfsnap.errors import AlreadyExists

                raise AlreadyExists(f"volume {name} exists on {share.path}")
        return self.place(size).create_volume(name, size, mode=mode, owner=owner)

    def place(self, size: int) -> Share:
        """The share a new volume of `size` bytes goes to (Cinder's rules: see placement.py)."""
        from vfsnap.share.placement import choose_share, share_usage

        usages = [share_usage(share.path) for share in self.shares]
        index = choose_share(
            usages,
            size,
            max_over_subscription_ratio=self.options.max_over_subscription_ratio,
            reserved_percentage=self.options.reserved_percentage,
        )
        return self.shares[index]

    async def rename_volume(self, old: str, new: str) -> None:
        volume = self.volume(old)
        for share in self.shares:
            if share.is_volume(new):
                from vfsnap.errors import AlreadyExists

                raise AlreadyExists(f"volume {new} exists on {share.path}")
        await volume.share.rename_volume(old, new)

    async def remove_volume(self, name: str) -> None:
        await self.volume(name).share.remove_volume(name)

    def recovery(self):
        """Every share's recovery steps (`Share.recovery`), one volume per step."""
        for share in self.shares:
            if not share.read_only:
                yield from share.recovery()

    @property
    def recovering(self) -> bool:
        return any(share.recovery_pending for share in self.shares)

    def volumes_with_pending_work(self) -> list[Volume]:
        return [v for share in self.shares for v in share.volumes_with_journal()]

    def operations(self) -> list[dict]:
        from vfsnap.share import clone
        from vfsnap.share.snapshots import operations

        out = []
        for share in self.shares:
            for volume in share.open_volumes():
                out += operations(volume) + clone.operations(volume)
        return out

    def forget_stale_handles(self) -> None:
        """After ESTALE: every share's names looked up afresh, every volume's chain reopened
        where that is safe (`Volume.forget_stale_images`)."""
        for share in self.shares:
            for volume in share.open_volumes():
                volume.forget_stale_images()

    def volumes_needing_recovery(self) -> list[Volume]:
        return [v for share in self.shares for v in share.open_volumes() if v.needs_recovery]

    def retry_unfinished(self) -> None:
        """Finish renames that failed midway (the share was full, say): they are journalled,
        and every step is idempotent."""
        from vfsnap.share.rename import pending_renames, run_rename

        for share in self.shares:
            if not share.rename_unfinished:
                continue
            try:
                for entry in pending_renames(share):
                    run_rename(share, entry)
                share.rename_unfinished = False
            except Exception as exc:  # noqa: BLE001 - tried again at the next tick
                log.warning("%s: an unfinished rename still cannot complete: %s", share.path, exc)

    def flush_all(self) -> None:
        """Write back every volume's metadata (at unmount)."""
        for share in self.shares:
            share.flush_all()

    def settle_releases(self) -> None:
        """Locks and descriptors that closes on a share not answering left held
        (`Volume.settle_releases`), given back once it answers."""
        for share in self.shares:
            for volume in share.open_volumes():
                if volume.release_pending:
                    volume.settle_releases()

    def dirty_volumes(self) -> list[Volume]:
        """Open volumes with writes not yet written back (the periodic background flush)."""
        return [v for share in self.shares for v in share.open_volumes() if v.dirty]

    def memory(self) -> dict:
        """What the mount's memory budget holds now (`vfsnap status`)."""
        cache = self.shares[0].table_cache
        maps = self.shares[0].map_budget
        return cache.usage() | {"maps": maps.used_bytes}

    def capacity(self) -> Capacity:
        parts = []
        for share in self.shares:
            try:
                part = share.capacity()
            except ShareNotAnswering:
                part = self._last_capacity.get(share.path)
                if part is None:
                    continue
            self._last_capacity[share.path] = part
            parts.append(part)
        if not parts:
            raise ShareNotAnswering("no share answers")
        block = min(p.block_size for p in parts) or 4096
        return Capacity(
            total=sum(p.total for p in parts),
            free=sum(p.free for p in parts),
            available=sum(p.available for p in parts),
            block_size=block,
        )

    def share_states(self) -> list[dict]:
        """Each share and whether it answers, for `vfsnap status`."""
        states = []
        for share in self.shares:
            state: dict = {"path": share.path, "answering": not share.io.not_answering}
            oldest = share.io.oldest_call()
            if oldest is not None and not state["answering"]:
                state["waiting_seconds"] = round(oldest[0], 1)
                state["waiting_for"] = oldest[1]
            states.append(state)
        return states

    def close(self) -> None:
        for share in self.shares:
            share.close()
