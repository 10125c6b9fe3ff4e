#!/usr/bin/env python3
"""ONNX Runtime's GPU libraries, small enough to travel to a lent GPU machine (scripts/gpu_libs.sh drives this).

The `onnxruntime-gpu` wheel's CUDA provider (libonnxruntime_providers_cuda.so, 284 MB in 1.31.1) is mostly an
embedded CUDA fat binary: ELF section `.nv_fatbin`, a run of containers, each holding the same kernels compiled for
several GPU architectures (the format and the trim: scripts/fatbin.py). `trim` zeroes the payload of every entry a
GPU of the kept compute capabilities will never load, and changes nothing else: no byte outside those payloads, not
the file's size, no offset, no header (so the ELF stays valid and the CUDA runtime registers every container as
before). Zeroed payloads then compress to nothing.

Subcommands (stdlib only: the GPU machine has python3 and no network):
  trim FILE [--sm 90,...] [-o OUT]                  trim one library (in place without -o); prints the entries
  build --wheel WHL --out-dir DIR --name NAME ...   extract, trim, tar.xz, split into parts, sha256 list
  unpack --src DIR --name NAME --dest DEST          verify, join, extract; prints ORT_DYLIB_PATH=... on stdout
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fatbin import (  # noqa: E402  (the fat binary format: scripts/fatbin.py)
    FatbinError,
    parse_sm_list,
    trim_file,
)

MIB = 1 << 20

ORT_LIB_DIR = "onnxruntime/capi/"
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def say(msg):
    print(f"[gpu-libs] {msg}", file=sys.stderr, flush=True)


def mib(n):
    return f"{n / MIB:.1f} MiB"


def print_report(name, report):
    say(f"{name}: {report['containers']} fat binary containers")
    for label, s in report["entries"].items():
        verdict = "zeroed" if s["zeroed"] == s["entries"] else ("kept" if s["zeroed"] == 0 else
                                                                f"{s['zeroed']} zeroed")
        say(f"  {label:>12}: {s['entries']:4d} entries, {mib(s['payload_bytes']):>10}  {verdict}")
    for sm, n in report["containers_without_entry"].items():
        if n:
            say(f"  {n} containers have no entry for {sm} (unusable there in the untrimmed library too)")
    say(f"  zeroed {mib(report['zeroed_bytes'])}; size unchanged")


# ---------------------------------------------------------------------------------------------------------- build

def build(wheel, out_dir, name, keep, libs, max_mib, part_bytes, preset):
    os.makedirs(out_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir)
    try:
        manifest = {"name": name, "wheel": os.path.basename(wheel), "wheel_sha256": sha256_file(wheel),
                    "keep_sm": keep, "libraries": {}}
        with zipfile.ZipFile(wheel) as z:
            members = set(z.namelist())
            for lib in libs:
                member = ORT_LIB_DIR + lib
                if member not in members:
                    raise FatbinError(f"{wheel}: no {member} (the wheel holds "
                                      f"{', '.join(sorted(m for m in members if '.so' in m))})")
                path = os.path.join(stage, lib)
                h = hashlib.sha256()
                with z.open(member) as src, open(path, "wb") as out:
                    for chunk in iter(lambda: src.read(MIB), b""):
                        h.update(chunk)
                        out.write(chunk)
                size = os.path.getsize(path)
                report = trim_file(path, keep, lib, require=(lib == CUDA_PROVIDER))
                if os.path.getsize(path) != size:
                    raise AssertionError(f"{lib}: size changed from {size} to {os.path.getsize(path)}")
                info = {"size": size, "sha256_wheel": h.hexdigest(), "sha256": sha256_file(path)}
                if report is not None:
                    print_report(lib, report)
                    info["fatbin"] = report
                manifest["libraries"][lib] = info
        archive = os.path.join(out_dir, f"{name}.tar.xz")
        tmp = archive + ".tmp"
        level = f"{preset & ~lzma.PRESET_EXTREME}{'e' if preset & lzma.PRESET_EXTREME else ''}"
        say(f"compressing into {archive} (xz -{level}, one core: about two minutes for the real libraries)")
        with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|",
                                                                      format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
            tar.addfile(tar_info("MANIFEST.json", len(data), 0o644), io.BytesIO(data))
            for lib in libs:
                path = os.path.join(stage, lib)
                with open(path, "rb") as f:
                    tar.addfile(tar_info(lib, os.path.getsize(path), 0o755), f)
        total = os.path.getsize(tmp)
        if total > max_mib * MIB:
            os.remove(tmp)
            raise FatbinError(f"{archive}: {mib(total)} ({total} bytes) is over the {max_mib} MiB limit; keep "
                              f"fewer SMs than {', '.join(f'sm_{k}' for k in keep)} (or raise --max-mib)")
        for old in os.listdir(out_dir):
            if old.startswith(f"{name}.tar.xz.") and old[len(name) + 8:].isdigit():
                os.remove(os.path.join(out_dir, old))
        parts = split(tmp, archive, part_bytes)
        os.remove(tmp)
        lines = [f"{sha256_file_of_parts(parts)}  {name}.tar.xz"] + [f"{sha256_file(p)}  {os.path.basename(p)}"
                                                                   for p in parts]
        with open(archive + ".sha256", "w") as f:
            f.write("\n".join(lines) + "\n")
        say("libraries (bytes, same before and after trimming; sha256 after):")
        for lib, info in manifest["libraries"].items():
            say(f"  {lib:40} {info['size']:>11}  {info['sha256']}")
        say(f"archive {name}.tar.xz: {mib(total)} ({total} bytes), sha256 {lines[0].split()[0]}")
        for p in parts:
            say(f"  part {os.path.basename(p)}: {mib(os.path.getsize(p))}")
        say(f"sha256 list: {archive}.sha256")
        return parts
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def tar_info(name, size, mode):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, mode, 0, 0, 0
    info.uname = info.gname = ""
    return info


def split(src, stem, part_bytes):
    """src cut into stem.00, stem.01, ... of part_bytes each (one part when part_bytes is 0)."""
    total = os.path.getsize(src)
    part_bytes = part_bytes or total
    parts = []
    with open(src, "rb") as f:
        i = 0
        while True:
            chunk = f.read(part_bytes)
            if not chunk and parts:
                break
            path = f"{stem}.{i:02d}"
            with open(path, "wb") as out:
                out.write(chunk)
            parts.append(path)
            i += 1
            if f.tell() >= total:
                break
    return parts


def sha256_file_of_parts(parts):
    h = hashlib.sha256()
    for p in parts:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(MIB), b""):
                h.update(chunk)
    return h.hexdigest()


def working_tree_bytes(root):
    """Bytes of what the device tool sends with every call: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for rel in set(out.split(b"\0")):
        path = os.path.join(root.encode(), rel)
        if rel and os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def auto_part_bytes(root, limit_mib, slack_mib=3, floor_mib=8):
    """Parts as large as fit beside the working tree in one device call, less some slack for the tree's growth
    (24 MiB when the tree's size is unknown)."""
    tree = working_tree_bytes(root) if root else None
    if tree is None:
        return 24 * MIB
    whole_mib = int(limit_mib - tree / MIB - slack_mib)
    if whole_mib < floor_mib:
        raise ValueError(f"the working tree is {mib(tree)}: beside it, a {limit_mib} MiB device call has room for "
                         f"{whole_mib} MiB of parts, under the {floor_mib} MiB floor; pass --part-mib explicitly")
    return whole_mib * MIB


