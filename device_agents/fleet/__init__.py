"""The fleet side: operators' tools that talk to agents over the same MQTT broker."""
