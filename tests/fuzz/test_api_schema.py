"""The HTTP API against its own OpenAPI description (schemathesis): for every generated request, valid
or not, a documented status and a body that the description allows; never a 500.

The server is a real `agentkernel serve` over an empty data dir: requests about sandboxes fail fast
(no such sandbox, no such image) rather than boot VMs. So schema-valid requests may be refused with a
4xx (the `positive_data_acceptance` check is left out); everything else is checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import settings

from agentkernel.api.app import create_app
from tests.api.server import api_server

SPEC = create_app(project_dir=Path("."), api_key=None).openapi()
schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AGENTKERNEL_HOME", str(tmp_path_factory.mktemp("home")))
        with api_server(tmp_path_factory.mktemp("api")) as url:
            yield url


def test_the_server_serves_this_description(api: str) -> None:
    assert httpx.get(f"{api}/openapi.json").json() == SPEC


@schema.parametrize()
@settings(max_examples=100)
def test_every_request_gets_a_documented_answer(case: schemathesis.Case, api: str) -> None:
    case.call_and_validate(base_url=api, excluded_checks=[schemathesis.checks.positive_data_acceptance])
