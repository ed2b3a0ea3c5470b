"""The README stays true: every config key documented, every JSON example valid."""

from __future__ import annotations

import json
import re
import typing

import aiohttp
import pytest
import trustme

from stickylb.config import Config, _model_of, load_config

from .support import ROOT, backends, balancer

README = (ROOT / "README.md").read_text()
JSON_BLOCKS = re.findall(r"```json\n(.*?)```", README, flags=re.S)


def config_paths(model: type = Config, prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        paths.append(path)
        sub = _model_of(field.annotation)
        if sub is not None:
            is_list = typing.get_origin(field.annotation) is list
            paths += config_paths(sub, path + ("[]." if is_list else "."))
    return paths


def test_every_config_key_is_in_the_readme_table():
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    table_keys = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    missing = [path for path in config_paths() if path not in table_keys]
    assert not missing, f"add these to the README configuration table: {missing}"
    unknown = table_keys - set(config_paths())
    assert not unknown, f"the README documents keys the config does not have: {unknown}"


def test_readme_has_json_examples():
    assert len(JSON_BLOCKS) >= 6


@pytest.mark.parametrize("block", [b for b in JSON_BLOCKS if '"port"' in b][:20])
def test_every_readme_config_example_loads(block, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples.checks:... resolve from the project folder
    path = tmp_path / "example.json"
    data = json.loads(block)
    if "tls" in data:  # the example's certificate paths, made real for the test
        cert = trustme.CA().issue_cert("localhost")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        data["tls"].update(cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    path.write_text(json.dumps(data))
    load_config(path)


async def test_the_readme_status_example_has_the_live_keys():
    examples = [json.loads(b) for b in JSON_BLOCKS if '"timestamp"' in b]
    assert len(examples) == 1
    example = examples[0]
    async with backends("a") as servers:
        config = {"port": 0, "backends": [{"id": "a", "url": servers[0].url}]}
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_lb/health") as resp:
                live = await resp.json()
    assert set(example) == set(live)
    assert set(example["backends"][0]) == set(live["backends"][0])
    assert set(example["backends"][0]["healthCheck"]) == set(live["backends"][0]["healthCheck"])


def test_config_example_is_valid(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "config.example.json")
    assert len(config.backends) == 3
    assert any(b.health_check is not None for b in config.backends)
    assert any(b.health_path is not None for b in config.backends)
    assert len({b.weight for b in config.backends}) > 1


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = commands[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
    run_command = commands[0].strip()
    assert "config.example.json" in run_command


def test_contributing_names_every_module():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    package = ROOT / "stickylb"
    modules = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name != "__init__.py" and p.parent.name != "demo"
    ]
    missing = [m for m in modules if f"`{m}`" not in text and f"{m}`" not in text]
    assert not missing, missing
