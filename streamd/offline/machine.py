"""What machine a figure came from: the CPU, its instruction sets, the cores this process may
use, onnxruntime and its providers. ``streamd bench`` reports it with every run (issue 31): an
int8 model ran 1.4-1.7 times faster on an AVX-512 VNNI Xeon than on an AVX2-only AMD EPYC
(BENCHMARKS.md, machines A and D), so a figure without its machine says little.

``parse_cpuinfo`` is pure (the text of /proc/cpuinfo in, a dict out) so that other machines'
files can be checked; ``describe`` reads this one's.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction sets the models' kernels use, in /proc/cpuinfo's names: AVX2 and FMA (every
# x86 kernel), AVX-512, the int8 dot products (VNNI, 512- or 256-bit), AMX tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def parse_cpuinfo(text: str) -> dict:
    """The first processor's model name, vendor, family, model and which of ``ISA_FLAGS`` it
    has (in that order), from the text of /proc/cpuinfo (x86 Linux; other fields are ignored)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: they are all the same CPU
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or "unknown",
        "vendor": fields.get("vendor_id"),
        "family": _int(fields.get("cpu family")),
        "model": _int(fields.get("model")),
        "isa": [f for f in ISA_FLAGS if f in flags],
    }


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def cores() -> int:
    """The cores this process may run on (a taskset or a container's cpuset counts, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe(cpuinfo: str | Path = "/proc/cpuinfo", providers_used: dict[str, str] | None = None) -> dict:
    """This machine: ``parse_cpuinfo`` of ``cpuinfo`` (or the platform's processor name where
    there is no such file), the usable cores, onnxruntime's version and the providers it has;
    ``providers_used``, the provider each loaded model runs on, is passed through."""
    try:
        cpu = parse_cpuinfo(Path(cpuinfo).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        cpu = {"cpu": platform.processor() or platform.machine() or "unknown", "vendor": None, "family": None,
               "model": None, "isa": []}
    try:
        import onnxruntime

        ort = {"onnxruntime": onnxruntime.__version__, "providers_available": onnxruntime.get_available_providers()}
    except ImportError:
        ort = {"onnxruntime": None, "providers_available": []}
    return {**cpu, "cores": cores(), **ort, "providers_used": dict(providers_used or {})}


def summary(machine: dict) -> str:
    """One line: ``Intel(R) Xeon(R) Processor (family 6 model 167), 2 cores, avx2 fma ...; onnxruntime 1.31.1``."""
    ident = f" (family {machine['family']} model {machine['model']})" if machine.get("family") is not None else ""
    isa = " ".join(machine["isa"]) or "none of " + "/".join(ISA_FLAGS)
    used = sorted(set(machine.get("providers_used", {}).values()))
    return (f"{machine['cpu']}{ident}, {machine['cores']} cores, {isa}; onnxruntime {machine['onnxruntime']} "
            f"(has {', '.join(machine['providers_available'])}; models on {', '.join(used) or '-'})")
