"""`streamd bench` names the machine its figures came from (issue 31): the CPU, its instruction
sets, the cores, onnxruntime. The parsing is checked on other machines' /proc/cpuinfo."""

import os

from streamd.offline.machine import ISA_FLAGS, describe, parse_cpuinfo, summary

# The first processor of a 2-vCPU cloud VM on AMD EPYC (Zen 3): AVX2 and FMA, no AVX-512, no VNNI.
AMD_EPYC = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7B13
stepping	: 0
microcode	: 0xffffffff
cpu MHz		: 2449.998
cache size	: 512 KB
physical id	: 0
siblings	: 2
core id		: 0
cpu cores	: 1
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes vpclmulqdq rdpid fsrm
bogomips	: 4899.99

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B13
flags		: fpu avx512f avx512_vnni
"""

# This project's machine (KVM guest): AVX-512 with VNNI, AVX-VNNI and AMX tiles.
INTEL_XEON = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 167
model name	: Intel(R) Xeon(R) Processor
stepping	: 1
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities
bogomips	: 5200.00
"""


def test_an_avx2_only_amd_epyc():
    cpu = parse_cpuinfo(AMD_EPYC)
    assert cpu == {"cpu": "AMD EPYC 7B13", "vendor": "AuthenticAMD", "family": 25, "model": 1,
                   "isa": ["avx2", "fma"]}  # the second block's flags are not the first processor's


def test_an_intel_xeon_with_avx512_vnni_and_amx():
    cpu = parse_cpuinfo(INTEL_XEON)
    assert cpu["cpu"] == "Intel(R) Xeon(R) Processor" and (cpu["family"], cpu["model"]) == (6, 167)
    assert cpu["isa"] == list(ISA_FLAGS)


def test_no_cpuinfo_still_describes_the_machine(tmp_path):
    m = describe(tmp_path / "absent", {"speaker": "CPUExecutionProvider"})
    assert m["isa"] == [] and m["cpu"] and m["cores"] == len(os.sched_getaffinity(0))
    assert m["onnxruntime"] and "CPUExecutionProvider" in m["providers_available"]
    assert m["providers_used"] == {"speaker": "CPUExecutionProvider"}


def test_summary_is_one_line(tmp_path):
    (tmp_path / "cpuinfo").write_text(AMD_EPYC)
    line = summary(describe(tmp_path / "cpuinfo", {"a": "CPUExecutionProvider"}))
    assert "\n" not in line
    assert line.startswith("AMD EPYC 7B13 (family 25 model 1), ") and " avx2 fma; onnxruntime " in line
    assert line.endswith("models on CPUExecutionProvider)")
