"""What the Ascend C device sources may contain: rules the real device compiler imposes that
neither the twin nor CANN's CPU-debug mode (which compiles kernels with the host's full libstdc++)
would catch.

- ``ascendc_library`` also runs a host pass over the kernel sources, so the include graph of a
  kernel entry file must not reach the host Matmul tiling API (``tiling/tiling_api.h``,
  ``tiling/platform/platform_ascendc.h``) or our host-only tiling halves (``*_tiling_host.h``).
- Device code has no ``<initializer_list>`` (the real device headers never pull it in), so a
  range-for over a braced list does not compile there.
- Every function that device code calls must be ``__aicore__``: a function defined in a header
  the kernels include (kernel headers and the device halves of the tilings) is device code.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.twin_build import INCLUDES, needs_gxx

REPO = Path(__file__).resolve().parents[1]
ASCEND = REPO / "csrc" / "ascend"
ENTRY_FILES = sorted(ASCEND.glob("*.cpp"))
# Headers beside the entry files that device code includes (host-only halves excluded).
DEVICE_HEADERS = sorted(p for p in ASCEND.glob("*.h") if not p.name.endswith("_host.h"))
HOST_ONLY_HEADERS = ("tiling_api.h", "platform_ascendc.h")

BRACED_RANGE_FOR = re.compile(r"for\s*\([^;()]*:\s*\{")
# A function definition: `inline` (or a template's return type) ... name(args) ... `{`, at the
# start of a line. Counted when it lacks __aicore__.
FUNCTION_DEFINITION = re.compile(
    r"^\s*(?:template\s*<[^>]*>\s*)?(?:static\s+)?(?:constexpr\s+)?inline\s+[^;{=]*\([^;{]*\)[^;{]*\{",
    re.MULTILINE,
)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def test_there_are_kernel_entry_files_and_device_headers() -> None:
    assert {p.stem for p in ENTRY_FILES} >= {
        "sparse_kd_epilogue",
        "packed_attention_fwd",
        "packed_attention_bwd",
    }
    assert any(p.name == "kernel_entry.h" for p in DEVICE_HEADERS)


@needs_gxx
@pytest.mark.parametrize("entry", ENTRY_FILES, ids=lambda p: p.stem)
def test_kernel_include_graph_has_no_host_only_header(entry: Path) -> None:
    # Without __CCE_AICORE__, as the host pass of ascendc_library compiles the kernel sources.
    command = ["g++", "-std=c++17", "-M", "-MG"]
    for include in INCLUDES:
        command += ["-I", str(include)]
    result = subprocess.run(
        [*command, str(entry)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    included = result.stdout.replace("\\\n", " ").split()
    offending = [
        path
        for path in included
        if Path(path).name in HOST_ONLY_HEADERS or Path(path).name.endswith("_tiling_host.h")
    ]
    assert not offending, f"{entry.name} reaches host-only headers: {offending}"


@pytest.mark.parametrize("source", ENTRY_FILES + DEVICE_HEADERS, ids=lambda p: p.name)
def test_no_range_for_over_a_braced_list(source: Path) -> None:
    text = _strip_comments(source.read_text())
    found = BRACED_RANGE_FOR.findall(text)
    assert not found, f"{source.name}: range-for over a braced list (needs <initializer_list>)"


@pytest.mark.parametrize("source", ENTRY_FILES + DEVICE_HEADERS, ids=lambda p: p.name)
def test_every_device_function_is_aicore(source: Path) -> None:
    text = _strip_comments(source.read_text())
    missing = [
        " ".join(match.group(0).split())[:120]
        for match in FUNCTION_DEFINITION.finditer(text)
        if "__aicore__" not in match.group(0)
    ]
    assert not missing, f"{source.name}: functions without __aicore__: {missing}"


def test_the_rules_catch_what_they_are_for(tmp_path: Path) -> None:
    # The patterns themselves, on the two bugs they exist for.
    bad = "inline uint32_t Bytes(uint32_t n) { return n; }\nfor (Pass p : {A, B}) {}\n"
    assert BRACED_RANGE_FOR.search(bad)
    assert [m for m in FUNCTION_DEFINITION.finditer(bad) if "__aicore__" not in m.group(0)]
    good = "__aicore__ inline uint32_t Bytes(uint32_t n) { return n; }\n"
    assert not [m for m in FUNCTION_DEFINITION.finditer(good) if "__aicore__" not in m.group(0)]
