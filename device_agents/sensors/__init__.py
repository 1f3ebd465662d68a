"""Simulated sensors: sample sources (`datasets`) and a paced MQTT publisher (`simulate`).

Used by `edgefleet sensor simulate`, the demo and the benchmarks. Nothing here imports torch.
"""

from device_agents.sensors.datasets import Dataset, DatasetError, load_dataset
from device_agents.sensors.simulate import Progress, SensorError, SensorSimulator, Summary

__all__ = ["Dataset", "DatasetError", "Progress", "SensorError", "SensorSimulator", "Summary",
           "load_dataset"]
