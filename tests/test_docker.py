"""Static checks of docker/: both Dockerfiles and compose.yaml, and their agreement with pyproject.toml and
flows/serve.py. No Docker engine is needed (CI machines have none): the Dockerfiles are read by a small
parser that follows Docker's comment and line-continuation rules."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows.serve import POOL

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yaml"

KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
# Pins each image must name (as `name==version` on a pip line, directly or through an ARG).
REQUIRED_PINS = {
    "cpu": {"torch", "torchvision", "prefect"},
    "gpu": {"torch", "torchvision", "prefect", "faiss-gpu-cu12"},
}
VERSION_ARGS = {
    "TORCH_VERSION": "torch",
    "TORCHVISION_VERSION": "torchvision",
    "PREFECT_VERSION": "prefect",
    "FAISS_GPU_VERSION": "faiss-gpu-cu12",
}
IMAGE_ENV = {
    "VLP_DATA_DIR": "/data",
    "VLP_REPO_DIR": "/opt/vlp",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
PIN_RE = re.compile(r"(?<![\w.\-])([A-Za-z0-9][\w.\-]*)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+!]*)")


# --- a tiny Dockerfile parser ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: parser directives, comments, blank lines and line continuations
    handled as Docker does (comment lines inside a continued instruction are dropped)."""
    lines = text.splitlines()
    escape = "\\"
    for raw in lines:  # parser directives: `# name=value` lines before anything else
        m = re.fullmatch(r"#\s*(\w+)\s*=\s*(\S+)\s*", raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (parts and not stripped):
            continue
        if not parts:
            if not stripped:
                continue
            start = n
        body = raw.rstrip()
        if body.endswith(escape):
            parts.append(body[: -len(escape)])
            continue
        parts.append(body)
        m = re.fullmatch(r"\s*(\S+)\s*(.*)", "".join(parts), re.S)
        assert m, f"line {start}: cannot parse {''.join(parts)!r}"
        out.append(Instruction(start, m.group(1).upper(), m.group(2).strip()))
        parts = []
    if parts:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return out


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instrs:
        if ins.keyword == "ARG":
            for item in shlex.split(ins.args):
                name, sep, value = item.partition("=")
                if sep:  # an ARG without a default stays unexpanded
                    out[name] = value
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    """Expand ${NAME} and $NAME for the ARGs that have defaults (what the build shell sees); leave others."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def base_image(instrs: list[Instruction]) -> str:
    """The image of the first FROM, with its ARGs expanded."""
    frm = next(i for i in instrs if i.keyword == "FROM")
    return substitute(frm.args.split()[0], arg_defaults(instrs))


def env_values(instrs: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instrs:
        if ins.keyword != "ENV":
            continue
        items = shlex.split(ins.args)
        if items and "=" not in items[0]:  # legacy form: ENV NAME value with spaces
            out[items[0]] = " ".join(items[1:])
            continue
        for item in items:
            name, _, value = item.partition("=")
            out[name] = value
    return out


def exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"line {ins.line}: {ins.keyword} should use the exec (JSON) form"
    return json.loads(ins.args)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][\w.\-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", req)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[Instruction]]:
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"{path} missing"
    return request.param, parse_dockerfile(path.read_text())


def test_parser_follows_docker_rules():
    text = "# syntax=docker/dockerfile:1\nARG A=1\nFROM x:${A}\nRUN a \\\n  # comment\n\n  && b\n"
    instrs = parse_dockerfile(text)
    assert [(i.line, i.keyword) for i in instrs] == [(2, "ARG"), (3, "FROM"), (4, "RUN")]
    assert instrs[2].args.split() == ["a", "&&", "b"]
    assert parse_dockerfile("# escape=`\nFROM x:1\nRUN a `\n  b\n")[1].args.split() == ["a", "b"]
    with pytest.raises(ValueError):
        parse_dockerfile("FROM x:1\nRUN a \\\n")


# --- Dockerfiles ----------------------------------------------------------------------------------------


def test_dockerfile_structure(dockerfile):
    name, instrs = dockerfile
    assert instrs, f"{name}: no instructions"
    unknown = [(i.line, i.keyword) for i in instrs if i.keyword not in KEYWORDS]
    assert not unknown, f"{name}: unknown instructions {unknown}"
    assert all(i.args for i in instrs), f"{name}: an instruction without arguments"
    first = next(i for i in instrs if i.keyword != "ARG")
    assert first.keyword == "FROM", (
        f"{name}: first non-ARG instruction is {first.keyword} (line {first.line})"
    )
    assert not any(i.keyword == "HEALTHCHECK" for i in instrs), f"{name}: images are HEALTHCHECK-free"


def test_base_images_are_pinned(dockerfile):
    name, instrs = dockerfile
    args = arg_defaults(instrs)
    for ins in instrs:
        if ins.keyword != "FROM":
            continue
        image = substitute(ins.args.split()[0], args)
        assert "$" not in image, f"{name}: FROM {ins.args} does not resolve"
        ref = image.rsplit("/", 1)[-1]
        assert "@sha256:" in ref or ":" in ref, f"{name}: {image} has no tag (means latest)"
        assert not ref.endswith(":latest"), f"{name}: {image} uses latest"


def test_no_remote_add(dockerfile):
    name, instrs = dockerfile
    for ins in instrs:
        if ins.keyword == "ADD":
            sources = [a for a in shlex.split(ins.args) if not a.startswith("--")][:-1]
            remote = [s for s in sources if re.match(r"(https?|git|ssh)://|git@", s)]
            assert not remote, f"{name} line {ins.line}: ADD of a URL {remote}; use a pinned RUN step"


def test_copy_sources_exist(dockerfile):
    name, instrs = dockerfile
    for ins in instrs:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            sources = [a for a in shlex.split(ins.args) if not a.startswith("--")][:-1]
            missing = [s for s in sources if not (ROOT / s).exists()]
            assert not missing, f"{name} line {ins.line}: COPY of {missing}, not in the repository"


def test_runs_as_non_root_user(dockerfile):
    name, instrs = dockerfile
    kws = [i.keyword for i in instrs]
    starts = [n for n, k in enumerate(kws) if k in ("CMD", "ENTRYPOINT")]
    assert starts, f"{name}: no CMD or ENTRYPOINT"
    users = [i.args.split(":")[0] for i in instrs[: starts[0]] if i.keyword == "USER"]
    assert users, f"{name}: no USER before CMD/ENTRYPOINT"
    assert users[-1] not in ("root", "0"), f"{name}: runs as {users[-1]}"


def test_image_environment(dockerfile):
    name, instrs = dockerfile
    env = env_values(instrs)
    wrong = {k: env.get(k) for k, v in IMAGE_ENV.items() if env.get(k) != v}
    assert not wrong, f"{name}: ENV differs from {IMAGE_ENV}: {wrong}"
    volumes = [i.args for i in instrs if i.keyword == "VOLUME"]
    assert any("/data" in v.split() or v == '["/data"]' for v in volumes), f"{name}: no VOLUME /data"


def test_pins_equal_pyproject(dockerfile, pyproject_pins):
    name, instrs = dockerfile
    args = arg_defaults(instrs)
    for arg, package in VERSION_ARGS.items():
        if arg in args:
            want = pyproject_pins[package]
            assert args[arg] == want, f"{name}: ARG {arg}={args[arg]}, pyproject pins {package}=={want}"
    found: dict[str, set[str]] = {}
    for ins in instrs:
        if ins.keyword == "RUN":
            for pkg, version in PIN_RE.findall(substitute(ins.args, args)):
                found.setdefault(norm(pkg), set()).add(version.split("+")[0])
    for pkg, versions in found.items():
        if pkg in pyproject_pins:
            assert versions == {pyproject_pins[pkg]}, (
                f"{name}: {pkg} {versions} vs pyproject {pyproject_pins[pkg]}"
            )
    missing = REQUIRED_PINS[name] - found.keys()
    assert not missing, f"{name}: no pinned pip install of {sorted(missing)}"


def test_cpu_image(pyproject_pins):
    instrs = parse_dockerfile(DOCKERFILES["cpu"].read_text())
    args = arg_defaults(instrs)
    assert base_image(instrs).startswith("python:3.11-slim-bookworm")
    runs = [substitute(i.args, args) for i in instrs if i.keyword == "RUN"]
    torch_at = next(n for n, r in enumerate(runs) if f"torch=={pyproject_pins['torch']}" in r)
    project_at = next(n for n, r in enumerate(runs) if re.search(r"pip install -e \S*\.\[dask\]", r))
    assert "download.pytorch.org/whl/cpu" in runs[torch_at], "torch must come from the CPU index"
    assert torch_at < project_at, (
        "torch (CPU) must be installed before the project, or pip pulls the CUDA build"
    )
    assert any("libgomp1" in r for r in runs)
    cmd = [i for i in instrs if i.keyword == "CMD"]
    assert cmd and exec_form(cmd[-1]) == ["vlp", "--help"]


def test_gpu_image(pyproject_pins):
    instrs = parse_dockerfile(DOCKERFILES["gpu"].read_text())
    args = arg_defaults(instrs)
    base = base_image(instrs)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?devel-ubuntu\d+\.\d+", base), base
    run = "\n".join(substitute(i.args, args) for i in instrs if i.keyword == "RUN")
    assert "python3.11" in run
    uninstall = run.find("pip uninstall -y faiss-cpu")
    assert 0 <= uninstall < run.find(f"faiss-gpu-cu12=={pyproject_pins['faiss-gpu-cu12']}")
    m = re.search(
        r"--no-build-isolation\s+\S*git\+https://github\.com/facebookresearch/detectron2\.git@([\w.]+)", run
    )
    assert m, "detectron2 must be built from source with --no-build-isolation"
    assert re.fullmatch(r"[0-9a-f]{40}|v\d+(\.\d+)+", m.group(1)), (
        f"detectron2 ref {m.group(1)} is not pinned"
    )
    assert re.search(r"\d\.\d", args.get("TORCH_CUDA_ARCH_LIST", "")), "TORCH_CUDA_ARCH_LIST not set"
    assert "TORCH_CUDA_ARCH_LIST" in run
    entry = [i for i in instrs if i.keyword == "ENTRYPOINT"]
    assert entry and exec_form(entry[-1]) == [
        "prefect",
        "worker",
        "start",
        "--pool",
        POOL,
        "--type",
        "process",
    ]


# --- compose.yaml ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def _command(service: dict) -> str:
    cmd = service.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_compose_services(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "deploy", "worker", "gpu-worker"} <= services.keys()
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], f"{name}: {image}"
        build = svc.get("build")
        if build is not None:
            context = COMPOSE.parent / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (
                build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            )
            assert dockerfile.resolve().is_file(), f"{name}: {dockerfile} missing"
            assert context.resolve() == ROOT, f"{name}: build context must be the repository root"


def test_compose_ports_bind_loopback_only(compose):
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else None
            if isinstance(port, str | int):
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1 on the host"
            published += 1
    assert compose["services"]["prefect-server"].get("ports"), "the server publishes its API on loopback"
    assert published == len(compose["services"]["prefect-server"]["ports"]), "only the server publishes ports"


def test_compose_prefect_environment(compose):
    for name, svc in compose["services"].items():
        if name == "postgres":
            continue
        env = _environment(svc)
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", f"{name}: analytics not off"
        assert env.get("DO_NOT_TRACK") == "1", f"{name}: DO_NOT_TRACK not set"
        assert env.get("VLP_REPO_DIR") == "/opt/vlp", name
        if name != "prefect-server":
            assert env.get("PREFECT_API_URL") == "http://prefect-server:4200/api", name


def test_compose_server_and_database(compose):
    services = compose["services"]
    server = services["prefect-server"]
    assert _command(server).split()[:3] == ["prefect", "server", "start"]
    url = _environment(server)["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server.get("healthcheck"), "deploy and workers wait for a healthy server"
    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])


def test_compose_work_pool_and_workers(compose):
    services = compose["services"]
    pools = set()
    for svc in services.values():
        cmd = _command(svc)
        pools |= set(re.findall(r"--pool\s+(\S+)", cmd)) | set(re.findall(r"work-pool create\s+(\S+)", cmd))
    assert pools == {POOL}, f"work pools {pools} != flows.serve.POOL {POOL!r}"
    deploy = _command(services["deploy"])
    assert (
        f"work-pool create {POOL} --type process" in deploy and "prefect --no-prompt deploy --all" in deploy
    )
    assert services["deploy"].get("working_dir") == "/opt/vlp"
    assert f"--pool {POOL} --type process" in _command(services["worker"])
    for name in ("worker", "gpu-worker"):
        svc = services[name]
        assert any(v.endswith(":/data") for v in svc["volumes"]), f"{name}: no data volume at /data"
        assert svc["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    gpu = services["gpu-worker"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            assert source in named, f"{name}: volume {source} is not a named volume"
