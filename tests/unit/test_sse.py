"""The one Server-Sent Events encoder every streaming route uses."""

from __future__ import annotations

import orjson

from realizar.server.generation import sse


def test_data_only_frames_are_one_json_line() -> None:
    frame = sse({"text": "a\nb", "n": 1})
    assert frame == b'data: {"text":"a\\nb","n":1}\n\n'
    assert orjson.loads(frame.removeprefix(b"data: ")) == {"text": "a\nb", "n": 1}


def test_named_events_and_preencoded_payloads() -> None:
    assert sse({"num_generated": 3}, "done") == b'event: done\ndata: {"num_generated":3}\n\n'
    assert sse(b"[DONE]") == b"data: [DONE]\n\n"
    assert sse(b'{"error":{}}', "error") == b'event: error\ndata: {"error":{}}\n\n'
