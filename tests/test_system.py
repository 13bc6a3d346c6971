"""The machine modules on fakes: a recording NVML and a sysfs/procfs tree under tmp_path.

No test here touches a real GPU setting: ClockLock is only ever handed FakeNVML.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.errors import EnvironmentUnavailable, LabError
from lab.system import clocks, cpus, fingerprint, telemetry

HERE = Path(__file__).resolve().parent


class FakeNVML:
    """Enough of pynvml for the lab: fixed answers, and every call recorded (also to `log`)."""

    class NVMLError(Exception):
        def __init__(self, value=999):
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, *, log=None, init_fails=False, reasons=(0,), sm_clocks=(1980,), power_mw=(500_000,),
                 temperatures=(60,), memory_lock_supported=True, event_reasons_call=True):
        self.calls = []
        self.log = log
        self.init_fails = init_fails
        self._series = {"reasons": list(reasons), "sm": list(sm_clocks), "power": list(power_mw),
                        "temperature": list(temperatures)}
        self.memory_lock_supported = memory_lock_supported
        if not event_reasons_call:  # an older pynvml: only the "throttle reasons" name exists
            self.nvmlDeviceGetCurrentClocksEventReasons = None

    def _record(self, name, *args):
        self.calls.append((name, *args))
        if self.log:
            with open(self.log, "a") as f:
                f.write(" ".join(map(str, (name, *args))) + "\n")

    def _next(self, key):
        series = self._series[key]
        return series.pop(0) if len(series) > 1 else series[0]

    def names(self):
        return [c[0] for c in self.calls]

    # reading
    def nvmlInit(self):
        self._record("nvmlInit")
        if self.init_fails:
            raise self.NVMLError(12)  # NVML_ERROR_LIBRARY_NOT_FOUND

    def nvmlShutdown(self):
        self._record("nvmlShutdown")

    def nvmlDeviceGetHandleByIndex(self, index):
        if index >= 2:
            raise self.NVMLError(2)
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return {"GPU-aaaa": "gpu0", "GPU-bbbb": "gpu1"}[uuid]

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-aaaa" if h == "gpu0" else "GPU-bbbb"

    def nvmlDeviceGetPciInfo(self, h):
        return type("PciInfo", (), {"busId": b"00000000:3B:00.0"})()

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetVbiosVersion(self, h):
        raise self.NVMLError(3)  # not supported: the field must come back None

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Memory", (), {"total": 80 * 2**30})()

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetPersistenceMode(self, h):
        return 1

    def nvmlDeviceGetMigMode(self, h):
        return (0, 0)

    def nvmlDeviceGetEccMode(self, h):
        return (1, 1)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self._next("sm") if kind == telemetry.CLOCK_SM else 2619

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980 if kind == telemetry.CLOCK_SM else 2619

    def nvmlDeviceGetApplicationsClock(self, h, kind):
        return 1755 if kind == telemetry.CLOCK_SM else 2619

    def nvmlDeviceGetPowerUsage(self, h):
        return self._next("power")

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._next("temperature")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._record("nvmlDeviceGetCurrentClocksEventReasons")
        return self._next("reasons")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        self._record("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self._next("reasons")

    def nvmlDeviceGetSupportedMemoryClocks(self, h):
        return [2619, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, h, mem_mhz):
        return list(range(1980, 330, -15))

    # changing (recorded, never real)
    def nvmlDeviceSetGpuLockedClocks(self, h, low, high):
        self._record("nvmlDeviceSetGpuLockedClocks", h, low, high)

    def nvmlDeviceSetMemoryLockedClocks(self, h, low, high):
        self._record("nvmlDeviceSetMemoryLockedClocks", h, low, high)
        if not self.memory_lock_supported:
            raise self.NVMLError(telemetry.ERROR_NOT_SUPPORTED)

    def nvmlDeviceResetGpuLockedClocks(self, h):
        self._record("nvmlDeviceResetGpuLockedClocks", h)

    def nvmlDeviceResetMemoryLockedClocks(self, h):
        self._record("nvmlDeviceResetMemoryLockedClocks", h)
        if not self.memory_lock_supported:
            raise self.NVMLError(telemetry.ERROR_NOT_SUPPORTED)


def as_root():
    return 0


def write(root: Path, relative: str, text: str):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def sysfs(tmp_path):
    """A 8-CPU, 2-node machine: CPUs 0-3 on node 0, 4-7 on node 1 (the GPU's), SMT pairs (n, n+4)."""
    root = tmp_path / "root"
    write(root, "sys/bus/pci/devices/0000:3b:00.0/numa_node", "1\n")
    write(root, "sys/bus/pci/devices/0000:5e:00.0/numa_node", "-1\n")
    write(root, "sys/devices/system/node/node0/cpulist", "0-3\n")
    write(root, "sys/devices/system/node/node1/cpulist", "4-7\n")
    write(root, "sys/devices/system/cpu/isolated", "\n")
    write(root, "sys/devices/system/cpu/intel_pstate/no_turbo", "1\n")
    for c in range(8):
        write(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor", "performance\n")
        write(root, f"sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list", f"{c % 4},{c % 4 + 4}\n")
    write(root, "proc/cpuinfo", "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    write(root, "proc/meminfo", "MemTotal:       2113403928 kB\nMemFree:  1 kB\n")
    return root


# --- fingerprint ----------------------------------------------------------------------------
def test_fingerprint_collects_gpu_cpu_os_software_and_extra(sysfs):
    fp = fingerprint.collect({"harness_lock": "abc"}, nvml=FakeNVML(reasons=(0x4,)), root=sysfs)
    gpu = fp["gpu"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["uuid"] == "GPU-aaaa"
    assert gpu["pci_bus_id"] == "00000000:3B:00.0" and gpu["cuda_driver"] == "12.8"
    assert gpu["vbios"] is None  # NVMLError -> None, never an exception
    assert gpu["power_limit_w"] == 700 and gpu["ecc"] == 1 and gpu["mig"] == 0
    assert gpu["clocks"]["max_sm_mhz"] == 1980 and gpu["clock_event_reasons"] == ["sw_power_cap"]
    assert fp["cpu"]["model"] == "Intel(R) Xeon(R) Platinum 8480+" and fp["cpu"]["turbo"] is False
    assert fp["os"]["memory_bytes"] == 2113403928 * 1024
    assert fp["software"]["numpy"] and fp["software"]["python"]
    assert fp["harness_lock"] == "abc"


def test_fingerprint_without_nvml_has_no_gpu(sysfs):
    assert fingerprint.collect(nvml=FakeNVML(init_fails=True), root=sysfs)["gpu"] is None
    assert fingerprint.collect(gpu_index=None, root=sysfs)["gpu"] is None


def test_fingerprint_differences_ignore_volatile_fields(sysfs):
    a = fingerprint.collect({"harness_lock": "abc", "run": "r1", "candidate_source": "s1"},
                            nvml=FakeNVML(sm_clocks=(1980,), temperatures=(40,)), root=sysfs)
    b = fingerprint.collect({"harness_lock": "abc", "run": "r2", "candidate_source": "s2"},
                            nvml=FakeNVML(sm_clocks=(1410,), temperatures=(80,), reasons=(0x4,)), root=sysfs)
    b["cpu"]["affinity"] = [7]
    assert fingerprint.differences(a, b) == [] and fingerprint.comparable(a, b)

    b["gpu"]["driver"] = "575.0"
    b["harness_lock"] = "def"
    del b["gpu"]["ecc"]
    assert fingerprint.differences(a, b) == ["gpu.driver", "gpu.ecc", "harness_lock"]
    assert not fingerprint.comparable(a, b)
    assert "gpu" in fingerprint.differences(a, {**a, "gpu": None})


# --- telemetry ------------------------------------------------------------------------------
def test_telemetry_block_summarises_samples():
    nvml = FakeNVML(sm_clocks=(1980, 1500), power_mw=(600_000, 700_000), temperatures=(60, 71),
                    reasons=(0x4, 0x1 | 0x4))
    gpu = telemetry.GpuTelemetry(0, nvml=nvml, interval_s=None)
    assert gpu.available
    with gpu.block(3) as monitor:
        pass
    block = monitor.result
    assert (block.index, block.sm_clock_mhz, block.mem_clock_mhz) == (3, 1500, 2619)
    assert block.power_w == pytest.approx(650) and block.temperature_c == 71
    assert block.reasons == ["gpu_idle", "sw_power_cap"]
    assert block.throttled is False  # the power cap alone is shared by both sides: kept


@pytest.mark.parametrize("bits, name", [(0x8, "hw_slowdown"), (0x20, "sw_thermal"), (0x40, "hw_thermal"),
                                        (0x80, "hw_power_brake")])
def test_telemetry_thermal_or_hardware_slowdown_throttles(bits, name):
    gpu = telemetry.GpuTelemetry(0, nvml=FakeNVML(reasons=(0, bits)), interval_s=None)
    with gpu.block(0) as monitor:
        pass
    assert monitor.result.throttled and name in monitor.result.reasons


def test_telemetry_polls_in_the_background_and_survives_an_exception():
    nvml = FakeNVML()
    gpu = telemetry.GpuTelemetry(0, nvml=nvml, interval_s=0.005)
    with pytest.raises(RuntimeError):
        with gpu.block(1) as monitor:
            time.sleep(0.1)
            raise RuntimeError("the harness failed")
    assert monitor.result.index == 1 and monitor.result.sm_clock_mhz == 1980
    assert nvml.names().count("nvmlDeviceGetCurrentClocksEventReasons") > 3  # entry, polls, exit


def test_telemetry_falls_back_to_throttle_reasons():
    nvml = FakeNVML(event_reasons_call=False, reasons=(0x40,))
    gpu = telemetry.GpuTelemetry(0, nvml=nvml, interval_s=None)
    with gpu.block(0) as monitor:
        pass
    assert monitor.result.throttled and "nvmlDeviceGetCurrentClocksThrottleReasons" in nvml.names()


def test_telemetry_without_nvml_gives_empty_blocks():
    gpu = telemetry.GpuTelemetry(0, nvml=FakeNVML(init_fails=True))
    assert not gpu.available
    with gpu.block(2) as monitor:
        pass
    assert monitor.result.index == 2 and monitor.result.sm_clock_mhz is None and not monitor.result.throttled
    assert not telemetry.GpuTelemetry(5, nvml=FakeNVML()).available  # no such GPU


def test_device_handle_follows_cuda_visible_devices(monkeypatch):
    nvml = FakeNVML()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert telemetry.device_handle(nvml, 1) == "gpu1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert telemetry.device_handle(nvml, 0) == "gpu1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert telemetry.device_handle(nvml, 1) == "gpu0"


# --- clocks ---------------------------------------------------------------------------------
def test_parse_clocks_option():
    assert clocks.parse_clocks_option("monitor") == ("monitor", None)
    assert clocks.parse_clocks_option("lock") == ("lock", None)
    assert clocks.parse_clocks_option("lock=1500") == ("lock", 1500)
    for garbage in ("", "locked", "lock=", "lock=fast", "lock=-5", "monitor=3", "lock=0"):
        with pytest.raises(LabError, match="--clocks takes"):
            clocks.parse_clocks_option(garbage)


def test_clock_lock_refuses_without_root():
    nvml = FakeNVML()
    with pytest.raises(EnvironmentUnavailable, match="needs root"):
        with clocks.ClockLock(0, nvml=nvml, geteuid=lambda: 1000):
            pass
    assert not [c for c in nvml.names() if "Locked" in c]


def test_clock_lock_refuses_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now fails, as where it is absent
    with pytest.raises(EnvironmentUnavailable, match="needs NVML"):
        with clocks.ClockLock(0, geteuid=as_root):
            pass
    with pytest.raises(EnvironmentUnavailable, match="needs NVML"):  # the package, but no driver
        with clocks.ClockLock(0, nvml=FakeNVML(init_fails=True), geteuid=as_root):
            pass


def test_clock_lock_picks_a_supported_clock_below_the_knee_and_restores():
    nvml = FakeNVML()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with clocks.ClockLock(0, nvml=nvml, geteuid=as_root) as lock:
        assert lock.sm_mhz == 1575  # 80% of 1980 = 1584, snapped down to the 15 MHz grid
        assert lock.mem_mhz == 2619
        assert signal.getsignal(signal.SIGTERM) != before[0]
    locked = [c for c in nvml.calls if "Locked" in c[0]]
    assert locked == [("nvmlDeviceSetGpuLockedClocks", "gpu0", 1575, 1575),
                      ("nvmlDeviceSetMemoryLockedClocks", "gpu0", 2619, 2619),
                      ("nvmlDeviceResetGpuLockedClocks", "gpu0"),
                      ("nvmlDeviceResetMemoryLockedClocks", "gpu0")]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_clock_lock_at_a_requested_clock_and_out_of_range():
    nvml = FakeNVML(memory_lock_supported=False)
    with clocks.ClockLock(0, sm_mhz=1500, nvml=nvml, geteuid=as_root) as lock:
        assert lock.sm_mhz == 1500 and lock.mem_mhz is None  # NotSupported on memory: ignored
    assert ("nvmlDeviceResetGpuLockedClocks", "gpu0") in nvml.calls
    nvml = FakeNVML()
    with pytest.raises(LabError, match="between"):
        with clocks.ClockLock(0, sm_mhz=3000, nvml=nvml, geteuid=as_root):
            pass
    assert not [c for c in nvml.names() if "Locked" in c]


def test_clock_lock_restores_on_exception_and_sigint(tmp_path):
    nvml = FakeNVML()
    with pytest.raises(ZeroDivisionError):
        with clocks.ClockLock(0, nvml=nvml, geteuid=as_root):
            1 / 0
    assert nvml.names()[-2:] == ["nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks"]

    # SIGINT in a process of its own: signal dispositions and masks are the whole process's, and
    # libraries that earlier tests load into pytest's process (Ray's driver, for one) change them.
    log = tmp_path / "calls.log"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(HERE)!r})
        from test_system import FakeNVML
        from lab.system.clocks import ClockLock
        # A process started with SIGINT ignored keeps it ignored (pytest's process can be such a
        # one, through a library earlier tests loaded, or `nohup`); a terminal's process has
        # Python's handler, which is the case under test.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with ClockLock(0, nvml=FakeNVML(log={str(log)!r}), geteuid=lambda: 0):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # not reached: the handler raises KeyboardInterrupt
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "KeyboardInterrupt", (done.stdout, done.stderr)
    resets = [line.split()[0] for line in log.read_text().splitlines() if line.startswith("nvmlDeviceReset")]
    assert resets == ["nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks"]  # once


def test_clock_lock_restores_when_the_process_gets_sigterm(tmp_path):
    log = tmp_path / "calls.log"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from test_system import FakeNVML
        from lab.system.clocks import ClockLock
        with ClockLock(0, nvml=FakeNVML(log={str(log)!r}), geteuid=lambda: 0):
            print("locked", flush=True)
            time.sleep(30)
        print("not reached", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM  # it still dies of the signal
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = [line.split()[0] for line in log.read_text().splitlines()]
    assert calls[-2:] == ["nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks"]
    assert "nvmlDeviceSetGpuLockedClocks" in calls and "not reached" not in proc.stdout.read()


# --- cpus -----------------------------------------------------------------------------------
def test_parse_cpulist():
    assert cpus.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert cpus.parse_cpulist("") == []
    with pytest.raises(ValueError):
        cpus.parse_cpulist("0-x")


def test_gpu_numa_node(sysfs):
    assert cpus.gpu_numa_node("00000000:3B:00.0", root=sysfs) == 1
    assert cpus.gpu_numa_node("0000:3b:00.0", root=sysfs) == 1
    assert cpus.gpu_numa_node("00000000:5E:00.0", root=sysfs) is None  # -1: no NUMA information
    assert cpus.gpu_numa_node("00000000:AF:00.0", root=sysfs) is None  # not there
    assert cpus.node_cpus(1, root=sysfs) == [4, 5, 6, 7]


def test_choose_timing_cpus(sysfs):
    every = range(8)
    assert cpus.choose_timing_cpus(1, root=sysfs, allowed=every) == [7]
    assert cpus.choose_timing_cpus(2, node=0, root=sysfs, allowed=every) == [2, 3]  # the GPU's node first
    assert cpus.choose_timing_cpus(1, node=0, avoid=[3], root=sysfs, allowed=every) == [2]
    assert cpus.choose_timing_cpus(5, node=0, root=sysfs, allowed=every) == [0, 1, 2, 3, 7]
    assert cpus.choose_timing_cpus(8, root=sysfs, allowed=every) == [1, 2, 3, 4, 5, 6, 7]  # never all
    assert cpus.choose_timing_cpus(1, root=sysfs, allowed=[5]) == [5]
    write(sysfs, "sys/devices/system/cpu/isolated", "1\n")
    assert cpus.choose_timing_cpus(1, node=1, root=sysfs, allowed=every) == [1]  # isolated beats all


def test_rest_cpus_leave_out_timing_cores_and_their_siblings(sysfs):
    assert cpus.rest_cpus([7], root=sysfs, allowed=range(8)) == [0, 1, 2, 4, 5, 6]
    assert cpus.rest_cpus([7], root=sysfs, allowed=[3, 7]) == [3]  # only a sibling is left: use it
    assert cpus.rest_cpus([0], root=sysfs, allowed=[0]) == [0]


def test_cpu_state(sysfs):
    state = cpus.cpu_state([6, 7], root=sysfs)
    assert state == {"governor": {"6": "performance", "7": "performance"}, "turbo": False, "isolated": []}
    (sysfs / "sys/devices/system/cpu/intel_pstate/no_turbo").unlink()
    assert cpus.turbo(root=sysfs) is None
    write(sysfs, "sys/devices/system/cpu/cpufreq/boost", "1\n")
    assert cpus.turbo(root=sysfs) is True


def test_busy_cpus_from_two_reads_of_proc_stat(sysfs):
    def stat(busy_ticks, total):  # user ticks busy, the rest idle; guest (field 9) is inside user
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{c} {b} 0 0 {total - b} 0 0 0 0 {b} 0" for c, b in enumerate(busy_ticks)]
        return "\n".join(lines + ["intr 12345", "ctxt 999"]) + "\n"

    write(sysfs, "proc/stat", stat([0, 0, 0, 0], 0))
    # over the interval: cpu 1 90% busy, cpu 2 30%
    busy = cpus.busy_cpus([0, 1, 2, 3], root=sysfs,
                          sleep=lambda s: write(sysfs, "proc/stat", stat([0, 900, 300, 0], 1000)))
    assert busy == [1]


def test_pin_sets_this_process_affinity():
    original = os.sched_getaffinity(0)
    target = max(original)
    try:
        cpus.pin([target])
        assert os.sched_getaffinity(0) == {target}
    finally:
        os.sched_setaffinity(0, original)


def test_a_harness_adds_its_own_packages_to_the_fingerprint(tmp_path):
    import importlib.metadata

    fp = fingerprint.collect(gpu_index=None, root=tmp_path, software=("click", "no-such-distribution"))
    assert fp["software"]["click"] == importlib.metadata.version("click")
    assert fp["software"]["no-such-distribution"] is None  # recorded as absent, not dropped
    assert "torch" in fp["software"]  # the lab's own list stays
