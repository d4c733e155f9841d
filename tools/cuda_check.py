"""``make cuda-check``: compile every csrc/cuda/*.cu with plain nvcc for sm_80 and sm_90, through ptxas.

No torch and no GPU needed.  Prints the registers, stack frame and spills of
every kernel per architecture and fails when a kernel spills registers or uses
local memory (a stack frame), or when nvcc reports an error or a warning.

    python tools/cuda_check.py [--arch 80 90] [--nvcc PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<registers>\d+) registers")
WARNING = re.compile(r"warning", re.IGNORECASE)


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


def compile_one(nvcc: str, source: pathlib.Path, arch: str, out_dir: str) -> tuple[str, str, int, str]:
    command = [
        nvcc, "-std=c++17", "-O3", "-c", str(source), "-o", os.path.join(out_dir, f"{source.stem}_{arch}.o"),
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
        "-Werror=all-warnings", f"-I{ROOT / 'csrc' / 'cuda'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    return source.name, arch, result.returncode, result.stdout + result.stderr


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=False))


def short(name: str) -> str:
    """spa_cuda::gathered_gemm_kernel<__half, TileConfig<128,...>, false, true>(...) -> the template arguments."""
    name = re.sub(r"\(.*\)$", "", name).replace("spa_cuda::", "").replace("(anonymous namespace)::", "")
    return re.sub(r"\s+", "", name)


def parse(log: str) -> list[dict]:
    kernels, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"name": m["name"], "arch": m["arch"], "registers": None, "stack": 0, "stores": 0, "loads": 0}
            kernels.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current.update(stack=int(m["stack"]), stores=int(m["stores"]), loads=int(m["loads"]))
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m["registers"])
    return kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    parser.add_argument("--nvcc", default=None)
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args()
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("cuda-check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    print(f"cuda-check: {subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout.splitlines()[-1]}")
    failures: list[str] = []
    kernels: list[dict] = []
    with tempfile.TemporaryDirectory() as out_dir, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(compile_one, nvcc, source, arch, out_dir) for source in SOURCES for arch in args.arch]
        for job in jobs:
            source, arch, code, log = job.result()
            if code != 0:
                failures.append(f"{source} sm_{arch}: nvcc failed\n{log}")
                continue
            for line in log.splitlines():
                if WARNING.search(line) and "ptxas info" not in line:
                    failures.append(f"{source} sm_{arch}: {line.strip()}")
            for kernel in parse(log):
                kernel["source"] = source
                kernels.append(kernel)
    names = demangle(sorted({k["name"] for k in kernels}))
    print(f"{'source':<16} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for k in sorted(kernels, key=lambda k: (k["source"], k["arch"], k["name"])):
        print(f"{k['source']:<16} {k['arch']:<6} {k['registers']!s:>4} {k['stack']:>5} {k['stores']:>8} "
              f"{k['loads']:>8}  {short(names[k['name']])}")
        if k["stores"] or k["loads"] or k["stack"]:
            failures.append(f"{k['source']} {k['arch']}: {short(names[k['name']])} uses local memory "
                            f"(stack {k['stack']} B, spill stores {k['stores']} B, loads {k['loads']} B)")
    if not kernels:
        failures.append("no kernel was compiled: ptxas -v printed nothing")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"cuda-check: {len(kernels)} kernel builds, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
