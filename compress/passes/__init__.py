"""Compression passes, one module each. Imported by the pipeline when needed (torch and onnx are
heavy), never by `import compress`."""
