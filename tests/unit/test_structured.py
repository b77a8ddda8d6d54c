"""Structured outputs: every constrained generation driven by random logits is valid, free rows are untouched.

Random logits (a seeded generator) make each step's pick a uniformly random token among those the grammar
allows, which walks the grammar far more widely than a model would. Strings and arrays in the schemas are
bounded so that such walks end within a few hundred steps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from realizar.structured import GrammarError, Matcher, StructuredCompiler, StructuredSpec, apply_masks
from realizar.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

MAX_STEPS = 2000  # random walks spend many steps in the (bounded) whitespace between JSON tokens
ROWS = 4  # constrained rows per schema, each with its own random walk, beside one free row


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the steps here are small, and on a busy machine two threads spend longer waiting
    for each other than working."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


def _s(max_length: int = 8, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": _s()}),
    _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"flag": {"type": "boolean"}, "nothing": {"type": "null"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"score": {"type": "number", "minimum": -1.5, "maximum": 2.5}}),
    _obj({"a": _s(), "b": {"type": "integer"}, "c": {"type": "boolean"}}, required=["a"]),
    _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": _s(6)})}),
    _obj({"tags": {"type": "array", "items": _s(5), "maxItems": 4}}),
    _obj({"points": {"type": "array", "items": _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": -9, "maximum": 9}}),
                     "minItems": 1, "maxItems": 3}}),
    _obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}, "maxItems": 3},
                     "maxItems": 3}}),
    _obj({"mixed": {"enum": ["a", 1, True, None, 2.5]}}),
    _obj({"const": {"const": "fixed-value"}, "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    _obj({"maybe": {"type": ["string", "null"], "maxLength": 6}}),
    _obj({"choice": {"anyOf": [_s(4), {"type": "integer", "minimum": 0, "maximum": 50}]}}),
    _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    _obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
         **{"$defs": {"point": _obj({"x": {"type": "number", "minimum": 0, "maximum": 1}})}}),
    _obj({"level1": _obj({"level2": _obj({"level3": _obj({"leaf": {"enum": ["x", "y"]}})})})}),
    _obj({"words": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 2, "maxItems": 5}, "count": {"type": "integer", "minimum": 2, "maximum": 5}}),
    _obj({"id": {"type": "integer", "minimum": 0, "maximum": 100000}, "name": _s(12),
          "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"},
          "address": _obj({"street": _s(10), "city": _s(8)}),
          "orders": {"type": "array", "maxItems": 2,
                     "items": _obj({"sku": _s(6), "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}},
         required=["id", "name", "role", "address"]),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 1, "maxItems": 6},
]


def drive(compiler: StructuredCompiler, tokenizer: Tokenizer, spec: StructuredSpec, seed: int,
          rows: int = ROWS) -> list[str]:
    """Generate ``rows`` outputs of ``spec`` at once, with a free row in the middle of the batch, by taking the
    argmax of random logits after the masks; returns each constrained row's text (EOS excluded)."""
    generator = torch.Generator().manual_seed(seed)
    matchers: list[Matcher | None] = [compiler.matcher(spec) for _ in range(rows)]
    free = rows // 2
    matchers.insert(free, None)
    outputs: list[list[int]] = [[] for _ in matchers]
    finished = [m is None for m in matchers]
    eos = set(tokenizer.eos_token_ids)
    for _ in range(MAX_STEPS):
        if all(finished):
            break
        logits = torch.randn(len(matchers), compiler.vocab_size, generator=generator)
        before = logits.clone()
        apply_masks(logits, [None if done else m for m, done in zip(matchers, finished, strict=True)])
        for i, done in enumerate(finished):
            if done:  # free rows and finished rows are not touched, bit for bit
                assert torch.equal(logits[i], before[i])
        for i, token in enumerate(logits.argmax(dim=-1).tolist()):
            matcher = matchers[i]
            if finished[i] or matcher is None:
                continue
            assert matcher.accept(token), f"a token its own mask allowed was refused: {matcher.error}"
            if token in eos:
                assert matcher.is_terminated()
                finished[i] = True
            else:
                outputs[i].append(token)
    assert all(finished), f"{spec.kind} did not finish within {MAX_STEPS} steps"
    return [tokenizer.decode(out) for i, out in enumerate(outputs) if i != free]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_are_valid(compiler: StructuredCompiler, tokenizer: Tokenizer, index: int) -> None:
    schema = SCHEMAS[index]
    jsonschema.Draft202012Validator.check_schema(schema)
    for text in drive(compiler, tokenizer, StructuredSpec.json_schema(schema), seed=index):
        jsonschema.validate(json.loads(text), schema)


def test_twenty_schemas() -> None:
    assert len(SCHEMAS) == 20


