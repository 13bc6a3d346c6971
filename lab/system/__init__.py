"""The machine under the measurement: its fingerprint, GPU telemetry, clock locking and CPU placement.

Each module is imported on its own (`from lab.system.fingerprint import collect`); NVML is
imported only when one of them asks for the GPU.
"""
