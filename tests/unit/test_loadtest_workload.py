"""Arrival schedules, request bodies, response checks and the SSE parser."""

from __future__ import annotations

import statistics

import orjson
import pytest

from realizar.loadtest.config import LoadTestConfig
from realizar.loadtest.llm import multi_turn_prompts, prefix_shared_prompts
from realizar.loadtest.scenarios import SCENARIO_NAMES, seed_scenarios
from realizar.loadtest.workload import (
    ContentError,
    ResponseKind,
    StreamState,
    arrival_offsets,
    check_health,
    check_tokenize,
    make_batch_generate_check,
)


def test_poisson_schedule_rate_within_tolerance() -> None:
    offsets = arrival_offsets(20_000, 200.0, "poisson", seed=7)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    rate = (len(offsets) - 1) / offsets[-1]
    assert rate == pytest.approx(200.0, rel=0.03)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    # exponential gaps: coefficient of variation 1
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)


def test_schedules_are_seeded() -> None:
    assert arrival_offsets(100, 10.0, "poisson", seed=3) == arrival_offsets(100, 10.0, "poisson", seed=3)
    assert arrival_offsets(100, 10.0, "poisson", seed=3) != arrival_offsets(100, 10.0, "poisson", seed=4)


def test_gamma_burstiness_changes_the_spread_not_the_rate() -> None:
    bursty = arrival_offsets(20_000, 100.0, "gamma", seed=1, burstiness=0.25)
    smooth = arrival_offsets(20_000, 100.0, "gamma", seed=1, burstiness=4.0)
    for offsets in (bursty, smooth):
        assert (len(offsets) - 1) / offsets[-1] == pytest.approx(100.0, rel=0.05)

    def cv(o: list[float]) -> float:
        gaps = [b - a for a, b in zip(o, o[1:], strict=False)]
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    assert cv(bursty) == pytest.approx(2.0, rel=0.1)  # 1 / sqrt(0.25)
    assert cv(smooth) == pytest.approx(0.5, rel=0.1)  # 1 / sqrt(4)


def test_constant_schedule() -> None:
    assert arrival_offsets(5, 10.0, "constant") == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_seed_scenarios_match_the_guide() -> None:
    sc = seed_scenarios()
    assert tuple(sc) == SCENARIO_NAMES
    expected = {"health": (10, 100, 30.0), "tokenize": (5, 50, 30.0), "generate": (5, 25, 60.0),
                "batch_tokenize": (5, 25, 30.0), "batch_generate": (3, 15, 60.0), "sustained": (10, 200, 30.0)}
    for name, (conc, total, timeout) in expected.items():
        cfg = sc[name].config
        assert (cfg.concurrency, cfg.total_requests, cfg.timeout) == (conc, total, timeout), name
    assert sc["sustained"].config.duration == 30.0
    assert sc["sustained"].config.send_rate == pytest.approx(200 / 30)
    phases = [(p.name, p.config.concurrency, p.config.total_requests) for p in sc["spike"].phases]
    assert phases == [("baseline", 2, 10), ("spike", 20, 100), ("recovery", 2, 10)]


def test_stream_generate_is_opt_in() -> None:
    assert "stream_generate" not in seed_scenarios()
    extra = seed_scenarios(extra=True)
    assert list(extra)[-1] == "stream_generate"
    spec = extra["stream_generate"].request(0)
    assert spec.path == "/stream/generate" and spec.kind is ResponseKind.SSE_NATIVE


def test_seed_payloads() -> None:
    sc = seed_scenarios()
    assert orjson.loads(sc["tokenize"].request(3).body or b"") == {"text": "Hello world test message 3"}
    assert orjson.loads(sc["generate"].request(2).body or b"") == {"prompt": "Hello 2", "max_tokens": 5,
                                                                  "strategy": "greedy"}
    assert orjson.loads(sc["batch_tokenize"].request(1).body or b"")["texts"] == [
        "Text 1 batch 1", "Text 2 batch 1", "Text 3 batch 1"]
    body = orjson.loads(sc["batch_generate"].request(4).body or b"")
    assert body["prompts"] == ["Prompt 1 batch 4", "Prompt 2 batch 4"] and body["max_tokens"] == 5
    assert sc["health"].request(0).method == "GET" and sc["health"].request(0).path == "/health"