REGEXES = [
    r"[a-z]{3}-[0-9]{2,4}",
    r"(yes|no|maybe)",
    r"\d{4}-\d{2}-\d{2}",
    r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}",
    r"(0|[1-9][0-9]{0,3})\.[0-9]{1,2}",
    r"[^\n\"]{1,12}!",
    r"(ab|cd)+x",  # unbounded repetition; ends because 'x' is allowed after every pair
]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_match(compiler: StructuredCompiler, tokenizer: Tokenizer, pattern: str) -> None:
    for text in drive(compiler, tokenizer, StructuredSpec.regex(pattern), seed=len(pattern)):
        assert re.fullmatch(pattern, text), text


CHOICES = [
    ["yes", "no"],
    ["a", "ab", "abc"],  # one choice a prefix of another: EOS and more text are both allowed after "a"
    ['he said "hi"', "back\\slash", "new\nline", "naïve café 😀", "x|y.*"],
    ["positive", "negative", "neutral", "mixed"],
]


@pytest.mark.parametrize("choices", CHOICES)
def test_choice_outputs_are_one_of(compiler: StructuredCompiler, tokenizer: Tokenizer, choices: list[str]) -> None:
    seen = set()
    for seed in range(3):
        for text in drive(compiler, tokenizer, StructuredSpec.choice(choices), seed=seed):
            assert text in choices
            seen.add(text)
    assert seen  # at least one walk produced something, and all of them a choice


def _balanced(text: str) -> bool:
    return bool(re.fullmatch(r"[()0-9]+", text)) and _depths_ok(text)


