"""csrc/kernels.h is the kernels' interface, written once: the formats and every function the
library exports. kernels.py binds the ones marked LS_API from its SIGNATURES table; these tests
hold the table, the sources and the built library to what the header says."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from llamascope import decode_step, kernels
from llamascope.errors import LlamascopeError
from llamascope.formats import KEPT_FORMATS
from llamascope.layers import LAYOUTS

# C type (a value, not a pointer) -> its ctypes type; "void" only as a return type
CTYPES = {
    "void": None,
    "int": ctypes.c_int,
    "int64_t": ctypes.c_int64,
    "float": ctypes.c_float,
    "uint8_t": ctypes.c_uint8,
    "uint16_t": ctypes.c_uint16,
}
POINTER = "pointer"  # every pointer crosses as a c_void_p


@dataclass(frozen=True)
class Prototype:
    name: str
    python: bool  # marked LS_API: Python calls it
    returns: str  # a CTYPES key or POINTER
    args: tuple[str, ...]


def without_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.DOTALL)


def c_type(declaration: str) -> str:
    """`const float *const *kcache` -> POINTER, `int64_t stride` -> "int64_t", `void` -> "void"."""
    if "*" in declaration:
        return POINTER
    words = [word for word in declaration.split() if word != "const"]
    ctype = words[0] if len(words) == 1 else " ".join(words[:-1])  # (a lone word is a type without a name)
    assert ctype in CTYPES, f"a C type this test does not map to ctypes: {declaration!r}"
    return ctype


def parse_prototypes(header: str) -> dict[str, Prototype]:
    """Every function prototype `[LS_API] ret name(args);` at the top level of a header."""
    text = without_comments(header)
    text = re.sub(r"^\s*#.*$", " ", text, flags=re.MULTILINE)  # preprocessor lines
    text = re.sub(r"\b(?:typedef\s+)?(?:struct|enum)\b[^{;]*\{.*?\}[^;]*;", " ", text, flags=re.DOTALL)  # types
    prototypes = {}
    for statement in text.split(";"):
        statement = " ".join(statement.split())
        if not statement:
            continue
        match = re.fullmatch(r"(LS_API )?(.+?)\s*\b(\w+) ?\((.*)\)", statement)
        assert match, f"not a prototype: {statement!r}"
        api, returns, name, args = match.groups()
        arg_types = () if args.strip() == "void" else tuple(c_type(arg) for arg in args.split(","))
        assert name not in prototypes, f"{name} declared twice"
        prototypes[name] = Prototype(name, api is not None, c_type(returns), arg_types)
    return prototypes


def as_ctypes(ctype: str):
    return ctypes.c_void_p if ctype == POINTER else CTYPES[ctype]


@pytest.fixture(scope="module")
def prototypes() -> dict[str, Prototype]:
    return parse_prototypes(kernels.HEADER.read_text())


def test_the_parser_reads_each_kind_of_declaration():
    sample = """
    #define LS_API /* python */
    enum ls_example { A = 0, B = 1 };
    typedef struct { int kind; const void *w; } ls_thing_t;
    /* a comment; with a semicolon */
    LS_API int f(int qtype, const uint8_t *w, int64_t n, float eps, float *const *caches, const ls_thing_t *s);
    void g(const float *x,
           int rows);
    LS_API void h(void);
    """
    assert parse_prototypes(sample) == {
        "f": Prototype("f", True, "int", ("int", POINTER, "int64_t", "float", POINTER, POINTER)),
        "g": Prototype("g", False, "void", (POINTER, "int")),
        "h": Prototype("h", True, "void", ()),
    }


def test_the_header_declares_the_kernels(prototypes):
    assert prototypes["decode_step_f32"] == Prototype(
        "decode_step_f32", True, "int", (POINTER, "int", *[POINTER] * 7, "int", POINTER, "int")
    )
    assert not prototypes["quantize_act_q8"].python  # (called only from gemv.c and kquant.c)


def test_the_bindings_are_the_python_facing_prototypes(prototypes):
    python_facing = {name for name, prototype in prototypes.items() if prototype.python}
    assert set(kernels.SIGNATURES) == python_facing


def test_each_binding_has_its_prototypes_types(prototypes):
    wrong = []
    for name, (restype, argtypes) in kernels.SIGNATURES.items():
        prototype = prototypes[name]
        if restype is not as_ctypes(prototype.returns):
            wrong.append(f"{name} returns {prototype.returns}, bound as {restype}")
        if len(argtypes) != len(prototype.args):
            wrong.append(f"{name} takes {len(prototype.args)} arguments, bound with {len(argtypes)}")
            continue
        for position, (bound, declared) in enumerate(zip(argtypes, prototype.args)):
            if bound is not as_ctypes(declared):
                wrong.append(f"{name} argument {position}: {declared}, bound as {bound.__name__}")
    assert not wrong, "\n".join(wrong)


def test_every_declared_function_is_defined_once_in_the_sources(prototypes):
    sources = {path.name: without_comments(path.read_text()) for path in kernels.SOURCES}
    for name in prototypes:
        # a definition: the name at the start of a line's declaration, its parameters, then a body
        definition = re.compile(rf"^(?!static)\w[\w\s*]*\b{name}\s*\([^;{{}}]*\)\s*\{{", re.MULTILINE)
        defined_in = [file for file, text in sources.items() if definition.search(text)]
        assert len(defined_in) == 1, f"{name} is defined in {defined_in or 'no source'}"


def test_the_enums_read_from_the_header():
    formats = kernels.header_enum("ls_format")
    assert list(formats.values()) == list(range(len(formats)))
    # every block format the layers keep, and the float ones, has its code
    for name in ["F32", "BF16", *sorted(KEPT_FORMATS)]:
        assert kernels.format_code(name) == formats["LS_" + name]
    assert kernels.layout_code("rows") == 0 and kernels.layout_code("packed") == 1
    assert {name.removeprefix("LS_LAYOUT_").lower() for name in kernels.header_enum("ls_layout")} == set(LAYOUTS)
    with pytest.raises(LlamascopeError, match="no enum 'ls_nothing'"):
        kernels.header_enum("ls_nothing")
    with pytest.raises(LlamascopeError, match="no weight format 'Q5_1'"):
        kernels.format_code("Q5_1")


def test_the_decode_step_structs_mirror_the_header():
    """decode_step.py's ctypes structs have kernels.h's fields, in its order."""
    text = re.sub(r"/\*.*?\*/", "", kernels.HEADER.read_text(), flags=re.DOTALL)
    for struct, mirror in (
        ("ls_linear_t", decode_step._Linear),
        ("ls_layer_t", decode_step._Layer),
        ("ls_stack_t", decode_step._Stack),
    ):
        body = re.search(r"typedef struct \{([^{}]*)\}\s*" + struct + ";", text).group(1)
        names = []
        for declaration in filter(None, (part.strip() for part in body.split(";"))):
            for item in declaration.split(","):
                names.append(re.sub(r"\[.*?\]", "", item).replace("*", " ").split()[-1])
        assert names == [field for field, _ in mirror._fields_], struct


def test_header_enum_counts_on_from_the_last_value(tmp_path, monkeypatch):
    header = tmp_path / "kernels.h"
    header.write_text("enum ls_x {\n    A = 2, /* two */\n    B,\n    C = 0x10,\n    D,\n};\nenum ls_y { E };\n")
    monkeypatch.setattr(kernels, "HEADER", header)
    kernels._header_enums.cache_clear()
    try:
        assert kernels.header_enum("ls_x") == {"A": 2, "B": 3, "C": 16, "D": 17}
        assert kernels.header_enum("ls_y") == {"E": 0}
    finally:
        kernels._header_enums.cache_clear()


def test_the_header_is_part_of_the_build():
    assert kernels.HEADER in kernels.HEADERS  # (so the library is rebuilt when it changes)
    assert "-Wmissing-prototypes" in kernels.BUILDS["avx2"][1] and "-Wmissing-prototypes" in kernels.BUILDS["avx512"][1]


@pytest.mark.parametrize(
    "build, extra", [("avx512", ["-mavx512bf16"]), ("avx512", []), ("avx2", [])], ids=["avx512-bf16", "avx512", "avx2"]
)
def test_each_build_compiles_without_warnings(tmp_path, build, extra):
    """-Wall -Wextra and -Wmissing-prototypes (an exported function kernels.h does not declare) as errors."""
    kernels.compile_library(tmp_path / "kernels.so", kernels.BUILDS[build][1] + extra + ["-Werror"])


needs_library = pytest.mark.skipif(kernels.load() is None, reason="native kernels unavailable on this machine")


@needs_library
def test_the_loaded_library_has_every_declared_function(prototypes):
    lib = kernels.load()
    assert [name for name in prototypes if not hasattr(lib, name)] == []


@needs_library
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_the_library_exports_exactly_the_declared_functions(prototypes):
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(kernels.library_path(kernels.load().build))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exported = {fields[2] for fields in map(str.split, listing.splitlines()) if len(fields) == 3 and fields[1] == "T"}
    assert exported == set(prototypes)
