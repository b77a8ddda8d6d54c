"""Fixtures shared by the HTTP tests: the stock ``openai`` client on the shared demo server, and its model id."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id