def group_calls(files, room):
    """[(path, bytes)] -> lists of paths, one per device call, in order: each list's bytes within room (None: room
    unknown, one file a call) and 8 paths at most; the first file (the sha256 list) rides with the next one."""
    calls, cur, cur_bytes = [], [], 0
    for i, (path, size) in enumerate(files):
        fits = room is not None and len(cur) < 8 and cur_bytes + size <= room
        if cur and not fits and i > 1:
            calls.append(cur)
            cur, cur_bytes = [], 0
        cur.append(path)
        cur_bytes += size
    if cur:
        calls.append(cur)
    return calls


def carry_plan(parts, sha_file, root, limit_mib, unpack_cmd):
    """Groups the parts into device `run` calls whose travelling tree stays under the limit; prints the plan."""
    tree = working_tree_bytes(root)
    room = None if tree is None else limit_mib * MIB - tree - MIB  # a MiB of slack for files changed meanwhile
    calls = group_calls([(os.path.relpath(p, root), os.path.getsize(p)) for p in [sha_file] + parts], room)
    if tree is not None and max(os.path.getsize(p) for p in parts) > room:
        say(f"warning: the working tree is {mib(tree)}: with a {mib(max(os.path.getsize(p) for p in parts))} part "
            f"a call would pass the device tool's {limit_mib} MiB; rebuild with a smaller --part-mib")
    say(f"device `run` calls (the working tree, {mib(tree) if tree is not None else 'size unknown'}, travels with "
        f"each; {limit_mib} MiB in all per call). Make them back to back: the machine keeps what a call carried "
        f"while it stays warm, and gives itself back after a short idle wait:")
    for i, c in enumerate(calls):
        last = i == len(calls) - 1
        say(f"  call {i + 1}: carry {json.dumps(c)}, command: {unpack_cmd if last else 'true'}")


