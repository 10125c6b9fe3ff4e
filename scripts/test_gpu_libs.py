#!/usr/bin/env python3
"""Unit tests of gpu_libs.py (no GPU, no network): the fat binary trim on synthetic blobs and a synthetic ELF with a
`.nv_fatbin` section, its refusals, and the archive's build -> parts -> unpack round trip on a synthetic wheel.

Run: python3 scripts/test_gpu_libs.py   (scripts/test.sh runs it)
"""
import io
import os
import stat
import struct
import sys
import tempfile
import unittest
import zipfile
from contextlib import redirect_stderr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fatbin  # noqa: E402
import gpu_libs as g  # noqa: E402

MAGIC = 0xBA55ED50


def entry(kind, sm, payload_len=40, header_size=64, pad=8, fill=None):
    """One fat binary entry: header (extra header bytes 0xAB) + payload (fill byte) padded to `pad`."""
    padded = -(-payload_len // pad) * pad
    head = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x0101, header_size, padded, payload_len, 0, 8, 1, sm, 0, 0,
                       0x8011, 0, payload_len * 10)
    head += b"\xab" * (header_size - len(head))
    byte = fill if fill is not None else (0x10 + sm % 200)
    return head + bytes([byte]) * payload_len + b"\xee" * (padded - payload_len)


def container(*entries):
    body = b"".join(entries)
    return struct.pack("<IHHQ", MAGIC, 1, 16, len(body)) + body


def elf(sections):
    """A minimal ELF64 little-endian file: header, the sections' bytes, .shstrtab, then the section header table."""
    names = b"\0"
    name_off = {}
    for name, _ in sections + [(".shstrtab", None)]:
        name_off[name] = len(names)
        names += name.encode() + b"\0"
    body = bytearray(64)
    placed = []
    for name, data in sections + [(".shstrtab", names)]:
        while len(body) % 16:
            body += b"\0"
        placed.append((name, len(body), len(data)))
        body += data
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    body += bytes(64)  # SHN_UNDEF
    for name, off, size in placed:
        sh_type = 3 if name == ".shstrtab" else 1
        body += struct.pack("<IIQQQQIIQQ", name_off[name], sh_type, 2, off, off, size, 0, 0, 8, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, len(placed) + 1,
                                 len(placed))
    body[:64] = header
    return bytes(body)


def payload_ranges(buf, start, end):
    """(label, payload start, padded end) of every entry, through the module's own parser."""
    return [(e.label(), e.payload_start, e.payload_end)
            for c in fatbin.parse_containers(buf, start, end, "test") for e in c]


def quiet(fn, *args, **kwargs):
    with redirect_stderr(io.StringIO()) as err:
        return fn(*args, **kwargs), err.getvalue()


