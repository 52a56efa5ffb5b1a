"""`make gpu-check` (`python -m mio.gpucheck OUT.json`): every check that needs a GPU, in one process
tree, into one JSON file of figures.

1. flash-attn from the GPU lock (requirements-gpu.lock, the `gpu` extra); where it cannot be installed
   (no prebuilt wheel for this machine's CUDA and torch, no nvcc to build one) the file says so and the
   checks run on without it: the flash-attn tests skip, the benches measure SDPA.
2. every test marked `gpu` (flash-attn varlen against SDPA, bf16 FSDP2 with checkpoint, resume and
   export, GPU prepare, ...): counts and the failures' names.
3. the GPU parts of `mio bench train` (MFU of the 1B model, FSDP2 on one GPU), `tokenizers` (bf16
   throughput by batch), `prepare` and `packing` (memory and speed per attention backend).

Each part is recorded on its own: one that fails leaves its error in the file and the others run.
Meant for a machine with one GPU, in at most 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

from mio.envcheck import read_lock, source_root

# Small enough for the 8-minute budget, large enough that the rates are steady.
BENCH_SIZES: dict[str, dict[str, Any]] = {
    "train": {"steps": 12, "warmup": 3, "repeats": 1, "cpu": False},
    "tokenizers": {"repeats": 2, "cpu_by_batch": False},
    "prepare": {"recording_s": 120.0, "windows": 6, "rows": 128},
    "packing": {"samples": 2000},
}


def install_flash_attn(root: Path) -> dict[str, Any]:
    """flash-attn at the GPU lock's version and hash; its build needs torch present (no isolation)."""
    lock = root / "requirements-gpu.lock"
    version = read_lock(lock)["flash-attn"].version
    try:
        import flash_attn

        if flash_attn.__version__ == version:
            return {"installed": version, "already": True}
    except ImportError:
        pass
    cuda = torch.version.cuda
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes",
                          "--no-build-isolation", "-r", str(lock)], capture_output=True, text=True)
    if out.returncode == 0:
        return {"installed": version}
    return {"installed": None, "error": (
        f"flash-attn {version} could not be installed for torch {torch.__version__} with CUDA {cuda}: no prebuilt "
        f"wheel matches this machine and building it needs nvcc for CUDA {cuda} (and about 30 minutes); the "
        f"checks go on with SDPA. Last lines of pip: {' | '.join(out.stderr.strip().splitlines()[-3:])}")}


def run_gpu_tests(root: Path, junit: Path) -> dict[str, Any]:
    """pytest -m gpu in its own process; the counts from its JUnit XML."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          f"--junitxml={junit}", str(root / "tests")], cwd=root, capture_output=True, text=True)
    counts: dict[str, Any] = {"exit_status": out.returncode, "seconds": round(time.perf_counter() - started, 1)}
    if junit.is_file():
        cases = ET.parse(junit).getroot().iter("testcase")
        failed, skipped, passed = [], [], 0
        for case in cases:
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            elif case.find("skipped") is not None:
                skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
            else:
                passed += 1
        counts.update(passed=passed, failed=failed, skipped=skipped)
    else:
        counts["output_tail"] = (out.stdout + out.stderr)[-3000:]
    return counts


def timed(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = part()
    except Exception:  # one part's failure is a figure of the check, not the end of it
        result = {"error": traceback.format_exc(limit=6)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def gpu_check(out: Path) -> dict[str, Any]:
    from mio.bench import bench_function

    root = source_root()
    if root is None:
        raise SystemExit("[mio] gpu-check runs in a source checkout (it runs the tests and reads the GPU lock)")
    if not torch.cuda.is_available():
        raise SystemExit(f"[mio] gpu-check: torch {torch.__version__} sees no CUDA device: run it on a machine "
                         f"with an NVIDIA GPU and its driver")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cuda": torch.version.cuda}
    report["flash_attn"] = timed(lambda: install_flash_attn(root))
    report["tests"] = timed(lambda: run_gpu_tests(root, out.with_suffix(".junit.xml")))
    for part, sizes in BENCH_SIZES.items():
        report[f"bench_{part}"] = timed(lambda part=part, sizes=sizes: bench_function(part)(**sizes))
        out.write_text(json.dumps(report, indent=1))  # what is done so far survives a later kill
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mio.gpucheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON file of figures to write")
    args = parser.parse_args(argv)
    report = gpu_check(args.out)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    tests = report["tests"]
    return 0 if not tests.get("failed") and tests.get("exit_status") in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())
