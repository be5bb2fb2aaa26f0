"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

No engine runs on these machines, so the files are parsed, every service's command
is checked to be a valid `downpour` invocation with a valid environment, and a
cluster is run from exactly those commands and environments as local processes.
The only substitutions are what Docker itself provides: the service name
`scheduler` resolves to 127.0.0.1, each server replica gets a port of its own
(containers each have their own address; local processes share one), the
volumes are directories under tmp_path, and each service's secrets are the files
it names, copied from the keys the `keys` service's command wrote.
"""

import json
import re
import socket
import subprocess

import pytest
from conftest import ROOT

from downpour import cli
from downpour.common import config
from downpour.common.wire import security
from downpour.launch import CLI, child_env

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose files: pip install -e '.[test]'")

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_instructions():
    """[(INSTRUCTION, argument text)] with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def substitute(value, variables):
    """Docker Compose's ${VAR:-default} interpolation."""
    def one(m):
        name, default = m.group(1), m.group(3) or ""
        return str(variables.get(name, default))
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", one, str(value))


def service_env(service, variables):
    return {k: substitute(v, variables) for k, v in (service.get("environment") or {}).items()}


def test_dockerfile_is_one_slim_image_whose_entrypoint_drops_root():
    """The entrypoint starts as root only to open the output folders, then runs downpour
    as an unprivileged user (deploy/entrypoint.sh); a container test checks the uid."""
    instructions = dockerfile_instructions()
    base = dict(instructions)["FROM"]
    assert base.startswith("python:3.11") and base.endswith("-slim")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["downpour-entrypoint"]
    assert not [arg for w, arg in instructions if w == "USER"]
    script = (ROOT / "deploy" / "entrypoint.sh").read_text()
    runs = [line.strip() for line in script.splitlines() if line.strip().startswith("exec ")]
    assert runs == ['exec downpour "$@"',
                    'exec setpriv --reuid="$uid" --regid="$gid" --clear-groups downpour "$@"']
    assert "uid=10001" in script
    copied = " ".join(arg for w, arg in instructions if w == "COPY")
    for needed in ("pyproject.toml", "app", "common", "ps", "worker", "deploy/entrypoint.sh"):
        assert needed in copied
    assert any("pip install ." in arg for w, arg in instructions if w == "RUN")


def test_compose_restarts_crashed_nodes_a_bounded_number_of_times(compose):
    services = compose["services"]
    assert services["scheduler"]["restart"] == "no"
    for name in ("server", "worker"):
        policy, _, count = services[name]["restart"].partition(":")
        assert policy == "on-failure" and 1 <= int(count) <= 5, name
    assert services["server"]["environment"]["DOWNPOUR_RESUME"] == "1"