class TrimBlob(unittest.TestCase):
    def blob(self):
        return (container(entry(2, 75), entry(2, 80, 100), entry(2, 86), entry(2, 90, 72, header_size=112),
                          entry(2, 120), entry(1, 90, 33))
                + bytes(8)  # padding between containers
                + container(entry(2, 90, 56), entry(2, 120))
                + container(entry(2, 120, 24)))

    def check(self, original, trimmed, start, end, zeroed_labels):
        """Exactly the payloads of the entries in zeroed_labels are zero; every other byte is as it was."""
        self.assertEqual(len(original), len(trimmed))
        zero = [(a, b) for label, a, b in payload_ranges(original, start, end) if label in zeroed_labels]
        self.assertTrue(zero, "the case zeroes nothing: it would check nothing")
        mask = bytearray(len(original))
        for a, b in zero:
            mask[a:b] = b"\1" * (b - a)
            self.assertEqual(bytes(trimmed[a:b]), bytes(b - a), f"payload {a:#x}..{b:#x} not zeroed")
        diff = [i for i in range(len(original)) if not mask[i] and original[i] != trimmed[i]]
        self.assertEqual(diff, [], "bytes outside the zeroed payloads changed (headers included)")
        kept = [(label, a, b) for label, a, b in payload_ranges(original, start, end) if label not in zeroed_labels]
        for label, a, b in kept:
            self.assertNotEqual(bytes(trimmed[a:b]), bytes(b - a), f"{label} payload was zeroed")

    def test_keeps_only_the_kept_sm(self):
        src = self.blob()
        buf = bytearray(src)
        report = fatbin.trim_fatbin(buf, 0, len(buf), [90], "blob")
        self.check(src, buf, 0, len(src), {"cubin sm_75", "cubin sm_80", "cubin sm_86", "cubin sm_120"})
        self.assertEqual(report["containers"], 3)
        self.assertEqual(report["containers_without_entry"], {"sm_90": 1})
        self.assertEqual(report["entries"]["cubin sm_120"], {"entries": 3, "zeroed": 3, "payload_bytes": 104,
                                                             "zeroed_bytes": 104})
        self.assertEqual(report["entries"]["ptx sm_90"]["zeroed"], 0)  # PTX of a kept SM stays
        self.assertEqual(report["zeroed_bytes"], 40 + 104 + 40 + 104)
        # Trimming again changes nothing: the trimmed blob still parses and keeps the same entries.
        again = bytearray(buf)
        fatbin.trim_fatbin(again, 0, len(again), [90], "blob")
        self.assertEqual(again, buf)

    def test_two_kept_sms(self):
        src = self.blob()
        buf = bytearray(src)
        report = fatbin.trim_fatbin(buf, 0, len(buf), [80, 90], "blob")
        self.check(src, buf, 0, len(src), {"cubin sm_75", "cubin sm_86", "cubin sm_120"})
        self.assertEqual(report["containers_without_entry"], {"sm_80": 2, "sm_90": 1})

    def test_keeps_what_the_driver_falls_back_to(self):
        # sm_89 GPU: no sm_89 cubin -> the newest same-major cubin not newer (sm_86); sm_90 GPU: no cubin of major 9
        # -> the newest PTX not newer than 90 (compute_70), JIT-compiled; compute_52 and the sm_75 cubin go.
        src = container(entry(2, 80), entry(2, 86), entry(2, 90)) + container(entry(1, 52), entry(1, 70),
                                                                               entry(2, 75))
        buf = bytearray(src)
        report = fatbin.trim_fatbin(buf, 0, len(buf), [89, 90], "blob")
        self.check(src, buf, 0, len(src), {"cubin sm_80", "ptx sm_52", "cubin sm_75"})
        self.assertEqual(report["loaded_per_kept_sm"], {"sm_89": {"cubin sm_86": 1, "ptx sm_70": 1},
                                                        "sm_90": {"cubin sm_90": 1, "ptx sm_70": 1}})

    def test_refuses_when_no_entry_runs_on_a_kept_sm(self):
        src = self.blob()
        buf = bytearray(src)
        with self.assertRaises(g.FatbinError) as cm:
            fatbin.trim_fatbin(buf, 0, len(buf), [90, 70], "blob")
        msg = str(cm.exception)
        self.assertIn("no entry runs on sm_70 (keep list sm_70, sm_90)", msg)
        self.assertIn("cubin sm_120", msg)
        self.assertEqual(buf, src, "a refused trim must leave the bytes as they were")
        # sm_100 has no cubin but runs the compute_90 PTX (JIT): only that PTX stays.
        report = fatbin.trim_fatbin(buf, 0, len(buf), [100], "blob")
        self.check(src, buf, 0, len(src), {"cubin sm_75", "cubin sm_80", "cubin sm_86", "cubin sm_90",
                                           "cubin sm_120"})
        self.assertEqual(report["containers_without_entry"], {"sm_100": 2})
        # A cubin of another major version is no fallback: sm_80 does not run on sm_75.
        only80 = bytearray(container(entry(2, 80), entry(2, 86)))
        with self.assertRaisesRegex(g.FatbinError, "no entry runs on sm_75"):
            fatbin.trim_fatbin(only80, 0, len(only80), [75], "blob")

    def malformed(self, buf, pattern):
        data = bytearray(buf)
        with self.assertRaisesRegex(g.FatbinError, pattern):
            fatbin.trim_fatbin(data, 0, len(data), [90], "blob")
        self.assertEqual(bytes(data), bytes(buf))

    def test_refuses_malformed_headers(self):
        good = container(entry(2, 80), entry(2, 90))
        bad_magic = bytearray(good)
        bad_magic[0] ^= 1
        self.malformed(bad_magic, r"container magic at offset 0x0 is 0xba55ed51, expected 0xba55ed50")
        self.malformed(good + b"\x07" + bytes(7) + good, r"container magic at offset 0x%x" % len(good))
        bad_version = bytearray(good)
        struct.pack_into("<H", bad_version, 4, 2)
        self.malformed(bad_version, "version 2 and header size 16, expected 1 and 16")
        too_long = bytearray(good)
        struct.pack_into("<Q", too_long, 8, len(good))
        self.malformed(too_long, "past the end of the fat binary")
        self.malformed(container(entry(2, 80), entry(3, 90)), "kind 3, expected 1 .PTX. or 2 .cubin.")
        short = bytearray(container(entry(2, 90)))
        struct.pack_into("<I", short, 16 + 4, 40)
        self.malformed(short, "header size 40, expected a multiple of 8 >= 64")
        over = bytearray(container(entry(2, 90)))
        struct.pack_into("<I", over, 16 + 16, 41)  # payload size 41 > padded 40
        self.malformed(over, "payload size 41 over its padded size 40")
        past = bytearray(container(entry(2, 80), entry(2, 90)))
        struct.pack_into("<Q", past, 16 + len(entry(2, 80)) + 8, 48)  # the last entry's padded size grows by 8
        self.malformed(past, "runs past its container's end")
        self.malformed(good[:-8] + bytes(0), "past the end of the fat binary")
        self.malformed(struct.pack("<IHHQ", MAGIC, 1, 16, 0), "holds no entry")
        self.malformed(bytes(64), "no fat binary container")
        self.malformed(good + b"\x50\xed", "fewer than a container header")

    def test_sm_list(self):
        self.assertEqual(g.parse_sm_list("sm_90,80,90"), [80, 90])
        for bad in ("", "9.0", "sm90a", "5"):
            with self.assertRaises(ValueError):
                g.parse_sm_list(bad)