def test_scale_shrinks_counts_and_durations() -> None:
    sc = seed_scenarios(scale=0.1)
    assert sc["health"].config.total_requests == 10
    assert sc["sustained"].config.total_requests == 20 and sc["sustained"].config.duration == pytest.approx(3.0)
    assert [p.config.total_requests for p in sc["spike"].phases] == [1, 10, 1]
    assert sc["health"].config.concurrency == 10


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        LoadTestConfig(concurrency=0)
    with pytest.raises(ValueError):
        LoadTestConfig(arrival="poisson")  # open loop needs a rate
    with pytest.raises(ValueError):
        LoadTestConfig(base_url="127.0.0.1:8080")
    with pytest.raises(ValueError):
        LoadTestConfig(total_requests=0)  # unbounded needs a duration
    assert LoadTestConfig(rate=10.0, duration=2.0, arrival="poisson").request_count == 20


def test_checks() -> None:
    assert check_health(b"") == 0 and check_health(b'{"status": "healthy"}') == 0
    with pytest.raises(ContentError):
        check_health(b"<html>")
    assert check_tokenize(b'{"token_ids": [1, 2], "num_tokens": 2}') == 0
    with pytest.raises(ContentError):
        check_tokenize(b'{"token_ids": [1, 2], "num_tokens": 3}')
    check = make_batch_generate_check(2, 5)
    ok = {"results": [{"token_ids": [1], "text": "a", "num_generated": 5},
                      {"token_ids": [1], "text": "b", "num_generated": 3}]}
    assert check(orjson.dumps(ok)) == 8
    with pytest.raises(ContentError):
        check(orjson.dumps({"results": ok["results"][:1]}))


def test_sse_parser_handles_split_events_and_crlf() -> None:
    state = StreamState(ResponseKind.SSE_NATIVE)
    raw = (b'event: token\r\ndata: {"token_id": 1, "text": "a"}\r\n\r\n'
           b'event: token\ndata: {"token_id": 2, "text": "b"}\n\n'
           b'event: done\ndata: {"num_generated": 2}\n\n')
    for i, byte in enumerate(raw):  # one byte at a time
        state.feed(bytes([byte]), float(i))
    assert state.tokens == 2 and state.done and state.content_error() == ""
    assert len(state.chunk_times) == 2


def test_openai_parser_counts_text_chunks_and_usage() -> None:
    state = StreamState(ResponseKind.SSE_OPENAI)
    state.feed(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n', 0.0)
    state.feed(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', 1.0)
    state.feed(b'data: {"choices": [{"delta": {"content": " there"}}]}\n\n', 2.0)
    assert state.tokens == 2 and state.chunk_times == [1.0, 2.0]  # the role-only chunk is no token
    state.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}\n\n'
               b"data: [DONE]\n\n", 3.0)
    assert state.done and state.output_tokens == 3 and state.usage_input == 9
    err = StreamState(ResponseKind.SSE_OPENAI)
    err.feed(b'data: {"error": {"message": "boom"}}\n\n', 0.0)
    assert err.content_error() == "boom"


def test_openai_parser_reads_cached_prompt_tokens() -> None:
    state = StreamState(ResponseKind.SSE_OPENAI)
    state.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 90, "completion_tokens": 3, '
               b'"prompt_tokens_details": {"cached_tokens": 64}}}\n\ndata: [DONE]\n\n', 1.0)
    assert state.usage_input == 90 and state.usage_cached == 64
    plain = StreamState(ResponseKind.SSE_OPENAI)
    plain.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}\n\n', 1.0)
    assert plain.usage_cached is None