def test_compose_services_scale_and_share_one_image(compose):
    services = compose["services"]
    assert set(services) == {"keys", "scheduler", "server", "worker"}
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert "container_name" not in service, f"{name} could not be scaled"
        assert "ports" not in service, f"{name}: host ports clash when scaled"
    for name in ("scheduler", "server"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert "checkpoints" in compose["volumes"]
    assert any("/checkpoints" in v for v in services["server"]["volumes"])
    assert any(v.endswith(":/runs") for v in services["scheduler"]["volumes"])
    assert any(":/data" in v for v in services["worker"]["volumes"])


def test_each_service_gets_only_its_own_roles_secret_after_the_keys_exist(compose):
    services, secrets = compose["services"], compose["secrets"]
    assert cli.parser().parse_args(services["keys"]["command"]).command == "keys"
    assert any(v.endswith(":/keys") for v in services["keys"]["volumes"])
    for role in security.ROLES:
        service = services[role]
        assert service["environment"]["DOWNPOUR_KEYS"] == "/run/secrets"
        held = {secrets[name]["file"].rsplit("/", 1)[1] for name in service["secrets"]}
        assert held == {f"{role}.key_secret", "scheduler.key", "server.key", "worker.key"}, role
        assert service["depends_on"]["keys"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", ["scheduler", "server", "worker"])
def test_every_command_is_a_valid_downpour_invocation(compose, name):
    service = compose["services"][name]
    args = cli.parser().parse_args(service["command"])   # the entrypoint is `downpour`
    assert args.command == name
    env = service_env(service, {})
    assert all(k.startswith(config.ENV_PREFIX) for k in env)
    cfg = config.resolve(args, environ=env)              # every variable is a known setting
    if name != "scheduler":
        assert cfg.scheduler == "tcp://scheduler:5555"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_from_the_compose_commands_finishes_a_training_run(compose, tmp_path):
    variables = {"WORKERS": 2, "SHARDS": 2, "EPOCHS": 1, "SYNTHETIC": 2000}
    volumes = {"/runs": tmp_path / "runs", "/checkpoints": tmp_path / "checkpoints",
               "/data": tmp_path / "data", "/keys": tmp_path / "keys"}
    for d in volumes.values():
        d.mkdir()
    port = free_port()
    assert compose["services"]["keys"]["command"] == ["keys", "/keys"]
    security.write_keys(volumes["/keys"])                    # what the keys service does

    def localise(value):
        value = value.replace("scheduler:5555", f"127.0.0.1:{port}").replace("*:5555", f"*:{port}")
        for inside, outside in volumes.items():
            if value.startswith(inside):
                value = str(outside) + value[len(inside):]
        return value

    base = child_env()
    procs = []

    def start(name):
        service = compose["services"][name]
        env = {k: localise(v) for k, v in service_env(service, variables).items()}
        if name == "server":
            env["DOWNPOUR_BIND"] = env["DOWNPOUR_BIND"].replace(":6000", f":{free_port()}")
        secrets = tmp_path / f"secrets-{name}-{len(procs)}"        # /run/secrets: its files only
        secrets.mkdir()
        for secret in service["secrets"]:
            source = volumes["/keys"] / compose["secrets"][secret]["file"].rsplit("/", 1)[1]
            (secrets / source.name).write_bytes(source.read_bytes())
        env["DOWNPOUR_KEYS"] = str(secrets)
        p = subprocess.Popen([*CLI, *service["command"]],
                             env={**base, **env}, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        scheduler = start("scheduler")
        nodes = [start("server") for _ in range(variables["SHARDS"])]
        nodes += [start("worker") for _ in range(variables["WORKERS"])]
        out, err = scheduler.communicate(timeout=180)
        assert scheduler.returncode == 0, err
        for node in nodes:
            _, node_err = node.communicate(timeout=30)
            assert node.returncode == 0, node_err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    lines = [json.loads(line) for line in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "end" and lines[-1]["workers"] == 2 and lines[-1]["shards"] == 2
    assert (tmp_path / "runs" / "model.npz").is_file()
    assert len(list((tmp_path / "checkpoints").glob("piece-*.npz"))) >= 2   # written on shutdown


STACK = ROOT / "deploy" / "stack.yml"


@pytest.mark.parametrize("path", [COMPOSE, STACK], ids=["compose", "stack"])
def test_every_role_gets_link_and_net_admin_and_nothing_else_does(path):
    """LINK reaches each role as DOWNPOUR_LINK, the setting --link of local runs (so a rate
    downpour would refuse, the entrypoint refuses too), with NET_ADMIN for the entrypoint to
    shape eth0 (deploy/shape-link.sh); unset, it is empty: no shaping. The one-shot `keys`
    service has neither."""
    services = yaml.safe_load(path.read_text())["services"]
    for role in security.ROLES:
        service = services[role]
        assert service["cap_add"] == ["NET_ADMIN"], role
        assert service_env(service, {})["DOWNPOUR_LINK"] == "", role
        env = service_env(service, {"LINK": "100mbit"})
        args = cli.parser().parse_args(service["command"])
        assert config.resolve(args, environ=env).link == "100mbit", role
        with pytest.raises(config.ConfigError, match="expected a rate as tc writes it"):
            config.resolve(args, environ=service_env(service, {"LINK": "100mb"}))
    for name in set(services) - set(security.ROLES):
        assert "cap_add" not in services[name], name
        assert "DOWNPOUR_LINK" not in (services[name].get("environment") or {}), name


def test_the_image_can_shape_and_the_entrypoint_does_it_before_dropping_root():
    """iproute2 (ip, tc) is in the image with the shaping script, and the entrypoint runs the
    script before the line that drops to the user (tc needs root's NET_ADMIN)."""
    instructions = dockerfile_instructions()
    assert any("install" in arg and "iproute2" in arg for w, arg in instructions if w == "RUN")
    copies = [arg.split() for w, arg in instructions if w == "COPY"]
    assert ["deploy/shape-link.sh", "/usr/local/bin/downpour-shape-link"] in copies
    assert (ROOT / "deploy" / "shape-link.sh").read_text().startswith("#!/bin/sh\n")
    script = [line.strip() for line in (ROOT / "deploy" / "entrypoint.sh").read_text().splitlines()]
    shapes = [i for i, line in enumerate(script)
              if "downpour-shape-link" in line and not line.startswith("#")]
    drop = script.index('exec setpriv --reuid="$uid" --regid="$gid" --clear-groups downpour "$@"')
    assert len(shapes) == 1 and shapes[0] < drop, shapes
