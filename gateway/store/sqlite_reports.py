"""``Reports`` over SQLite: usage, entries, periods, overshoot, the spend budgets start from.

Mixed into ``gateway.store.sqlite.SqliteLedger``, which provides ``_fetch`` (a read that
first waits for the begins queued before it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite

from gateway.budget import ScopeKey
from gateway.ledger import (
    COLUMNS,
    GROUP_BY,
    GROUP_COLUMNS,
    LedgerEntry,
    UsageRow,
    fold_overshoot,
    fold_spend,
)
from gateway.store.sqlite_sql import _COST, _USAGE_SUMS, _entry, _ts, _unwide, _wide_sum
from gateway.windows import Span


class SqliteReports:
    """The read-only views of the SQLite ledger."""

    _fetch: Callable[..., Awaitable[list[aiosqlite.Row]]]

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        return await self._spend("period = ?", (period,))

    async def spend_in(self, span: Span) -> dict[ScopeKey, int]:
        if span.window == "monthly":
            return await self.spend_by_scope(span.period)
        months = ", ".join("?" for _ in span.months)
        return await self._spend(f"period IN ({months}) AND ts >= ? AND ts < ?",
                                 (*span.months, _ts(span.start), _ts(span.end)))

    async def _spend(self, where: str, params: tuple[Any, ...]) -> dict[ScopeKey, int]:
        rows = await self._fetch(
            f"SELECT tenant, agent, campaign, key_name, end_user, {_wide_sum(_COST)} "
            f"FROM requests WHERE {where} GROUP BY tenant, agent, campaign, key_name, end_user",
            params,
        )
        return fold_spend([(r[0], r[1], r[2], r[3], r[4], _unwide(r[5], r[6])) for r in rows])

    async def overshoot(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        rows = await self._fetch(
            f"SELECT tenant, agent, campaign, key_name, end_user, {_wide_sum('overshoot')}, "
            "COUNT(*) FROM requests WHERE period = ? AND overshoot > 0 "
            "GROUP BY tenant, agent, campaign, key_name, end_user", (period,))
        return fold_overshoot([(r[0], r[1], r[2], r[3], r[4], _unwide(r[5], r[6]), r[7])
                               for r in rows])

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
        column = ("substr(ts, 1, 10)" if group_by == "day"
                  else f"COALESCE({GROUP_COLUMNS[group_by]}, '')")
        where, params = "period = ?", [period]
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        sums = ", ".join(_wide_sum(c) for c in _USAGE_SUMS)
        rows = await self._fetch(
            f"SELECT {column} AS grp, COUNT(*), {sums}, SUM(override) "
            f"FROM requests WHERE {where} GROUP BY grp ORDER BY grp",
            tuple(params),
        )
        out = []
        for r in rows:
            values = tuple(r)
            prompt, cached, completion, reasoning, cost = (
                _unwide(values[i], values[i + 1]) for i in range(2, 2 + 2 * 5, 2))
            out.append(UsageRow(str(values[0]), int(values[1]), prompt, cached, completion,
                                reasoning, cost, int(values[-1] or 0)))
        return out

    async def entries(self, period: str, tenant: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE period = ?"
        params: tuple[Any, ...] = (period,)
        if tenant is not None:
            sql += " AND tenant = ?"
            params += (tenant,)
        return [_entry(r) for r in await self._fetch(sql + " ORDER BY ts, id", params)]

    async def periods(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT period FROM requests ORDER BY period DESC")
        return [r[0] for r in rows]

    async def count(self) -> int:
        return int((await self._fetch("SELECT COUNT(*) FROM requests"))[0][0])
