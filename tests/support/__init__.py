"""Test helpers: the real Mosquitto broker and tiny ONNX models built in code."""
