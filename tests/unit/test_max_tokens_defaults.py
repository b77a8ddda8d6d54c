"""max_tokens defaults: one table (config.DEFAULT_MAX_TOKENS), what the parsers and the CLI use,
and what docs/api.md says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from realizar.cli import build_parser
from realizar.config import DEFAULT_MAX_TOKENS, ServerConfig
from realizar.server import protocol
from realizar.server.errors import APIError

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
CHAT_DEFAULT_PROSE = "defaults to the room left in the\ncontext, at most `--max-tokens-limit`"


def section(route: str) -> str:
    """The text of docs/api.md under "### `POST <route>`", up to the next heading."""
    text = API_DOC.read_text()
    start = text.index(f"### `POST {route}`")
    end = text.find("\n#", start + 1)
    return text[start:end if end >= 0 else len(text)]


def documented_default(route: str) -> int | None:
    """The default the route's table row for max_tokens gives; None where the prose says the room left."""
    body = section(route)
    row = re.search(r"^\| `max_tokens` \|(.*)$", body, re.MULTILINE)
    if row is None:
        assert CHAT_DEFAULT_PROSE in body, route
        return None
    cells = [c.strip() for c in row.group(1).split("|")]
    number = next(c for c in cells if c.isdigit())  # the default column: the row's only bare integer
    return int(number)


@pytest.mark.parametrize("route", sorted(DEFAULT_MAX_TOKENS))
def test_docs_state_the_table(route: str) -> None:
    assert documented_default(route) == DEFAULT_MAX_TOKENS[route]


def test_batch_and_stream_take_the_generate_body() -> None:
    # they have no max_tokens row of their own: the docs send the reader to /generate's
    assert "/generate sampling fields" in section("/batch/generate")
    assert "Same body as `/generate`" in section("/stream/generate")


def test_the_parsers_and_the_cli_use_the_table() -> None:
    config = ServerConfig(max_tokens_limit=1234)
    assert protocol.parse_generate({"prompt": "x"}, config).params.max_tokens == DEFAULT_MAX_TOKENS["/generate"]
    assert protocol.parse_batch_generate({"prompts": ["x"]}, config).params.max_tokens == \
        DEFAULT_MAX_TOKENS["/generate"]
    assert protocol.parse_completion({"prompt": "x"}, config).params.max_tokens == DEFAULT_MAX_TOKENS["/v1/completions"]
    chat = protocol.parse_chat({"messages": [{"role": "user", "content": "x"}]}, config)
    assert DEFAULT_MAX_TOKENS["/v1/chat/completions"] is None
    assert chat.auto_max_tokens and chat.params.max_tokens == 1234
    args = build_parser().parse_args(["generate", "--demo", "hi"])
    assert args.max_tokens == DEFAULT_MAX_TOKENS["/generate"]


def test_a_given_max_tokens_still_wins_and_is_checked() -> None:
    config = ServerConfig(max_tokens_limit=100)
    assert protocol.parse_completion({"prompt": "x", "max_tokens": 7}, config).params.max_tokens == 7
    with pytest.raises(APIError, match="limit is 100"):
        protocol.parse_generate({"prompt": "x", "max_tokens": 101}, config)
