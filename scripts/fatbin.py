#!/usr/bin/env python3
"""The CUDA fat binary inside an ELF library (section `.nv_fatbin`), parsed and trimmed: scripts/gpu_libs.py's
`trim`, apart so that the format lives in one place.

Fat binary layout (little-endian; as nvcc writes it and the CUDA driver reads it):
  container  u32 magic 0xBA55ED50, u16 version (1), u16 header size (16), u64 size of the entries that follow;
             containers follow one another, with zero bytes between them at most
  entry      u16 kind (1 = PTX, 2 = ELF cubin), u16 version, u32 header size (>= 64), u64 padded payload size,
             u32 payload size (<= padded), u32, u16 minor, u16 major, u32 SM (e.g. 90 = sm_90, 120 = sm_120), ...;
             the payload (compressed or not) follows the header; the next entry follows the padded payload

Which entry the driver loads, per container, on a GPU of compute capability `sm` (CUDA's binary compatibility
rules): the cubin of the newest SM with the GPU's major version not newer than the GPU (an sm_80 cubin runs on
sm_86; the arch-specific sm_90a cubins carry SM 90 here); when there is none, the newest PTX not newer than the GPU,
JIT-compiled. So an entry is kept when its SM is in the keep list (any kind) or the driver would load it on a kept
SM; every other entry is zeroed. A container with no entry for a kept SM is one that GPU cannot use in the
untrimmed library either; the trim refuses only when no container at all has one (a keep list the wheel lacks).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import defaultdict

CONTAINER_MAGIC = 0xBA55ED50
CONTAINER_HEADER = 16
ENTRY_HEADER_MIN = 64
KIND_PTX = 1
KIND_CUBIN = 2
KIND_NAMES = {KIND_PTX: "ptx", KIND_CUBIN: "cubin"}
SECTION = ".nv_fatbin"


class FatbinError(Exception):
    """A fat binary (or ELF) that is not what the trim expects; the message names the file, the offset and the value."""


class Entry:
    __slots__ = ("offset", "kind", "header_size", "padded_size", "payload_size", "sm")

    def __init__(self, offset, kind, header_size, padded_size, payload_size, sm):
        self.offset, self.kind, self.header_size = offset, kind, header_size
        self.padded_size, self.payload_size, self.sm = padded_size, payload_size, sm

    @property
    def payload_start(self):
        return self.offset + self.header_size

    @property
    def payload_end(self):
        return self.offset + self.header_size + self.padded_size

    def label(self):
        return f"{KIND_NAMES[self.kind]} sm_{self.sm}"


def parse_sm_list(text):
    """'90' / '80,90' / 'sm_80,sm_90' -> sorted unique ints; refuses anything else by name."""
    out = set()
    for part in text.split(","):
        p = part.strip().lower()
        if p.startswith("sm_"):
            p = p[3:]
        if not p.isdigit() or not 10 <= int(p) <= 999:
            raise ValueError(f"SM list {text!r}: {part!r} is not a compute capability like 80 or sm_90")
        out.add(int(p))
    if not out:
        raise ValueError(f"SM list {text!r} is empty")
    return sorted(out)


def parse_containers(buf, start, end, what):
    """Containers in buf[start:end] as a list of lists of Entry; refuses malformed headers, naming the offset."""
    containers = []
    p = start
    while p < end:
        if buf[p] == 0:  # zero padding between containers (alignment), or after the last one
            q = p
            while q < end and buf[q] == 0:
                q += 1
            if q == end:
                break
            p = q
        if end - p < CONTAINER_HEADER:
            raise FatbinError(f"{what}: {end - p} bytes left at offset {p:#x}, fewer than a container header "
                              f"({CONTAINER_HEADER})")
        magic, version, header_size, fat_size = struct.unpack_from("<IHHQ", buf, p)
        if magic != CONTAINER_MAGIC:
            raise FatbinError(f"{what}: container magic at offset {p:#x} is {magic:#010x}, expected "
                              f"{CONTAINER_MAGIC:#010x}")
        if version != 1 or header_size != CONTAINER_HEADER:
            raise FatbinError(f"{what}: container at offset {p:#x} has version {version} and header size "
                              f"{header_size}, expected 1 and {CONTAINER_HEADER}")
        body, cend = p + header_size, p + header_size + fat_size
        if cend > end:
            raise FatbinError(f"{what}: container at offset {p:#x} claims {fat_size} bytes of entries, past the "
                              f"end of the fat binary at {end:#x} by {cend - end}")
        entries = []
        e = body
        while e < cend:
            if cend - e < ENTRY_HEADER_MIN:
                raise FatbinError(f"{what}: {cend - e} bytes left for an entry at offset {e:#x}, fewer than an "
                                  f"entry header ({ENTRY_HEADER_MIN})")
            kind, _ver, ehs, padded = struct.unpack_from("<HHIQ", buf, e)
            (payload,) = struct.unpack_from("<I", buf, e + 16)
            (sm,) = struct.unpack_from("<I", buf, e + 28)
            if kind not in KIND_NAMES:
                raise FatbinError(f"{what}: entry at offset {e:#x} has kind {kind}, expected 1 (PTX) or 2 (cubin)")
            if ehs < ENTRY_HEADER_MIN or ehs % 8:
                raise FatbinError(f"{what}: entry at offset {e:#x} has header size {ehs}, expected a multiple of 8 "
                                  f">= {ENTRY_HEADER_MIN}")
            if payload > padded:
                raise FatbinError(f"{what}: entry at offset {e:#x} has payload size {payload} over its padded size "
                                  f"{padded}")
            if not 10 <= sm <= 999:
                raise FatbinError(f"{what}: entry at offset {e:#x} has SM {sm}, expected 10..999")
            if e + ehs + padded > cend:
                raise FatbinError(f"{what}: entry at offset {e:#x} ({ehs} + {padded} bytes) runs past its "
                                  f"container's end at {cend:#x} by {e + ehs + padded - cend}")
            entries.append(Entry(e, kind, ehs, padded, payload, sm))
            e += ehs + padded
        if not entries:
            raise FatbinError(f"{what}: container at offset {p:#x} holds no entry")
        containers.append(entries)
        p = cend
    if not containers:
        raise FatbinError(f"{what}: no fat binary container in {end - start} bytes at offset {start:#x}")
    return containers


def driver_choice(entries, sm):
    """(kind, SM) of the entry the CUDA driver loads from one container on a GPU of compute capability sm, or None."""
    cubins = [e.sm for e in entries if e.kind == KIND_CUBIN and e.sm // 10 == sm // 10 and e.sm <= sm]
    if cubins:
        return (KIND_CUBIN, max(cubins))
    ptx = [e.sm for e in entries if e.kind == KIND_PTX and e.sm <= sm]
    if ptx:
        return (KIND_PTX, max(ptx))
    return None


def trim_fatbin(buf, start, end, keep, what):
    """Zeroes, in buf (a bytearray), the payload of every entry in buf[start:end] no GPU of a kept SM loads.

    Returns a report dict. Raises FatbinError on malformed input or when no entry runs on some kept SM."""
    keep = sorted(set(keep))
    containers = parse_containers(buf, start, end, what)
    stats = defaultdict(lambda: {"entries": 0, "zeroed": 0, "payload_bytes": 0, "zeroed_bytes": 0})  # (kind, SM)
    without = {sm: 0 for sm in keep}
    kept_choices = {sm: defaultdict(int) for sm in keep}
    plan = []
    for entries in containers:
        chosen = set()
        for sm in keep:
            c = driver_choice(entries, sm)
            if c is None:
                without[sm] += 1
            else:
                chosen.add(c)
                kept_choices[sm][f"{KIND_NAMES[c[0]]} sm_{c[1]}"] += 1
        for e in entries:
            zero = e.sm not in keep and (e.kind, e.sm) not in chosen
            s = stats[(e.kind, e.sm)]
            s["entries"] += 1
            s["payload_bytes"] += e.padded_size
            if zero:
                s["zeroed"] += 1
                s["zeroed_bytes"] += e.padded_size
                plan.append(e)
    for sm in keep:
        if without[sm] == len(containers):
            present = [f"{KIND_NAMES[k]} sm_{v}" for k, v in sorted(stats)]
            raise FatbinError(f"{what}: no entry runs on sm_{sm} (keep list {', '.join(f'sm_{k}' for k in keep)}): "
                              f"its {len(containers)} containers hold only {', '.join(present)}")
    for e in plan:
        buf[e.payload_start:e.payload_end] = bytes(e.padded_size)
    return {
        "containers": len(containers),
        "entries": {f"{KIND_NAMES[k]} sm_{sm}": dict(v) for (k, sm), v in sorted(stats.items())},
        "zeroed_bytes": sum(e.padded_size for e in plan),
        "containers_without_entry": {f"sm_{sm}": n for sm, n in without.items()},
        "loaded_per_kept_sm": {f"sm_{sm}": dict(v) for sm, v in kept_choices.items()},
    }


def elf_sections(buf, what):
    """{name: (file offset, size, type)} of an ELF64 little-endian file's sections; refuses other files by name."""
    if len(buf) < 64 or bytes(buf[:4]) != b"\x7fELF":
        raise FatbinError(f"{what}: not an ELF file (first bytes {bytes(buf[:4])!r}, expected b'\\x7fELF')")
    if buf[4] != 2 or buf[5] != 1:
        raise FatbinError(f"{what}: ELF class {buf[4]} / data {buf[5]}, expected 2 / 1 (64-bit little-endian)")
    (shoff,) = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    if shentsize != 64 or shnum == 0 or shstrndx >= shnum or shoff + shnum * 64 > len(buf):
        raise FatbinError(f"{what}: ELF section header table (offset {shoff:#x}, {shnum} entries of {shentsize} "
                          f"bytes, names in {shstrndx}) does not fit the file's {len(buf)} bytes")
    headers = [struct.unpack_from("<IIQQQQIIQQ", buf, shoff + i * 64) for i in range(shnum)]
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    out = {}
    for h in headers:
        name_off, sh_type, off, size = h[0], h[1], h[4], h[5]
        if name_off >= str_size:
            raise FatbinError(f"{what}: ELF section name offset {name_off} is past the name table's {str_size} bytes")
        end = buf.find(b"\0", str_off + name_off, str_off + str_size)
        name = bytes(buf[str_off + name_off:end if end >= 0 else str_off + str_size]).decode("latin-1")
        if sh_type != 8 and off + size > len(buf):  # 8 = SHT_NOBITS (.bss): no bytes in the file
            raise FatbinError(f"{what}: ELF section {name} ({size} bytes at {off:#x}) runs past the file's end")
        out[name] = (off, size, sh_type)
    return out


def trim_elf(buf, keep, what, require=True):
    """Trims the `.nv_fatbin` section of an ELF in buf (a bytearray) in place. Returns the report, or None when
    the ELF has no such section and require is False."""
    sections = elf_sections(buf, what)
    if SECTION not in sections:
        if require:
            raise FatbinError(f"{what}: no {SECTION} section (sections: {', '.join(n for n in sections if n)})")
        return None
    off, size, _ = sections[SECTION]
    return trim_fatbin(buf, off, off + size, keep, f"{what} {SECTION}")


def trim_file(path, keep, what, require=True):
    """trim_elf on a file, in place, through a shared mapping (a 284 MB library is never copied in memory)."""
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FatbinError(f"{what}: empty file")
        with mmap.mmap(f.fileno(), 0) as buf:
            report = trim_elf(buf, keep, what, require)
            buf.flush()
    return report
