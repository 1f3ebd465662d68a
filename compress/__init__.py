"""Model compression: export, prune and quantize trained models into signed ONNX packages.

Heavy libraries (torch, onnx) are imported by the modules that need them, never here.
"""
