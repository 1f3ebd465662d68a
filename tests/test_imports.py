"""The edge path stays light: runtime, device_agents and the agent-side CLI never import torch or onnx."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent)
    return set(proc.stdout.split())


HEAVY = {"torch", "onnx", "onnxscript", "sklearn", "matplotlib"}


def test_runtime_serving_a_package_imports_no_torch(signed_digits_package, keys_dir: Path):
    modules = _modules_after(f"""
        import runtime, device_agents
        from runtime.signing import load_public_key
        key = load_public_key(__import__('pathlib').Path({str(keys_dir / 'fleet.pub')!r}))
        model = runtime.Model({str(signed_digits_package.path)!r}, trusted_keys=[key],
                              require_signed=True)
        batcher = runtime.MicroBatcher(model)
        batcher.run(model.sample_inputs()["image"][0])
        batcher.close()
    """)
    assert "onnxruntime" in modules
    assert not HEAVY & modules, HEAVY & modules


def test_cli_package_commands_import_no_torch(signed_digits_package, keys_dir: Path):
    modules = _modules_after(f"""
        from edgefleet.cli import cli
        for args in (["--help"], ["package", "info", {str(signed_digits_package.path)!r}],
                     ["package", "verify", {str(signed_digits_package.path)!r},
                      "--key", {str(keys_dir / 'fleet.pub')!r}]):
            try:
                cli(args, standalone_mode=False)
            except SystemExit as exc:
                assert not exc.code, exc
    """)
    assert "runtime.cli" in modules
    assert not HEAVY & modules, HEAVY & modules


def test_the_running_agent_imports_no_torch(signed_digits_package, keys_dir: Path,
                                            tmp_path: Path) -> None:
    """The agent, wired up with a model and its outbox, as `edgefleet agent run` builds it."""
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "imports"\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[[models]]\npackage = "{signed_digits_package.path}"\n'
                      f'[security]\ntrusted_keys = ["{keys_dir / "fleet.pub"}"]\n')
    modules = _modules_after(f"""
        from edgefleet.cli import cli
        from device_agents.agent import Agent
        from device_agents.config import load_config
        try:
            cli(["agent", "check-config", "--config", {str(config)!r}], standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, exc
        agent = Agent(load_config({str(config)!r}))
        agent.outbox.close()
    """)
    assert {"device_agents.agent", "paho.mqtt.client", "device_agents.outbox"} <= modules
    assert not HEAVY & modules, HEAVY & modules
