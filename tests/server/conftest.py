"""Fixtures for the HTTP layer: an app around a fake engine, and an httpx client bound to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from api_helpers import app_client
from fake_engine import FakeEngine

from server.settings import ServerSettings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings()


@pytest.fixture
async def client(engine: FakeEngine, settings: ServerSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine, settings) as client:
        yield client