class TrimElf(unittest.TestCase):
    def lib(self):
        fat = (container(entry(2, 80, 200), entry(2, 90, 300), entry(2, 120, 200)) + bytes(16)
               + container(entry(2, 90, 64)))
        return elf([(".text", b"\x90" * 100), (".nv_fatbin", fat), (".data", b"\x42" * 50)]), fat

    def test_trims_the_section_in_place(self):
        src, fat = self.lib()
        start = src.index(fat)
        buf = bytearray(src)
        report = fatbin.trim_elf(buf, [90], "libsynthetic.so")
        self.assertEqual(report["zeroed_bytes"], 400)
        TrimBlob.check(self, src, buf, start, start + len(fat), {"cubin sm_80", "cubin sm_120"})
        self.assertEqual(fatbin.elf_sections(buf, "x"), fatbin.elf_sections(src, "x"))
        # The file path (a shared mapping) writes the same bytes.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "lib.so")
            with open(path, "wb") as f:
                f.write(src)
            g.trim_file(path, [90], "lib.so")
            with open(path, "rb") as f:
                self.assertEqual(f.read(), bytes(buf))

    def test_refuses_other_files(self):
        src, _ = self.lib()
        with self.assertRaisesRegex(g.FatbinError, r"lib.so: no \.nv_fatbin section \(sections: .text, .data"):
            fatbin.trim_elf(bytearray(elf([(".text", b"\x90"), (".data", b"\1")])), [90], "lib.so")
        self.assertIsNone(fatbin.trim_elf(bytearray(elf([(".text", b"\x90")])), [90], "lib.so", require=False))
        with self.assertRaisesRegex(g.FatbinError, "not an ELF file"):
            fatbin.trim_elf(bytearray(b"MZ" + bytes(100)), [90], "lib.so")
        elf32 = bytearray(src)
        elf32[4] = 1
        with self.assertRaisesRegex(g.FatbinError, "ELF class 1 / data 1, expected 2 / 1"):
            fatbin.trim_elf(elf32, [90], "lib.so")
        cut = bytearray(src[:-40])
        with self.assertRaisesRegex(g.FatbinError, "section header table .* does not fit"):
            fatbin.trim_elf(cut, [90], "lib.so")
        with self.assertRaisesRegex(g.FatbinError, r"lib.so \.nv_fatbin: no entry runs on sm_80"):
            fatbin.trim_elf(bytearray(elf([(".nv_fatbin", container(entry(2, 90)))])), [80], "lib.so")