def _depths_ok(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0 and text.startswith("(")


@pytest.mark.parametrize("grammar", [
    'start: "(" inner ")"\ninner: /[0-9]{1,3}/ | start',  # Lark
    'root ::= "(" inner ")"\ninner ::= [0-9] [0-9]? | root',  # GBNF, as llama.cpp writes it
])
def test_grammar_outputs_parse(compiler: StructuredCompiler, tokenizer: Tokenizer, grammar: str) -> None:
    for text in drive(compiler, tokenizer, StructuredSpec.grammar(grammar), seed=7):
        assert _balanced(text), text


def test_json_object_accepts_json_in_any_layout(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    spec = StructuredSpec.json_object()
    for text in ['{"a":1}', '{\n  "a": [1, 2.5, {"b": null}],\n  "c": "d"\n}', '{}']:
        matcher = compiler.matcher(spec)
        for token in tokenizer.encode(text, add_special_tokens=False):
            assert matcher.accept(token), (text, matcher.error)
        assert matcher.allowed_eos()
        assert matcher.accept(tokenizer.eos_token_ids[0])
    for text in ['[1, 2]', '"text"', '{"a": }', '{"a":' + " " * 41 + '1}']:  # not objects, not JSON, runaway space
        matcher = compiler.matcher(spec)
        ok = all(matcher.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))
        assert not (ok and matcher.allowed_eos()), text


def test_json_object_random_walk_stays_valid(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    """Any JSON object is unbounded, so a random walk need not end; every step's token is still accepted."""
    generator = torch.Generator().manual_seed(3)
    matcher = compiler.matcher(StructuredSpec.json_object())
    taken = []
    for _ in range(150):
        logits = torch.randn(1, compiler.vocab_size, generator=generator)
        apply_masks(logits, [matcher])
        token = int(logits.argmax())
        assert matcher.accept(token), matcher.error
        if matcher.is_terminated():
            break
        taken.append(token)
    assert tokenizer.decode(taken).startswith("{")


def test_mask_after_completion_allows_only_eos(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(StructuredSpec.choice(["yes"]))
    for token in tokenizer.encode("yes", add_special_tokens=False):
        assert matcher.accept(token)
    assert matcher.allowed_eos() and matcher.is_terminated()
    logits = torch.zeros(1, compiler.vocab_size)
    apply_masks(logits, [matcher])
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == sorted(tokenizer.eos_token_ids)


def test_refused_token_reports_an_error(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(StructuredSpec.regex("[0-9]+"))
    assert not matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert matcher.error and "grammar" in matcher.error


def test_special_tokens_are_never_allowed_as_text(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(StructuredSpec.regex(".{1,20}"))
    logits = torch.zeros(1, compiler.vocab_size)
    apply_masks(logits, [matcher])
    allowed = set(torch.isfinite(logits[0]).nonzero().view(-1).tolist())
    special = {i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)}
    assert allowed and not (allowed & special)


@pytest.mark.parametrize(("spec", "fragment"), [
    (lambda: StructuredSpec.regex("a(b"), "unclosed group"),
    (lambda: StructuredSpec.json_schema({"type": "foo"}), "Invalid type: foo"),
    (lambda: StructuredSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}),
     "/$defs/nope"),
    (lambda: StructuredSpec.json_schema({"type": "string", "format": "weird"}), "Unknown format"),
    (lambda: StructuredSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),  # unsupported
    (lambda: StructuredSpec.json_schema("{not json"), "not valid JSON"),
    (lambda: StructuredSpec.json_schema([1, 2]), "must be an object"),
    (lambda: StructuredSpec.grammar('start: "a" missing_rule'), "missing_rule"),
    (lambda: StructuredSpec.grammar("root ::= undefined_rule"), "undefined_rule"),
    (lambda: StructuredSpec.grammar("   "), "must not be empty"),
    (lambda: StructuredSpec.choice([]), "non-empty"),
    (lambda: StructuredSpec.choice("yes"), "list of strings"),
    (lambda: StructuredSpec.choice(["a", 1]), "only strings"),  # type: ignore[list-item]
    (lambda: StructuredSpec("xml", "x"), "unknown structured output kind"),  # type: ignore[arg-type]
])
def test_bad_specs_raise_grammar_error(compiler: StructuredCompiler, spec: Any, fragment: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(fragment)) as caught:
        compiler.compile(spec())
    assert isinstance(caught.value, ValueError)


def test_non_strict_schema_ignores_unimplemented_keywords(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3, "uniqueItems": True}
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.compile(StructuredSpec.json_schema(schema))
    for text in drive(compiler, tokenizer, StructuredSpec.json_schema(schema, strict=False), seed=1):
        value = json.loads(text)  # the keywords it implements still hold
        assert isinstance(value, list) and len(value) <= 3 and set(value) <= {"a", "b"}


def test_compile_is_cached_by_spec(compiler: StructuredCompiler) -> None:
    a = compiler.compile(StructuredSpec.json_schema({"type": "object", "properties": {"k": {"type": "integer"}}}))
    b = compiler.compile(StructuredSpec.json_schema('{"properties": {"k": {"type": "integer"}}, "type": "object"}'))
    assert a is b  # the same schema spelled with other key order and spacing
    assert compiler.compile(StructuredSpec.regex("k+")) is not a
    first, second = a.matcher(), a.matcher()
    assert first.accept(first_token := _token(compiler, "{"))
    assert second.accept(first_token)  # matchers of one grammar advance independently


def _token(compiler: StructuredCompiler, text: str) -> int:
    matcher = compiler.matcher(StructuredSpec.regex(re.escape(text)))
    logits = torch.zeros(1, compiler.vocab_size)
    apply_masks(logits, [matcher])
    return int(torch.isfinite(logits[0]).nonzero()[0])


def test_wider_logits_mask_the_extra_ids_of_constrained_rows_only(tokenizer: Tokenizer) -> None:
    padded = StructuredCompiler.from_tokenizer(tokenizer, vocab_size=tokenizer.vocab_size + 77)
    assert padded.vocab_size == tokenizer.vocab_size + 77
    for width in (padded.vocab_size, padded.vocab_size + 40):  # logits as wide as the model's, or wider still
        logits = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
        before = logits.clone()
        apply_masks(logits, [padded.matcher(StructuredSpec.regex(".{1,5}")), None, None])
        assert torch.isinf(logits[0, tokenizer.vocab_size:]).all()
        assert torch.isfinite(logits[0, :tokenizer.vocab_size]).any()
        assert torch.equal(logits[1:], before[1:])
    with pytest.raises(ValueError, match="fewer than"):
        apply_masks(torch.zeros(1, tokenizer.vocab_size), [padded.matcher(StructuredSpec.regex("a"))])


def test_masks_follow_the_logits_dtype(compiler: StructuredCompiler) -> None:
    logits = torch.zeros(2, compiler.vocab_size, dtype=torch.bfloat16)
    apply_masks(logits, [None, compiler.matcher(StructuredSpec.choice(["yes", "no"]))])
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits[0], torch.zeros(compiler.vocab_size, dtype=torch.bfloat16))
    assert 0 < int(torch.isfinite(logits[1]).sum()) < 10


def test_all_free_rows_is_a_no_op(compiler: StructuredCompiler) -> None:
    logits = torch.randn(4, compiler.vocab_size)
    before = logits.clone()
    apply_masks(logits, [None] * 4)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="one matcher"):
        apply_masks(logits, [None] * 3)


def test_compile_from_many_threads(compiler: StructuredCompiler, tokenizer: Tokenizer) -> None:
    """The server compiles to validate while the engine compiles to make matchers: the cache is shared."""
    specs = [StructuredSpec.regex(f"t{i}[0-9]{{2}}") for i in range(4)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        compiled = list(pool.map(lambda k: compiler.compile(specs[k % 4]), range(32)))
    for k, grammar in enumerate(compiled):
        assert grammar is compiler.compile(specs[k % 4])
    text = drive(compiler, tokenizer, specs[2], seed=0, rows=1)[0]
    assert re.fullmatch(r"t2[0-9]{2}", text)