def test_multi_turn_conversations_share_a_system_prompt_and_carry_their_history() -> None:
    prompts = multi_turn_prompts(3, 4, system_len=40, user_len=5, reply_len=7, seed=1)
    assert len(prompts) == 12 and [p.turn for p in prompts] == [t for t in (1, 2, 3, 4) for _ in range(3)]
    systems = {orjson.dumps(p.messages[0]) for p in prompts if p.messages}
    assert len(systems) == 1  # one system prompt for every conversation
    for c in range(3):
        turns = [prompts[t * 3 + c] for t in range(4)]
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert earlier.messages is not None and later.messages is not None and earlier.text and later.text
            # the next turn's request starts with the whole previous one, then a reply and a question
            assert later.messages[:len(earlier.messages)] == earlier.messages
            assert [m["role"] for m in later.messages[len(earlier.messages):]] == ["assistant", "user"]
            assert later.text.startswith(earlier.text.removesuffix("Assistant:"))
    assert len(prompts[0].messages[0]["content"].split()) == 40  # type: ignore[index]
    assert multi_turn_prompts(3, 4, 40, 5, 7, seed=1) == prompts  # the same seed, the same run
    shared = prefix_shared_prompts(4, system_len=30, user_len=6)
    assert len({orjson.dumps(p.messages) for p in shared}) == 4
    assert len({orjson.dumps(p.messages[0]) for p in shared if p.messages}) == 1


# ---------------------------------------------------------------- json-schema workload

def _openai_stream(pieces: list[str]) -> bytes:
    chunks = [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) + b"\n\n"
              for p in pieces]
    return b"".join(chunks) + b"data: [DONE]\n\n"


def test_json_schema_prompts_carry_response_format_and_a_validator() -> None:
    from realizar.loadtest.llm import JSON_SCHEMAS, LlmWorkload, json_schema_prompts

    prompts = json_schema_prompts(9, seed=3)
    assert [p.response_format["json_schema"]["name"] for p in prompts if p.response_format] == \
        [JSON_SCHEMAS[i % len(JSON_SCHEMAS)][0] for i in range(9)]
    assert len({p.text for p in prompts}) == 9  # distinct prompts
    for _, _, schema in JSON_SCHEMAS:  # bounded: a small model can finish every one
        for prop in schema["properties"].values():
            assert "enum" in prop or prop["type"] == "boolean" or "maxLength" in prop or "maximum" in prop
    spec = LlmWorkload("chat", "m", tuple(prompts), 64, ignore_eos=False).request(1)
    body = orjson.loads(spec.body or b"")
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == JSON_SCHEMAS[1][2]
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert spec.validate is prompts[1].validate and spec.validate is not None


def test_validator_tells_json_schema_mismatch_and_prose_apart() -> None:
    from realizar.loadtest.llm import JSON_SCHEMAS, make_validator
    from realizar.loadtest.workload import Validity

    schema = JSON_SCHEMAS[0][2]  # person: name (<= 20 chars), age 0..120, role enum
    check = make_validator(schema, check_schema=True)
    assert check('{"name": "Ann", "age": 30, "role": "admin"}') is Validity.VALID
    assert check(' {"name":"Ann","age":30,"role":"admin"}\n') is Validity.VALID
    assert check('{"name": "Ann", "age": 300, "role": "admin"}') is Validity.SCHEMA_MISMATCH
    assert check('{"name": "Ann", "age": 3, "role": "boss"}') is Validity.SCHEMA_MISMATCH
    assert check('{"name": "' + "n" * 21 + '", "age": 3, "role": "user"}') is Validity.SCHEMA_MISMATCH
    assert check('{"name": "Ann", "age": 3, "role": "user", "x": 1}') is Validity.SCHEMA_MISMATCH
    assert check('{"name": "Ann", "age": 3') is Validity.NOT_JSON  # cut short by max_tokens
    assert check("Sure! Here is a person: Ann, 30.") is Validity.NOT_JSON
    assert check("") is Validity.NOT_JSON
    # without jsonschema only the syntax is judged
    unchecked = make_validator(schema, check_schema=False)
    assert unchecked('{"name": "Ann", "age": 300}') is Validity.JSON_ONLY
    assert unchecked("prose") is Validity.NOT_JSON


