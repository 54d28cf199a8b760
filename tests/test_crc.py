"""CRC32C: the engine's C implementations against the `crc32c` package and the published vectors."""

from __future__ import annotations

import platform
import random
from typing import Callable, List, Tuple

import crc32c
import pytest

from qlog._log import pure as _pure
from qlog._log._qlog_c import ffi, lib

# RFC 3720 (iSCSI), appendix B.4, plus the check value of the Castagnoli CRC.
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
]


def _c(fn: Callable[..., int]) -> Callable[[int, bytearray, int, int], int]:
    """Call a C CRC on buf[off:off+n] in place (the pointer keeps the offset's alignment)."""

    def call(crc: int, buf: bytearray, off: int, n: int) -> int:
        return fn(crc, ffi.from_buffer(buf) + off, n)

    return call


IMPLS = {
    "dispatch": _c(lib.qlog_crc32c),
    "portable": _c(lib.qlog_crc32c_portable),
}


def _cpu_has_crc32c_instruction() -> bool:
    with open("/proc/cpuinfo") as f:
        words = set(f.read().split())
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        return "sse4_2" in words
    if machine in ("aarch64", "arm64"):
        return "crc32" in words
    return False


def test_hardware_crc_is_used_exactly_when_the_cpu_has_the_instruction() -> None:
    assert lib.qlog_crc32c_hw() == int(_cpu_has_crc32c_instruction())


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("data,expected", VECTORS, ids=[hex(crc) for _, crc in VECTORS])
def test_published_vectors(impl: str, data: bytes, expected: int) -> None:
    buf = bytearray(data)
    assert IMPLS[impl](0, buf, 0, len(buf)) == expected
    assert crc32c.crc32c(data) == expected
    assert _pure.crc32c(data) == expected


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_every_length_up_to_4096_matches_the_crc32c_package_at_every_alignment(impl: str) -> None:
    rng = random.Random(3720)
    buf = bytearray(rng.randbytes(4096 + 8))
    fn = IMPLS[impl]
    cases = [(n % 8, n) for n in range(4097)]  # every length, the 8 alignments in turn
    cases += [(off, n) for off in range(8) for n in (0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 4095)]
    bad: List[Tuple[int, int]] = [
        (off, n) for off, n in cases if fn(0, buf, off, n) != crc32c.crc32c(bytes(buf[off:off + n]))
    ]
    assert bad == []


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_chained_computation_equals_one_pass(impl: str) -> None:
    rng = random.Random(17)
    fn = IMPLS[impl]
    for _ in range(300):
        data = bytearray(rng.randbytes(rng.randrange(0, 3000)))
        cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(1, 5)))
        crc, start = 0, 0
        for cut in cuts + [len(data)]:
            crc = fn(crc, data, start, cut - start)
            start = cut
        assert crc == crc32c.crc32c(bytes(data))
        head = bytes(data[: cuts[0]])
        assert fn(crc32c.crc32c(head), data, cuts[0], len(data) - cuts[0]) == crc


def test_dispatch_and_portable_agree_on_large_unaligned_buffers() -> None:
    rng = random.Random(99)
    buf = bytearray(rng.randbytes(1 << 20))
    for off in range(8):
        n = len(buf) - off - rng.randrange(0, 8)
        want = crc32c.crc32c(bytes(buf[off:off + n]))
        assert IMPLS["dispatch"](0, buf, off, n) == want
        assert IMPLS["portable"](0, buf, off, n) == want


EDGE_CRCS = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, _pure.CRC_MASK_DELTA, 0xE3069283]


def test_masking_follows_the_documented_formula() -> None:
    rng = random.Random(5)
    for crc in EDGE_CRCS + [rng.getrandbits(32) for _ in range(2000)]:
        want = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
        assert lib.qlog_crc_mask(crc) == want
        assert _pure.mask_crc(crc) == want
    assert lib.qlog_crc_mask(0) == 0xA282EAD8


def test_unmask_undoes_mask() -> None:
    rng = random.Random(6)
    for crc in EDGE_CRCS + [rng.getrandbits(32) for _ in range(2000)]:
        assert lib.qlog_crc_unmask(lib.qlog_crc_mask(crc)) == crc
        assert _pure.unmask_crc(_pure.mask_crc(crc)) == crc
        assert lib.qlog_crc_unmask(crc) == _pure.unmask_crc(crc)

