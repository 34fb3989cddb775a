"""The container files: docker-compose.yml validated by `docker-compose config` and checked
for the scale-out layout, the Dockerfile checked instruction by instruction.

No image is built here (that needs a Docker engine). Without `docker-compose` the compose
tests skip, except under CI=true, where they fail: .ci/run installs it."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
RADCACHE_SERVICES = ("api", "worker", "worker-cpu")
WORKERS = ("worker", "worker-cpu")
SHARED_ENV = ("RADCACHE_STORE", "RADCACHE_UPLOAD_DIR", "RADCACHE_DB", "RADCACHE_QUEUE")
WORKER_GRACE_S = 60.0  # RADCACHE_WORKER_GRACE_S default: compose must wait longer on stop


# --- docker-compose.yml -------------------------------------------------------------------


def _compose_binary() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        reason = (
            "docker-compose is not installed (apt-get install docker-compose); "
            "the compose file is not validated"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}, and CI=true requires it: .ci/run installs it.")
        print(reason)
        pytest.skip(reason)
    return exe


def _compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose [args] config`, parsed, in an environment without stray settings."""
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    clean.update(env or {})
    proc = subprocess.run(
        [_compose_binary(), "-f", str(COMPOSE), *args, "config"],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


@cache
def _config(profile: str = "") -> dict[str, Any]:
    return _compose_config(*(["--profile", profile] if profile else []))


def _active(config: dict[str, Any], profile: str = "") -> set[str]:
    """Services `up` starts, with --profile ``profile`` if given (docker-compose 1.29's
    `config` prints them all)."""
    return {
        name
        for name, svc in config["services"].items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }


def _volumes(svc: dict[str, Any]) -> dict[str, str]:
    """target path → source, from either the short or the long volume syntax."""
    out: dict[str, str] = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def _container_port(port: str | dict[str, Any]) -> int:
    """The container side of a published port, short (``HOST:8000/tcp``) or long syntax."""
    if isinstance(port, dict):
        return int(port["target"])
    return int(port.rsplit(":", 1)[-1].split("/")[0])


def _seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_up_starts_the_api_gpu_workers_redis_and_postgres() -> None:
    active = _active(_config())
    assert {"api", "worker", "redis", "postgres"} <= active
    assert "worker-cpu" not in active
    assert "radcache" not in active  # the one-shot service runs only when asked for


def test_compose_cpu_profile_adds_cpu_workers() -> None:
    """`docker compose --profile cpu up --scale worker=0`: CPU workers, no GPU one."""
    config = _config("cpu")
    active = _active(config, "cpu")
    assert {"api", "worker-cpu", "redis", "postgres"} <= active
    assert config["services"]["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in config["services"]["worker"]  # scaled to 0 on a CPU machine


def test_compose_api_serves_with_queue_and_database_and_checks_readyz() -> None:
    api = _config()["services"]["api"]
    command = api["command"]
    assert command[0] == "serve"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--host"] == "0.0.0.0"
    assert flags["--queue"] == "redis://redis:6379/0" == api["environment"]["RADCACHE_QUEUE"]
    assert flags["--db"].startswith("postgresql+psycopg://")
    assert flags["--db"].endswith("@postgres/radcache")
    assert flags["--db"] == api["environment"]["RADCACHE_DB"]
    test = api["healthcheck"]["test"]
    check = " ".join(test)
    assert "/readyz" in check
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "api healthcheck", "exec")
    assert "curl" not in check and "wget" not in check  # not in the slim image
    assert any(_container_port(p) == 8000 for p in api["ports"])


def test_compose_workers_are_gpu_and_cpu_variants_without_http_check() -> None:
    services = _config()["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert gpu["environment"]["RADCACHE_DEVICE"] == "cuda"
    assert cpu["environment"]["RADCACHE_DEVICE"] == "cpu"
    for svc in (gpu, cpu):
        assert svc["command"] == ["worker"]
        assert svc["deploy"]["replicas"] == 1
        assert svc["healthcheck"].get("disable") is True or svc["healthcheck"]["test"] == ["NONE"]
        assert _seconds(svc["stop_grace_period"]) > WORKER_GRACE_S


def test_compose_worker_replicas_follow_radcache_workers() -> None:
    config = _compose_config(env={"RADCACHE_WORKERS": "4"})
    for name in WORKERS:
        assert config["services"][name]["deploy"]["replicas"] == 4


def test_compose_api_and_workers_share_store_uploads_database_queue_and_secret() -> None:
    config = _config()
    services = config["services"]
    named = set(config["volumes"])
    assert {"store", "uploads", "hf-cache", "postgres-data"} <= named
    api_env = services["api"]["environment"]
    api_volumes = _volumes(services["api"])
    for name in RADCACHE_SERVICES:
        svc = services[name]
        env = svc["environment"]
        for key in SHARED_ENV:
            assert env[key] == api_env[key], f"{name}: {key} differs from the api's"
        volumes = _volumes(svc)
        assert volumes[env["RADCACHE_STORE"]] == "store"
        assert volumes[env["RADCACHE_UPLOAD_DIR"]] == "uploads"
        assert volumes[env["HF_HOME"]] == "hf-cache"
        for target in (env["RADCACHE_STORE"], env["RADCACHE_UPLOAD_DIR"]):
            assert volumes[target] == api_volumes[target]
        secrets = [s["source"] if isinstance(s, dict) else s for s in svc["secrets"]]
        assert secrets == ["pseudonym_key"]
        assert env["RADCACHE_PSEUDONYM_KEY_FILE"] == "/run/secrets/pseudonym_key"
        assert "RADCACHE_PSEUDONYM_KEY" not in env
    assert config["secrets"]["pseudonym_key"]["file"].endswith("secrets/pseudonym.key")


def test_compose_postgres_and_redis_are_healthy_before_api_and_workers() -> None:
    services = _config()["services"]
    postgres, redis = services["postgres"], services["redis"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert _volumes(postgres)["/var/lib/postgresql/data"] == "postgres-data"
    db_password = postgres["environment"]["POSTGRES_PASSWORD"]
    assert f":{db_password}@postgres/" in services["api"]["environment"]["RADCACHE_DB"]
    for name in RADCACHE_SERVICES:
        depends = services[name]["depends_on"]
        for dep in ("postgres", "redis"):
            assert depends[dep]["condition"] == "service_healthy", f"{name} → {dep}"


def test_compose_postgres_password_reaches_the_database_urls() -> None:
    config = _compose_config("--profile", "cpu", env={"POSTGRES_PASSWORD": "s3cret-pw"})
    services = config["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-pw"
    for name in RADCACHE_SERVICES:
        assert ":s3cret-pw@postgres/" in services[name]["environment"]["RADCACHE_DB"]
    assert ":s3cret-pw@postgres/" in " ".join(services["api"]["command"])


def test_compose_keeps_the_one_shot_embed_service() -> None:
    """`docker compose run --rm radcache embed /input` writes into the shared store."""
    services = _config("cpu")["services"]
    one_shot, api = services["radcache"], services["api"]
    assert one_shot["profiles"] == ["tools"]
    assert "/input" in _volumes(one_shot)
    store = one_shot["environment"]["RADCACHE_STORE"]
    assert store == api["environment"]["RADCACHE_STORE"]
    assert _volumes(one_shot)[store] == "store"
    assert [s["source"] if isinstance(s, dict) else s for s in one_shot["secrets"]] == [
        "pseudonym_key"
    ]


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: str  # the stage's name ("" before the first FROM)


@cache
def _dockerfile() -> tuple[Instruction, ...]:
    """Instructions with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out: list[Instruction] = []
    stage = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), flags=re.I)
            assert m, f"unreadable FROM {args!r}"
            stage = m.group(2) or m.group(1)
        out.append(Instruction(keyword, args.strip(), stage))
    return tuple(out)


def _in(stage: str, keyword: str) -> list[str]:
    return [i.args for i in _dockerfile() if i.stage == stage and i.keyword == keyword]


def _arg_default(stage: str, name: str) -> str | None:
    for args in _in(stage, "ARG"):
        key, eq, value = args.partition("=")
        if key == name:
            return value.strip('"') if eq else None
    raise AssertionError(f"no ARG {name} in stage {stage or '(global)'}")


def _froms() -> dict[str, str]:
    """stage → base image."""
    return {i.stage: i.args.split()[0] for i in _dockerfile() if i.keyword == "FROM"}


def test_dockerfile_variant_chooses_a_cuda_or_slim_base() -> None:
    assert _arg_default("", "VARIANT") == "cpu"
    froms = _froms()
    assert froms["base-cpu"].startswith("python:") and froms["base-cpu"].endswith("-slim")
    cuda = froms["base-cuda"]
    if cuda.startswith("${"):
        cuda = _arg_default("", cuda.strip("${}")) or ""
    assert cuda.startswith("nvidia/cuda:") and "runtime" in cuda
    assert froms["build"] == froms["runtime"] == "base-${VARIANT}"
    assert list(froms)[-1] == "runtime", "the last stage is the image"
    assert any("--from=build" in c for c in _in("runtime", "COPY"))


def test_dockerfile_installs_the_server_extra_with_torch_and_faiss_per_variant() -> None:
    assert _arg_default("build", "TORCH_VERSION") == "2.13.0"
    cpu_env = " ".join(_in("base-cpu", "ENV"))
    cuda_env = " ".join(_in("base-cuda", "ENV"))
    assert "download.pytorch.org/whl/cpu" in cpu_env
    assert 'FAISS_GPU=""' in cpu_env
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in cuda_env
    assert (_arg_default("base-cuda", "TORCH_CUDA") or "").startswith("cu12")
    assert 'FAISS_GPU="faiss-gpu-cu12"' in cuda_env
    runs = " ".join(_in("build", "RUN"))
    assert '--index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"' in runs
    assert 'pip install ".[${EXTRAS}]"' in runs
    extras = (_arg_default("build", "EXTRAS") or "").split(",")
    assert "server" in extras and "s3" in extras
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(extras) <= set(project["project"]["optional-dependencies"])
    assert "pip uninstall -y faiss-cpu" in runs  # both wheels ship the `faiss` module
    assert "radcache.service.migrations" in runs  # the build checks the migrations are in


def test_dockerfile_copies_every_package_the_wheel_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    assert {"radcache.service.migrations", "radcache.service.migrations.versions"} <= set(
        tool["packages"]
    )
    copied = {c.split()[0] for c in _in("build", "COPY") if not c.startswith("--")}
    copied |= {
        part for c in _in("build", "COPY") for part in c.split()[:-1] if not part.startswith("-")
    }
    for source in ("pyproject.toml", "README.md", *tool["package-dir"].values()):
        assert source in copied, f"the build does not COPY {source}"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "embeddings/store/__init__.py",
        "service/cli/__init__.py",
        "service/migrations/env.py",
        "service/migrations/versions/0001_jobs.py",
        "clients/__init__.py",
    ]
    for path in needed:
        assert (ROOT / path).exists(), path
        hits = [p for p in patterns if fnmatch.fnmatch(path, p.removeprefix("**/"))]
        hits += [p for p in patterns if path.split("/")[0] == p.rstrip("/")]
        assert not hits, f".dockerignore drops {path} ({hits})"
    for excluded in (".git", "venv", ".venv", "secrets", ".mypy_cache", "bench"):
        assert excluded in patterns, f".dockerignore lets {excluded} in"


def test_dockerfile_runtime_is_non_root_with_model_cache_volume_and_readyz_check() -> None:
    users = _in("runtime", "USER")
    assert users, "no USER in the final stage"
    assert users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert any("useradd" in r and users[-1] in r for r in _in("runtime", "RUN"))
    env = " ".join(_in("runtime", "ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home, "HF_HOME is not set"
    volumes = " ".join(_in("runtime", "VOLUME"))
    assert f'"{hf_home.group(1)}"' in volumes
    for path in ("/data/store", "/data/uploads"):
        assert path in volumes
    (check,) = _in("runtime", "HEALTHCHECK")
    assert "/readyz" in check and "python" in check
    assert "curl" not in check and "wget" not in check
    assert _in("runtime", "ENTRYPOINT") == ['["radcache"]']


def test_dockerfile_bakes_model_weights_only_when_asked() -> None:
    assert _arg_default("runtime", "BAKE_MODEL") == ""
    loads = re.compile(r"load_encoder|from_pretrained|snapshot_download|hf download|hf_hub")
    for ins in _dockerfile():
        if ins.keyword == "RUN" and loads.search(ins.args):
            assert ins.stage == "runtime"
            assert re.match(r'if \[ -n "\$BAKE_MODEL" \]; then', ins.args), ins.args


@pytest.fixture
def readyz_server() -> Iterator[tuple[int, list[int]]]:
    """A local server whose /readyz answers the status at the head of the list."""
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/readyz" else 404
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck_passes_on_ready_and_fails_otherwise(
    readyz_server: tuple[int, list[int]],
) -> None:
    (check,) = _in("runtime", "HEALTHCHECK")
    exec_form = json.loads(check.split(" CMD ", 1)[1])
    assert exec_form[:2] == ["python", "-c"]
    port, status = readyz_server
    env = {"PATH": os.environ.get("PATH", ""), "RADCACHE_PORT": str(port)}

    def probe() -> int:
        cmd = [sys.executable, "-c", exec_form[2]]
        proc = subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False)
        return proc.returncode

    assert probe() == 0
    status[0] = 503
    assert probe() == 1