def test_stream_keeps_its_text_only_when_judged() -> None:
    data = _openai_stream(['{"na', 'me": "A', '"}'])
    kept = StreamState(ResponseKind.SSE_OPENAI, keep_text=True)
    kept.feed(data[:17], 1.0)
    kept.feed(data[17:], 2.0)
    assert kept.done and kept.text == '{"name": "A"}' and kept.tokens == 3
    plain = StreamState(ResponseKind.SSE_OPENAI)
    plain.feed(data, 1.0)
    assert plain.tokens == 3 and plain.text == ""


def test_validity_accounting_counts_successful_responses_only() -> None:
    from realizar.loadtest.client import finish_body, new_stream
    from realizar.loadtest.llm import format_validity, json_schema_prompts, schema_validity
    from realizar.loadtest.runner import ScenarioResult
    from realizar.loadtest.stats import Collector, FailureClass, RequestRecord
    from realizar.loadtest.workload import RequestSpec, Validity

    prompts = json_schema_prompts(1)
    spec = RequestSpec("POST", "/v1/chat/completions", b"{}", ResponseKind.SSE_OPENAI, validate=prompts[0].validate)
    answers = [['{"name": "Bo", ', '"age": 7, "role": "guest"}'],  # valid
               ['{"name": "Bo", "age": -1, "role": "guest"}'],  # JSON, out of range
               ["I cannot ", "do that."],  # a server that ignored response_format
               ['{"name": "Bo"']]  # truncated by max_tokens
    collector = Collector()
    collector.start(0.0)
    for i, pieces in enumerate(answers):
        stream = new_stream(spec)
        assert stream is not None and stream.keep_text
        stream.feed(_openai_stream(pieces), 0.5)
        rec = RequestRecord(i, 0.0, 0.0, 1.0, status=200)
        finish_body(rec, spec, b"", stream, True)
        assert rec.ok
        collector.add(rec)
    # a failed request is a failure, not an invalid answer
    collector.add(RequestRecord(9, 0.0, 0.0, 1.0, status=500, failure=FailureClass.HTTP_5XX))
    assert collector.validity_counts() == {Validity.VALID.value: 1, Validity.JSON_ONLY.value: 0,
                                           Validity.SCHEMA_MISMATCH.value: 1, Validity.NOT_JSON.value: 2}
    result = ScenarioResult.__new__(ScenarioResult)
    result.overall_collector = collector
    v = schema_validity(result, schema_checked=True)
    assert (v["judged"], v["json"], v["valid"]) == (4, 2, 1)
    assert v["json_fraction"] == 0.5 and v["valid_fraction"] == 0.25
    text = format_validity(v)
    assert "Parse as JSON:" in text and "2 (50.0%)" in text and "1 (25.0%)" in text
    unchecked = format_validity(schema_validity(result, schema_checked=False))
    assert "not checked (jsonschema is not installed" in unchecked


def test_noop_server_answers_the_smallest_instance_of_each_schema() -> None:
    from realizar.loadtest.llm import JSON_SCHEMAS, make_validator
    from realizar.loadtest.noop_server import _schema_pieces
    from realizar.loadtest.workload import Validity

    for name, _, schema in JSON_SCHEMAS:
        pieces = _schema_pieces({"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": name, "schema": schema}}})
        assert pieces is not None
        assert make_validator(schema, check_schema=True)(b"".join(pieces).decode()) is Validity.VALID
    assert _schema_pieces({"response_format": {"type": "json_object"}}) is None
