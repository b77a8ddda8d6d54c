"""Every ctypes binding of ``realizar.kernels`` against the C prototype it calls.

ctypes trusts the declared argtypes and restype: a C parameter changed from ``int`` to
``int64_t``, or one added, with the Python binding left behind, passes garbage without an error.
This test reads the prototypes out of the C sources and the header with a regex, maps their C
types to ctypes, and compares them with what ``CpuKernels`` bound, so such drift fails here."""

from __future__ import annotations

import ctypes
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from realizar import kernels

# C types by their words with const dropped; every pointer is passed as a void pointer
C_TYPES: dict[str, Any] = {
    "void": None, "int": ctypes.c_int, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
    "uint8_t": ctypes.c_uint8, "size_t": ctypes.c_size_t, "float": ctypes.c_float, "double": ctypes.c_double,
}
PROTOTYPE = re.compile(
    r"^(?P<ret>[A-Za-z_][\w \t]*?[\s*]+)(?P<name>realizar_\w+)\s*\((?P<args>[^)]*)\)\s*[{;]", re.MULTILINE)
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
BOUND = re.compile(r"""bind\(\s*["'](realizar_\w+)["']""")


def c_type(decl: str) -> Any:
    """The ctypes type of a C declaration without its name (``const int64_t *``, ``float``)."""
    if "*" in decl:
        return ctypes.c_void_p
    words = [w for w in decl.split() if w != "const"]
    key = " ".join(words)
    if key not in C_TYPES:
        raise ValueError(f"no ctypes mapping for the C type {decl!r}")
    return C_TYPES[key]


def parameter_type(param: str) -> Any:
    """The ctypes type of one C parameter (``const float *q_all``, ``int64_t ld``)."""
    param = param.strip()
    if "*" in param:
        return ctypes.c_void_p
    return c_type(param.rsplit(None, 1)[0])  # the last word is the parameter's name


Prototype = tuple[str, list[str]]  # the return type and the parameters, as C spells them


def prototypes(text: str) -> dict[str, Prototype]:
    """Every non-static ``realizar_*`` function declared or defined in C source ``text``."""
    found: dict[str, Prototype] = {}
    for m in PROTOTYPE.finditer(COMMENT.sub("", text)):
        ret = " ".join(m.group("ret").split())
        if {"static", "typedef"} & set(ret.split()):
            continue
        args = " ".join(m.group("args").split())
        found[m.group("name")] = (ret, [] if args in ("", "void") else [a.strip() for a in args.split(",")])
    return found


def signature(prototype: Prototype) -> tuple[Any, list[Any]]:
    """``(restype, argtypes)`` in ctypes of a C prototype."""
    ret, params = prototype
    return c_type(ret), [parameter_type(p) for p in params]


def spelled_types(prototype: Prototype) -> list[str]:
    """The C types of a prototype without the parameters' names: ``["int", "const float *", ...]``."""
    ret, params = prototype
    types = [p[: p.rindex("*") + 1] if "*" in p else p.rsplit(None, 1)[0] for p in params]
    return [" ".join(t.replace("*", " * ").split()) for t in [ret, *types]]


def c_prototypes() -> dict[str, Prototype]:
    """The prototypes of every kernel source and the header; a function declared twice must agree."""
    merged: dict[str, Prototype] = {}
    for path in [*kernels.HEADERS, *kernels.SOURCES]:
        for name, proto in prototypes(path.read_text()).items():
            # parameter names may differ between a declaration and the definition; types may not
            assert name not in merged or spelled_types(merged[name]) == spelled_types(proto), \
                f"{name} is declared two ways ({path.name})"
            merged.setdefault(name, proto)
    return merged


@pytest.fixture(scope="module")
def bound() -> dict[str, Any]:
    """The ctypes functions ``CpuKernels`` bound, by C name."""
    compiled = kernels.load()
    if compiled is None:
        if not kernels.enabled():
            pytest.skip("the kernels are switched off (REALIZAR_KERNELS=0)")
        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), "the kernels failed to build"
        pytest.skip("no C compiler: the kernels are not built here")
    return {fn.__name__: fn for fn in vars(compiled).values()
            if hasattr(fn, "argtypes") and hasattr(fn, "restype") and hasattr(fn, "__name__")}


def test_every_binding_matches_its_c_prototype(bound: dict[str, Any]) -> None:
    protos = c_prototypes()
    # the bindings the Python source declares are the ones found on the object (none missed)
    declared = set(BOUND.findall(Path(kernels.__file__).read_text()))
    assert declared and set(bound) == declared
    for name, fn in sorted(bound.items()):
        assert name in protos, f"{name} is bound but has no prototype in the kernel sources"
        restype, argtypes = signature(protos[name])
        assert fn.restype is restype, f"{name}: ctypes restype {fn.restype}, C returns {restype}"
        assert list(fn.argtypes) == argtypes, f"{name}: ctypes argtypes {fn.argtypes}, C takes {argtypes}"


def test_the_parser_reads_multiline_prototypes_and_skips_static_and_comments() -> None:
    text = textwrap.dedent("""
    /* int realizar_in_a_comment(int x); */
    static inline int realizar_private(int x) { return x; }
    typedef void (*realizar_task)(const void *arg, int64_t unit);
    int realizar_attention(
        const float *q,   /* [R, H, hd] */
        int64_t stride,   // row stride
        float scale)
    {
    int64_t realizar_threads(void);
    """)
    found = prototypes(text)
    assert set(found) == {"realizar_attention", "realizar_threads"}
    assert signature(found["realizar_attention"]) == (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float])
    assert signature(found["realizar_threads"]) == (ctypes.c_int64, [])


def test_a_drifted_parameter_no_longer_matches(bound: dict[str, Any]) -> None:
    """The comparison catches the drift it exists for: one parameter's width changed in C."""
    source = Path(kernels.__file__).with_name("pointwise.c").read_text()
    drifted = source.replace("int64_t T, int64_t D, float eps", "int T, int64_t D, float eps")
    assert drifted != source, "the rms_norm prototype changed: update this test's edit"
    _restype, argtypes = signature(prototypes(drifted)["realizar_rms_norm"])
    assert list(bound["realizar_rms_norm"].argtypes) != argtypes
    assert list(bound["realizar_rms_norm"].argtypes) == signature(prototypes(source)["realizar_rms_norm"])[1]


def test_an_unknown_c_type_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="no ctypes mapping"):
        signature(prototypes("long double realizar_odd(int x);")["realizar_odd"])
