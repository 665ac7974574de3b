"""``Reports`` over PostgreSQL: usage, entries, periods, overshoot, the spend budgets start
from. Mixed into ``gateway.store.postgres.PostgresLedger``, which provides ``pool``."""

from __future__ import annotations

from typing import Any

import asyncpg

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
from gateway.windows import Span

_COST = "CASE WHEN state = 'pending' THEN reserved ELSE cost END"


def _int(value: Any) -> int:
    return int(value or 0)


class PgReports:
    """The read-only views of the PostgreSQL ledger."""

    pool: asyncpg.Pool

    async def spend_by_scope(self, period: str) -> dict[ScopeKey, int]:
        return await self._spend("period = $1", period)

    async def spend_in(self, span: Span) -> dict[ScopeKey, int]:
        if span.window == "monthly":
            return await self.spend_by_scope(span.period)
        return await self._spend("period = ANY($1::text[]) AND ts >= $2 AND ts < $3",
                                 list(span.months), span.start, span.end)

    async def _spend(self, where: str, *params: Any) -> dict[ScopeKey, int]:
        rows = await self.pool.fetch(
            f"SELECT tenant, agent, campaign, key_name, end_user, SUM({_COST}) FROM requests "
            f"WHERE {where} GROUP BY tenant, agent, campaign, key_name, end_user", *params)
        return fold_spend([(r[0], r[1], r[2], r[3], r[4], _int(r[5])) for r in rows])

    async def overshoot(self, period: str) -> dict[ScopeKey, tuple[int, int]]:
        rows = await self.pool.fetch(
            "SELECT tenant, agent, campaign, key_name, end_user, SUM(overshoot), COUNT(*) "
            "FROM requests WHERE period = $1 AND overshoot > 0 "
            "GROUP BY tenant, agent, campaign, key_name, end_user", period)
        return fold_overshoot([(r[0], r[1], r[2], r[3], r[4], _int(r[5]), int(r[6]))
                               for r in rows])

    async def usage(self, period: str, group_by: str, tenant: str | None = None) -> list[UsageRow]:
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
        column = ("to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if group_by == "day"
                  else f"COALESCE({GROUP_COLUMNS[group_by]}, '')")
        where, params = "period = $1", [period]
        if tenant is not None:
            where += " AND tenant = $2"
            params.append(tenant)
        rows = await self.pool.fetch(
            f"SELECT ({column}) COLLATE \"C\" AS grp, COUNT(*), SUM(prompt_tokens), "
            f"SUM(cached_tokens), SUM(completion_tokens), SUM(reasoning_tokens), SUM({_COST}), "
            f"SUM(override::int) FROM requests WHERE {where} GROUP BY grp "
            "ORDER BY grp", *params)
        # mypy cannot count the starred values (the seven counters before ``extra``)
        return [UsageRow(str(r[0]), *(_int(v) for v in tuple(r)[1:]))  # type: ignore[arg-type]
                for r in rows]

    async def entries(self, period: str, tenant: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE period = $1"
        params: list[Any] = [period]
        if tenant is not None:
            sql += " AND tenant = $2"
            params.append(tenant)
        rows = await self.pool.fetch(sql + " ORDER BY ts, id COLLATE \"C\"", *params)
        return [LedgerEntry(**dict(r)) for r in rows]

    async def periods(self) -> list[str]:
        rows = await self.pool.fetch("SELECT DISTINCT period FROM requests ORDER BY period DESC")
        return [r[0] for r in rows]

    async def count(self) -> int:
        return int(await self.pool.fetchval("SELECT COUNT(*) FROM requests"))
