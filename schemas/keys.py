"""Stream names, consumer-group names and Redis key names, in one place.

Device-side keys carry the hash tag ``{pool}``, user-side keys ``{u:ID}``, so
each family hashes to one slot. The Lua scripts build the same names from the
prefix (stages/lua/common.lua); this module is the reference both follow.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_QUOTA = "quota"
GROUP_SELECT = "select"
GROUP_PERSIST = "persist"
GROUP_BILL = "bill"
GROUP_NOTIFY = "notify"
GROUP_TIMERS = "timers"


@dataclass(frozen=True)
class Keys:
    prefix: str = "ds"

    # streams
    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def admitted(self) -> str:
        return f"{self.prefix}:admitted"

    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def ticks(self) -> str:
        return f"{self.prefix}:ticks"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def notifications(self) -> str:
        return f"{self.prefix}:notifications"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}:reply:{client_id}"

    def errors(self, group: str) -> str:
        """Hash entry id -> last error text of a failed delivery (with a TTL)."""
        return f"{self.prefix}:errors:{group}"

    # device side, tag {pool}
    @property
    def pools(self) -> str:
        return f"{self.prefix}:{{pool}}:pools"

    def free(self, pool: str) -> str:
        return f"{self.prefix}:{{pool}}:free:{pool}"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}:{{pool}}:dev:{device_id}"

    @property
    def devices(self) -> str:
        return f"{self.prefix}:{{pool}}:devices"

    def allocation(self, allocation_id: str) -> str:
        return f"{self.prefix}:{{pool}}:alloc:{allocation_id}"

    @property
    def expiry(self) -> str:
        """Every active allocation scored by its expires-at: the expiry schedule, and the
        set of active allocations (every allocation has an expiry)."""
        return f"{self.prefix}:{{pool}}:expiry"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:{{pool}}:stats"

    @property
    def state(self) -> str:
        """The state marker (a hash: ``epoch``, ``by``, ``at_ms``; see stages/state.py):
        present exactly when Redis holds a live state that `up`, a rebuild or a fresh
        start established. In the ``{pool}`` slot, beside the devices it vouches for."""
        return f"{self.prefix}:{{pool}}:state"

    # user side, tag {u:ID}
    def user(self, user_id: str) -> str:
        """One hash per user, read and written in one step by the scripts: the quota
        (``status``, ``expires_at_ms``, ``max_*``, ``total_*``, ``version``), the usage
        (``used_devices``, ``used_cpu``, ``used_mem``, ``used_sto``), a
        ``hold:<request id>`` per admitted request select has not decided yet, and an
        ``alloc:<allocation id>`` ("cpu mem sto") per active allocation."""
        return f"{self.prefix}:{{u:{user_id}}}:user"

    @property
    def users(self) -> str:
        return f"{self.prefix}:users"