class CarryPlan(unittest.TestCase):
    def test_group_calls(self):
        files = [("sha", 400), ("p0", 29), ("p1", 29), ("p2", 5)]
        self.assertEqual(g.group_calls(files, 1000), [["sha", "p0", "p1", "p2"]])
        self.assertEqual(g.group_calls(files, 440), [["sha", "p0"], ["p1", "p2"]])
        self.assertEqual(g.group_calls(files, 10), [["sha", "p0"], ["p1"], ["p2"]])
        self.assertEqual(g.group_calls(files, None), [["sha", "p0"], ["p1"], ["p2"]])
        many = [("sha", 1)] + [(f"p{i}", 1) for i in range(10)]
        self.assertEqual([len(c) for c in g.group_calls(many, 1000)], [8, 3])

    def test_auto_part_size(self):
        self.assertEqual(g.auto_part_bytes(None, 64), 24 * g.MIB)
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(g.auto_part_bytes(d, 64), 24 * g.MIB)  # not a git checkout: size unknown


class ArchiveRoundTrip(unittest.TestCase):
    LIBS = ["libonnxruntime.so.1.31.1", "libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"]

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name
        self.addCleanup(self.tmp.cleanup)
        fat = b"".join(container(entry(2, sm, 4000 + i, fill=(i * 37 + sm) % 251 + 1), entry(2, 80, 3000))
                       for i, sm in enumerate([90, 90, 120]))
        self.cuda = elf([(".text", os.urandom(3000)), (".nv_fatbin", fat)])
        self.ort = elf([(".text", os.urandom(5000))])
        self.wheel = os.path.join(self.d, "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl")
        with zipfile.ZipFile(self.wheel, "w") as z:
            z.writestr("onnxruntime/capi/libonnxruntime.so.1.31.1", self.ort)
            z.writestr("onnxruntime/capi/libonnxruntime_providers_shared.so", elf([(".text", b"\1" * 10)]))
            z.writestr("onnxruntime/capi/libonnxruntime_providers_cuda.so", self.cuda)
        self.out = os.path.join(self.d, "gpu-libs")
        # unpack asks nvidia-smi for the GPU: a stand-in on PATH keeps the case the same on any machine.
        bindir = os.path.join(self.d, "bin")
        os.makedirs(bindir)
        self.smi = os.path.join(bindir, "nvidia-smi")
        self.fake_gpu("NVIDIA H100 80GB HBM3, 9.0")
        old_path = os.environ["PATH"]
        self.addCleanup(os.environ.__setitem__, "PATH", old_path)
        os.environ["PATH"] = bindir + os.pathsep + old_path

    def fake_gpu(self, line):
        with open(self.smi, "w") as f:
            f.write(f"#!/bin/sh\necho '{line}'\n")
        os.chmod(self.smi, 0o755)

    def build(self, **kw):
        args = dict(keep=[90], libs=self.LIBS, max_mib=1, part_bytes=2000, preset=0)
        args.update(kw)
        parts, _ = quiet(g.build, self.wheel, self.out, "ort-sm90", args["keep"], args["libs"], args["max_mib"],
                         args["part_bytes"], args["preset"])
        return parts

    def unpack(self, dest):
        return quiet(g.unpack, self.out, "ort-sm90", dest)[0]

    def test_build_then_unpack(self):
        parts = self.build()
        self.assertGreater(len(parts), 1, "the case should split the archive")
        self.assertTrue(all(os.path.getsize(p) <= 2000 for p in parts))
        self.assertEqual(sorted(os.listdir(self.out)),
                         sorted([os.path.basename(p) for p in parts] + ["ort-sm90.tar.xz.sha256"]))
        dest = os.path.join(self.d, "unpacked")
        path = self.unpack(dest)
        self.assertEqual(path, os.path.join(dest, "libonnxruntime.so.1.31.1"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.ort)
        with open(os.path.join(dest, "libonnxruntime_providers_cuda.so"), "rb") as f:
            cuda = f.read()
        self.assertEqual(len(cuda), len(self.cuda))
        expect = bytearray(self.cuda)
        fatbin.trim_elf(expect, [90], "x")
        self.assertEqual(cuda, bytes(expect))
        self.assertNotEqual(cuda, self.cuda)
        self.assertTrue(os.stat(path).st_mode & stat.S_IXUSR)
        # Unpacking again replaces the folder.
        self.assertEqual(self.unpack(dest), path)
        # Rebuilding into fewer parts leaves no stale part behind.
        parts = self.build(part_bytes=0)
        self.assertEqual([os.path.basename(p) for p in parts], ["ort-sm90.tar.xz.00"])
        self.assertEqual(sorted(os.listdir(self.out)), ["ort-sm90.tar.xz.00", "ort-sm90.tar.xz.sha256"])
        self.assertEqual(self.unpack(dest), path)

    def test_unpack_refuses_missing_or_changed_parts(self):
        parts = self.build()
        dest = os.path.join(self.d, "unpacked")
        with open(parts[1], "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        with self.assertRaisesRegex(g.FatbinError, r"ort-sm90.tar.xz.01: sha256 [0-9a-f]{64}, expected"):
            self.unpack(dest)
        self.assertFalse(os.path.exists(dest))
        os.remove(parts[1])
        with self.assertRaisesRegex(g.FatbinError, r"1 of the archive's \d+ parts are missing: ort-sm90.tar.xz.01"):
            self.unpack(dest)
        os.remove(os.path.join(self.out, "ort-sm90.tar.xz.sha256"))
        with self.assertRaisesRegex(g.FatbinError, "ort-sm90.tar.xz.sha256 is missing"):
            self.unpack(dest)

    def test_unpack_checks_the_gpu(self):
        self.build()
        for gpu, ok in (("NVIDIA H200, 9.0", True), ("NVIDIA A100-SXM4-80GB, 8.0", False)):
            self.fake_gpu(gpu)
            if ok:
                self.unpack(os.path.join(self.d, "u1"))
            else:
                with self.assertRaisesRegex(g.FatbinError, r"A100-SXM4-80GB, sm_80\) runs none of the archive's "
                                                           r"cubins \(sm_90\).*--sm 80"):
                    self.unpack(os.path.join(self.d, "u2"))

    def test_build_refusals(self):
        with self.assertRaisesRegex(g.FatbinError, r"ort-sm90.tar.xz: .* is over the 1e-05 MiB limit"):
            self.build(max_mib=0.00001)
        self.assertEqual(os.listdir(self.out), [], "a refused build leaves nothing behind")
        with self.assertRaisesRegex(g.FatbinError, "no onnxruntime/capi/libonnxruntime_providers_tensorrt.so"):
            self.build(libs=self.LIBS + ["libonnxruntime_providers_tensorrt.so"])
        with self.assertRaisesRegex(g.FatbinError, "libonnxruntime_providers_cuda.so .nv_fatbin: no entry runs on "
                                                   "sm_75"):
            self.build(keep=[75])


if __name__ == "__main__":
    unittest.main()
