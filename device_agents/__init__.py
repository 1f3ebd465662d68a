"""The edge side and the fleet side over MQTT: agent, delivery, fleet tools, sensors, link emulator.

Depends on `runtime` only; never imports torch.
"""
