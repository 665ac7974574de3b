"""The admin API's state-changing tests again, on PostgreSQL (the shared budget engine).

Caps, the override and keys are stored in the shared ledger there and reach the other
replicas through LISTEN/NOTIFY; here each test checks that a change applies to the next
request and survives a restart on that backend too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg
from tests.test_admin_api import (  # noqa: F401  (the tests themselves)
    admin_stack,
    test_cap_changes_apply_to_the_next_request_and_survive_a_restart,
    test_get_budget_reports_exact_spend_per_scope,
    test_keys_created_used_revoked_never_shown_twice,
    test_override_toggle_is_enforced_audited_and_persisted,
    test_removing_a_cap_lifts_it_until_set_again,
)
from tests.test_hardening import (  # noqa: F401  (agents on admin-created keys, on PostgreSQL)
    test_admin_created_keys_carry_their_agents_across_a_restart,
)


@pytest.fixture(autouse=True)
def postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pg.require()
    with pg.temp_database() as url:
        monkeypatch.setenv("COSTWALL_TEST_DATABASE", url)
        yield url