# --------------------------------------------------------------------------------------------------------- unpack

class _Concat(io.RawIOBase):
    """The parts read back to back, hashed as they go."""

    def __init__(self, paths):
        self._paths, self._f, self.sha = list(paths), None, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, b):
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(b)
            if n:
                self.sha.update(memoryview(b)[:n])
                return n
            self._f.close()
            self._f = None


def unpack(src, name, dest):
    """Checks the parts against NAME.tar.xz.sha256, joins and extracts them into dest, checks every library
    against the archive's manifest. Returns the path of libonnxruntime.so.*."""
    sha_file = os.path.join(src, f"{name}.tar.xz.sha256")
    if not os.path.isfile(sha_file):
        raise FatbinError(f"{sha_file} is missing: build it with scripts/gpu_libs.sh on a machine that reaches PyPI "
                          f"and carry {os.path.basename(src)}/ to this one")
    listed = []
    with open(sha_file) as f:
        for line in f:
            if line.strip():
                digest, fname = line.split(None, 1)
                listed.append((digest, fname.strip().lstrip("*")))
    whole, parts = listed[0], listed[1:]
    if whole[1] != f"{name}.tar.xz" or not parts:
        raise FatbinError(f"{sha_file}: expected its first line to name {name}.tar.xz and then its parts")
    missing = [p for _, p in parts if not os.path.isfile(os.path.join(src, p))]
    if missing:
        raise FatbinError(f"{src}: {len(missing)} of the archive's {len(parts)} parts are missing: "
                          f"{', '.join(missing)} (carry each in a device call before this one)")
    for digest, p in parts:
        got = sha256_file(os.path.join(src, p))
        if got != digest:
            raise FatbinError(f"{os.path.join(src, p)}: sha256 {got}, expected {digest} (from {sha_file}); "
                              f"rebuild or carry it again")
    parent = os.path.dirname(os.path.abspath(dest)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gpu-libs.", dir=parent)
    try:
        stream = _Concat(os.path.join(src, p) for _, p in parts)
        written = {}
        with tarfile.open(fileobj=io.BufferedReader(stream, MIB), mode="r|xz") as tar:
            for member in tar:
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise FatbinError(f"{name}.tar.xz: unexpected member {member.name!r} (type {member.type!r})")
                out_path = os.path.join(tmp, member.name)
                h = hashlib.sha256()
                with tar.extractfile(member) as fin, open(out_path, "wb") as fout:
                    for chunk in iter(lambda: fin.read(MIB), b""):
                        h.update(chunk)
                        fout.write(chunk)
                os.chmod(out_path, member.mode & 0o755)
                written[member.name] = h.hexdigest()
            while stream.readinto(bytearray(MIB)):  # the rest of the last part (xz padding), into the hash
                pass
        if stream.sha.hexdigest() != whole[0]:
            raise FatbinError(f"{name}.tar.xz (its parts joined): sha256 {stream.sha.hexdigest()}, expected "
                              f"{whole[0]} (from {sha_file})")
        if "MANIFEST.json" not in written:
            raise FatbinError(f"{name}.tar.xz: no MANIFEST.json")
        with open(os.path.join(tmp, "MANIFEST.json")) as f:
            manifest = json.load(f)
        for lib, info in manifest["libraries"].items():
            if written.get(lib) != info["sha256"]:
                raise FatbinError(f"{name}.tar.xz: {lib} has sha256 {written.get(lib)}, its manifest says "
                                  f"{info['sha256']}")
        os.chmod(tmp, 0o755)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dylib = [lib for lib in manifest["libraries"] if lib.startswith("libonnxruntime.so.")]
    check_gpu(manifest["keep_sm"])
    check_loader(os.path.join(dest, CUDA_PROVIDER))
    return os.path.join(os.path.abspath(dest), dylib[0])


def check_gpu(keep):
    """Refuses when nvidia-smi reports a GPU that none of the kept cubins runs on (no nvidia-smi: no check)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        say("nvidia-smi not available: the GPU's compute capability is not checked against the archive")
        return
    for line in out.strip().splitlines():
        gpu, cap = (x.strip() for x in line.rsplit(",", 1))
        major, minor = cap.split(".")
        sm = int(major) * 10 + int(minor)
        if not any(k // 10 == sm // 10 and k <= sm for k in keep):
            raise FatbinError(f"this GPU ({gpu}, sm_{sm}) runs none of the archive's cubins "
                              f"({', '.join(f'sm_{k}' for k in keep)}): build one with scripts/gpu_libs.sh --sm {sm}")
        say(f"GPU {gpu} (sm_{sm}) runs the archive's cubins")


def check_loader(lib):
    """Names the CUDA libraries the provider needs that the loader cannot find now (a warning: LD_LIBRARY_PATH may
    be set later)."""
    try:
        out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    except OSError:
        return
    missing = sorted({line.split()[0] for line in out.splitlines() if "not found" in line})
    if missing:
        say(f"warning: the loader does not find {', '.join(missing)} for {os.path.basename(lib)}: put CUDA 13's "
            f"libraries on LD_LIBRARY_PATH before running r1 on the CUDA provider")


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trim", help="trim one library's .nv_fatbin")
    t.add_argument("file")
    t.add_argument("--sm", default="90")
    t.add_argument("-o", "--output")
    b = sub.add_parser("build", help="wheel -> trimmed, compressed, split archive")
    b.add_argument("--wheel", required=True)
    b.add_argument("--out-dir", required=True)
    b.add_argument("--name", required=True)
    b.add_argument("--sm", default="90")
    b.add_argument("--libs", required=True, help="comma-separated file names under onnxruntime/capi/")
    b.add_argument("--max-mib", type=float, default=60)
    b.add_argument("--part-mib", default="auto",
                   help="size of each part in MiB (0: one part; auto: what fits beside the working tree of --repo)")
    b.add_argument("--preset", type=int, default=9, help="xz preset (0-9), always 'extreme'")
    b.add_argument("--repo", help="print the device tool's carry plan relative to this repository")
    b.add_argument("--device-mib", type=int, default=64)
    b.add_argument("--unpack-cmd", default="scripts/gpu_libs.sh --unpack DIR")
    u = sub.add_parser("unpack", help="parts -> checked libraries; prints ORT_DYLIB_PATH=...")
    u.add_argument("--src", required=True)
    u.add_argument("--name", required=True)
    u.add_argument("--dest", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "trim":
            keep = parse_sm_list(a.sm)
            target = a.file
            if a.output:
                shutil.copyfile(a.file, a.output)
                target = a.output
            try:
                print_report(os.path.basename(a.file), trim_file(target, keep, a.file))
            except FatbinError:
                if a.output:
                    os.remove(a.output)
                raise
        elif a.cmd == "build":
            keep = parse_sm_list(a.sm)
            part_bytes = auto_part_bytes(a.repo, a.device_mib) if a.part_mib == "auto" else float(a.part_mib) * MIB
            if part_bytes < 0 or not 0 <= a.preset <= 9:
                raise ValueError(f"--part-mib {a.part_mib} / --preset {a.preset}: expected >= 0 / 0..9")
            parts = build(a.wheel, a.out_dir, a.name, keep, [x for x in a.libs.split(",") if x], a.max_mib,
                          int(part_bytes), a.preset | lzma.PRESET_EXTREME)
            if a.repo:
                carry_plan(parts, os.path.join(a.out_dir, f"{a.name}.tar.xz.sha256"), a.repo, a.device_mib,
                           a.unpack_cmd)
        else:
            path = unpack(a.src, a.name, a.dest)
            say(f"libraries in {os.path.abspath(a.dest)}")
            print(f"ORT_DYLIB_PATH={path}")
    except (FatbinError, ValueError, OSError, zipfile.BadZipFile, lzma.LZMAError, tarfile.TarError) as e:
        print(f"[gpu-libs] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
