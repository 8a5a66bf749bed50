"""Checks of the production stack's files in ``infra/`` — nothing here builds or starts a container.

1. ``docker-compose.yml`` validates against the Compose JSON schema once ``${VAR}`` references are
   interpolated with ``.env.example``; the two files name the same variables; no credential is
   written in the compose file; the services are wired as the stack needs.
2. ``docker-compose config`` accepts it (and refuses it without credentials). Skipped locally
   when no Compose binary is installed; a failure in CI (``$CI`` set), where it must be.
3. The Kubernetes manifests parse and reference each other consistently (RBAC, ConfigMap and
   Secret keys, GPU scheduling).
4. The Prefect base job templates of ``infra/prefect/`` are well-formed, and the GPU ones ask for GPUs.
5. The Dockerfile installs from ``requirements.lock`` as ``scripts/install.sh`` does and pins
   nothing that contradicts the lock; its build context keeps secrets and local runs out.
6. ``entrypoint.sh`` and ``create-buckets.sh`` behave as documented (real git/dvc, a fake ``mc``).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "worker" / "Dockerfile"
ENTRYPOINT = INFRA / "worker" / "entrypoint.sh"
CREATE_BUCKETS = INFRA / "minio" / "create-buckets.sh"
INIT_SQL = INFRA / "postgres" / "init.sql"
K8S = INFRA / "k8s"
PREFECT_TEMPLATES = INFRA / "prefect"
LOCK = ROOT / "requirements.lock"

# Only used by Compose itself (project name), not by docker-compose.yml.
COMPOSE_ONLY_VARIABLES = {"COMPOSE_PROJECT_NAME"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


# ---------------------------------------------------------------------------------------- helpers


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``requirements.lock`` as {normalised name: version}; comments and blank lines ignored."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: '{line}' is not an exact '==' pin"
        pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_env_file(path: Path) -> dict[str, str]:
    """A Compose ``.env`` file; rejects lines Compose v1 and v2 would read differently."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        assert key not in values, f"{path.name}:{number}: {key} is set twice"
        # Compose v1 keeps an inline '# comment' as part of the value, v2 drops it.
        assert " #" not in value, f"{path.name}:{number}: inline comment after {key}; put it on its own line"
        assert not value.startswith(("'", '"')), f"{path.name}:{number}: quoted value of {key}"
        values[key] = value
    return values


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class Interpolation:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$``.

    Records which variables the file reads and which of them have a default, so the test can
    compare them with ``.env.example``. An unset variable without default is an error here
    (Compose would substitute an empty string with a warning).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.used: set[str] = set()
        self.defaulted: set[str] = set()

    def text(self, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            if match.group("escaped"):
                return "$"
            name = match.group("braced") or match.group("plain")
            op, arg = match.group("op"), match.group("arg")
            self.used.add(name)
            if op and op.endswith("-"):
                self.defaulted.add(name)
            current = self.env.get(name)
            missing = current is None or (op is not None and op.startswith(":") and current == "")
            if not missing:
                return current
            if op and op.endswith("-"):
                return arg
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            raise KeyError(f"{name} is not set and has no default")

        return _REFERENCE.sub(substitute, value)

    def tree(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, list):
            return [self.tree(item) for item in node]
        if isinstance(node, dict):
            return {key: self.tree(value) for key, value in node.items()}
        return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_with_example_env() -> tuple[dict[str, Any], Interpolation]:
    interpolation = Interpolation(read_env_file(ENV_EXAMPLE))
    return interpolation.tree(raw_compose()), interpolation


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def pip_installs(shell: str) -> list[list[str]]:
    """The argument lists after ``pip install`` in a shell command line (split on && and ;)."""
    found = []
    for command in re.split(r"&&|;|\|\|", shell):
        if not re.search(r"\bpip3?\s+install\b", command):
            continue  # also spares shlex the fragments of quoted strings cut at a ';'
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i] in {"pip", "pip3"} or words[i].endswith("/pip") or words[i:i + 2] == ["-m", "pip"]:
                rest = words[i + 1:] if words[i] != "-m" else words[i + 2:]
                if rest and rest[0] == "install":
                    found.append(rest[1:])
                break
    return found


_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
                       "--extra-index-url", "-f", "--find-links", "--target", "-t", "--prefix"}


def pip_problems(args: list[str], lock: Mapping[str, str]) -> list[str]:
    """Why one ``pip install`` is not reproducible from the lock (empty list: it is).

    Rules: anything besides pip itself is installed with ``-c requirements.lock``; a version
    given for a locked package must admit the locked version; a package outside the lock must
    be pinned exactly (``==``).
    """
    constraints, editables, requirements = [], [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _OPTIONS_WITH_VALUE:
            value = args[i + 1]
            if arg in {"-c", "--constraint"}:
                constraints.append(value)
            elif arg in {"-e", "--editable"}:
                editables.append(value)
            i += 2
            continue
        if not arg.startswith("-"):
            requirements.append(arg)
        i += 1
    problems = []
    names = [normalise(Requirement(spec).name) for spec in requirements]
    if (editables or any(name != "pip" for name in names)) and not any(Path(c).name == LOCK.name for c in constraints):
        problems.append(f"pip install {' '.join(args)}: no '-c {LOCK.name}'")
    for spec in requirements:
        requirement = Requirement(spec)
        name = normalise(requirement.name)
        if name == "pip":
            continue
        if name in lock:
            if requirement.specifier and not requirement.specifier.contains(lock[name], prereleases=True):
                problems.append(f"{spec} contradicts {LOCK.name} ({name}=={lock[name]})")
        elif len(requirement.specifier) != 1 or next(iter(requirement.specifier)).operator != "==":
            problems.append(f"{spec} is neither in {LOCK.name} nor pinned with ==")
    return problems


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether a context path is left out: the last pattern matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!")
        if any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes):
            excluded = not negated
    return excluded


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for the shell scripts (no credentials leaking in from the host)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DVC_NO_ANALYTICS": "1",
           "GIT_CONFIG_NOSYSTEM": "1"}
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------- 1. compose file


def test_compose_validates_against_the_compose_schema(fixtures_dir: Path) -> None:
    import jsonschema

    schema = json.loads((fixtures_dir / "compose-spec.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    doc, _ = compose_with_example_env()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "docker-compose.yml does not match the Compose schema:\n" + "\n".join(errors)

    # The schema is strict enough to catch a misspelt key (so the pass above means something).
    broken = copy.deepcopy(doc)
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    assert any("helthcheck" in e.message for e in validator.iter_errors(broken))


def test_env_example_and_compose_name_the_same_variables() -> None:
    env = read_env_file(ENV_EXAMPLE)
    _, interpolation = compose_with_example_env()
    undocumented = interpolation.used - env.keys() - interpolation.defaulted
    assert not undocumented, (
        f"docker-compose.yml reads {sorted(undocumented)} without default; add them to .env.example"
    )
    unused = env.keys() - interpolation.used - COMPOSE_ONLY_VARIABLES
    assert not unused, f".env.example sets {sorted(unused)}, which docker-compose.yml never reads"


def test_credentials_come_only_from_the_environment() -> None:
    compose = raw_compose()
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"service {name}: use the mapping form of environment"
        for key, value in environment.items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (
                    f"service {name}: {key} must be a required variable ${{VAR:?message}}, not {value!r}"
                )
    # Passwords inside connection URLs too (scheme://user:password@host): only required variables.
    def mark(match: re.Match[str]) -> str:
        return "REQUIRED_VARIABLE" if (match.group("op") or "").endswith("?") else "OTHER_VARIABLE"

    for text in strings(compose):
        for password in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", _REFERENCE.sub(mark, text)):
            assert password == "REQUIRED_VARIABLE", f"hard-coded or optional password in {text!r}"
    # The example values are visibly placeholders.
    for key, value in read_env_file(ENV_EXAMPLE).items():
        if SECRET_KEY.search(key) and key != "AWS_ACCESS_KEY_ID":
            assert value.startswith("change-me"), f".env.example: {key} should be a change-me-* placeholder"


def test_compose_services_are_wired_as_the_stack_needs() -> None:
    doc, _ = compose_with_example_env()
    services = doc["services"]
    lock = read_lock()
    expected = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-init",
                "worker-cpu", "worker-gpu"}
    assert expected <= services.keys()

    def depends(service: str, on: str) -> str:
        return services[service]["depends_on"][on]["condition"]

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "healthcheck" in postgres
    assert any(v.endswith(":/docker-entrypoint-initdb.d/init.sql:ro") for v in postgres["volumes"])

    assert "healthcheck" in services["minio"]
    assert depends("minio-init", "minio") == "service_healthy"

    mlflow = services["mlflow"]
    command = mlflow["command"]
    store = command[command.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql://") and store.endswith("@postgres:5432/mlflow")
    assert command[command.index("--artifacts-destination") + 1] == "s3://mlflow-artifacts"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mlflow" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert depends("mlflow", "postgres") == "service_healthy"
    assert depends("mlflow", "minio-init") == "service_completed_successfully"

    server = services["prefect-server"]
    assert server["image"] == f"prefecthq/prefect:{lock['prefect']}-python3.11", "Prefect server must match the lock"
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert depends("prefect-server", "postgres") == "service_healthy"

    # prefect-init creates every pool prefect.yaml deploys to, from templates that exist.
    init = services["prefect-init"]
    script = " ".join(init["command"])
    assert any(v.endswith(":/repo:ro") and (INFRA / v.split(":")[0]).resolve() == ROOT for v in init["volumes"])
    created = dict(re.findall(r"prefect work-pool create (\S+) --type (\S+)", script))
    assert created == {"cpu": "process", "gpu": "process"}
    for template in re.findall(r"--base-job-template /repo/(\S+)", script):
        assert (ROOT / template).is_file(), f"prefect-init uses a missing template {template}"
    assert "gpu-process-template.json" in script and "deploy --all" in script
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} <= created.keys()

    for pool in ("cpu", "gpu"):
        worker = services[f"worker-{pool}"]
        assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", pool]
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert depends(f"worker-{pool}", "prefect-init") == "service_completed_successfully"
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] != ""

    # A named network for all, named volumes declared, bind-mount sources present.
    assert doc["networks"], "a named network"
    for name, service in services.items():
        assert service.get("networks"), f"service {name} is on no named network"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"service {name} mounts missing {source}"
            else:
                assert source in doc["volumes"], f"service {name} uses undeclared volume {source}"


# ------------------------------------------------------------------------ 2. docker-compose config


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def require_compose_cli() -> list[str]:
    """The Compose CLI; in CI (``$CI`` set) its absence fails the test instead of skipping it."""
    command = compose_command()
    if command is None:
        reason = "no docker-compose / docker compose binary (apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must validate infra/docker-compose.yml with it")
        pytest.skip(reason)
    return command


def test_docker_compose_config_accepts_the_stack() -> None:
    compose_cli = require_compose_cli()
    proc = subprocess.run([*compose_cli, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
                          cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_docker_compose_config_refuses_missing_credentials(tmp_path: Path) -> None:
    compose_cli = require_compose_cli()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run([*compose_cli, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
                          cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "in infra/.env" in proc.stderr + proc.stdout, "the error should say which variable to set"


# ---------------------------------------------------------------------------- 3. Kubernetes


def test_k8s_manifests_are_well_formed_and_consistent() -> None:
    docs = k8s_documents()
    assert docs, "no manifests in infra/k8s"
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, doc in docs:
        for field in ("apiVersion", "kind"):
            assert doc.get(field), f"{path.name}: a document without {field}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without metadata.name"
        by_kind.setdefault(doc["kind"], []).append(doc)
    (namespace,) = (d["metadata"]["name"] for d in by_kind["Namespace"])
    for path, doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{path.name}: {doc['kind']} outside {namespace}"

    # Every configMapKeyRef/secretKeyRef names a key that the ConfigMap/Secret defines.
    defined = {("ConfigMap", d["metadata"]["name"]): set(d["data"]) for d in by_kind["ConfigMap"]}
    defined |= {("Secret", d["metadata"]["name"]): set(d.get("stringData", {}) | d.get("data", {}))
                for d in by_kind["Secret"]}
    refs = 0
    for path, doc in docs:
        for kind, ref in _key_refs(doc):
            refs += 1
            assert ref["key"] in defined.get((kind, ref["name"]), set()), (
                f"{path.name}: {kind} {ref['name']} has no key {ref['key']}"
            )
    assert refs, "manifests should read the stack's settings through configMapKeyRef/secretKeyRef"

    # Pods use ServiceAccounts that exist.
    accounts = {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
    for doc in by_kind["Deployment"] + by_kind["Job"]:
        assert doc["spec"]["template"]["spec"]["serviceAccountName"] in accounts


def _key_refs(node: Any) -> Iterator[tuple[str, dict[str, str]]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "configMapKeyRef":
                yield "ConfigMap", value
            elif key == "secretKeyRef":
                yield "Secret", value
            else:
                yield from _key_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _key_refs(item)


def test_k8s_gpu_worker_may_create_jobs_and_read_pod_logs() -> None:
    docs = [doc for _, doc in k8s_documents()]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "prefect worker start --pool gpu --type kubernetes" in command
    assert container["image"] == f"prefecthq/prefect:{read_lock()['prefect']}-python3.11-kubernetes"
    account = pod["spec"]["serviceAccountName"]

    bindings = [d for d in docs if d["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in d["subjects"])]
    assert bindings, f"no RoleBinding for ServiceAccount {account}"
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    rules = [rule for b in bindings for rule in roles[b["roleRef"]["name"]]["rules"]]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    assert allowed("batch", "jobs", "create") and allowed("batch", "jobs", "watch")
    assert allowed("", "pods", "create") and allowed("", "pods", "list")
    assert allowed("", "pods/log", "get")
    assert not allowed("", "secrets", "get"), "the worker has no business reading Secrets"


def test_k8s_gpu_job_example_is_scheduled_on_a_gpu() -> None:
    jobs = [doc for _, doc in k8s_documents() if doc["kind"] == "Job"]
    assert jobs
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert resources["requests"].get("nvidia.com/gpu", gpus) == gpus, "extended resources: request == limit"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"], "a node selector for GPU nodes"
        assert spec["restartPolicy"] == "Never"
        # The pod runs as the image's non-root user.
        uid = int(re.search(r"useradd [^\n]*--uid (\d+)[^\n]* rlhf", DOCKERFILE.read_text()).group(1))
        assert spec["securityContext"]["runAsUser"] == uid
        command = " ".join(container.get("args", []))
        assert "dvc repro -s" in command and "dvc push" in command


# ------------------------------------------------------------------ 4. Prefect base job templates


@pytest.mark.parametrize("path", sorted(PREFECT_TEMPLATES.glob("*.json")), ids=lambda p: p.name)
def test_prefect_base_job_template_is_well_formed(path: Path) -> None:
    template = json.loads(path.read_text())
    assert {"job_configuration", "variables"} <= template.keys()
    properties = template["variables"]["properties"]
    # Prefect rejects a pool whose job configuration names a variable the schema lacks.
    placeholders = set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders, "a job configuration without {{ variables }}"
    assert placeholders <= properties.keys(), f"{path.name}: undefined {sorted(placeholders - properties.keys())}"


def test_gpu_templates_ask_for_gpus() -> None:
    process = json.loads((PREFECT_TEMPLATES / "gpu-process-template.json").read_text())
    assert "CUDA_VISIBLE_DEVICES" in process["variables"]["properties"]["env"]["default"]

    kubernetes = json.loads((PREFECT_TEMPLATES / "gpu-kubernetes-template.json").read_text())
    pod = kubernetes["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The flow-run pods use the image the compose stack builds.
    image = kubernetes["variables"]["properties"]["image"]["default"]
    compose_image = re.search(r"\$\{WORKER_IMAGE:-([^}]+)\}", COMPOSE.read_text()).group(1)
    env_image = read_env_file(ENV_EXAMPLE)["WORKER_IMAGE"]
    assert image.split(":")[0] == compose_image.split(":")[0] == env_image.split(":")[0]


# ------------------------------------------------------------------------------ 5. Dockerfile


def test_dockerfile_installs_the_project_as_install_sh_does() -> None:
    lock = read_lock()
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    installs = [args for keyword, line in instructions if keyword == "RUN" for args in pip_installs(line)]
    assert installs, "no pip install in the Dockerfile"
    problems = [p for args in installs for p in pip_problems(args, lock)]
    assert not problems, "\n".join(problems)

    # The project install line carries the same constraint and target as scripts/install.sh.
    install_sh = (ROOT / "scripts" / "install.sh").read_text()
    script_installs = [args for line in install_sh.splitlines() for args in pip_installs(line)]
    (script_project,) = [a for a in script_installs if "-e" in a]
    (docker_project,) = [a for a in installs if "-e" in a]
    for option in ("-c", "-e"):
        assert docker_project[docker_project.index(option) + 1] == script_project[script_project.index(option) + 1]

    # Layer caching: the lock and pyproject are copied (and installed) before the source.
    copies = [line for keyword, line in instructions if keyword == "COPY"]
    lock_copy = next(i for i, c in enumerate(copies) if "requirements.lock" in c and "pyproject.toml" in c)
    assert lock_copy < copies.index(". ."), "COPY requirements.lock pyproject.toml ... before COPY . ."


def test_dockerfile_worker_stage_is_cuda_python311_git_non_root() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    stages = [line for keyword, line in dockerfile_instructions(text) if keyword == "FROM"]
    for line in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[0])
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    assert stages[-1] == "${CUDA_IMAGE} AS worker", "the default (last) target is the worker, on the CUDA base"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")

    worker = dockerfile_instructions(text[text.index("AS worker"):])
    runs = " ".join(line for keyword, line in worker if keyword == "RUN")
    apt_installs = " ".join(re.findall(r"apt-get install ([^&]+)", runs)).split()
    assert {"git", "python3.11", "python3.11-venv"} <= set(apt_installs)
    assert "python3.11 -m venv" in runs
    assert re.search(r"Python 3\.11", LOCK.read_text()), "the lock and the image must agree on Python 3.11"
    users = [line for keyword, line in worker if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the worker runs as a non-root user"
    cmd = json.loads(next(line for keyword, line in reversed(worker) if keyword == "CMD"))
    assert cmd[:3] == ["prefect", "worker", "start"]


def test_pip_problems_catches_what_it_should() -> None:
    lock = {"torch": "2.13.0", "mlflow": "3.17.2"}
    assert pip_problems(["-c", "requirements.lock", "-e", ".[dev]"], lock) == []
    assert pip_problems(["--upgrade", "pip>=23"], lock) == []
    assert pip_problems(["-c", "/tmp/requirements.lock", "mlflow", "psycopg2-binary==2.9.13"], lock) == []
    assert pip_problems(["-e", ".[dev]"], lock)                                       # no constraints
    assert pip_problems(["-c", "requirements.lock", "torch==2.12.0"], lock)           # contradicts the lock
    assert pip_problems(["-c", "requirements.lock", "psycopg2-binary>=2"], lock)      # unpinned, not locked


def test_build_context_keeps_secrets_and_local_runs_out() -> None:
    patterns = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".venv/bin/python", ".git/config", "infra/.env", "mlflow.db", "data/prepared/sft_train.jsonl",
                 "models/sft/model.safetensors", "dvc-remote/files/md5/ab/cd", "tasks/__pycache__/x.pyc"):
        assert dockerignore_excludes(path, patterns), f"{path} would enter the image"
    copied = [w for keyword, line in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "COPY"
              for w in line.split()[:-1] if not w.startswith("--") and w != "."]
    needed = copied + ["dvc.yaml", "params.yaml", "prefect.yaml", ".dvc/config", "rlhf_core/__init__.py",
                       "tasks/stage_main.py", "flows/alignment.py", "infra/prefect/gpu-process-template.json"]
    for path in needed:
        assert not dockerignore_excludes(path, patterns), f"{path} is needed but left out of the build context"


# --------------------------------------------------------------------------------- init.sql


def test_init_sql_reads_its_credentials_from_the_postgres_service() -> None:
    sql = INIT_SQL.read_text()
    getenv = dict(re.findall(r"^\\getenv (\w+) (\w+)$", sql, flags=re.M))
    used = set(re.findall(r":['\"{?]+(\w+)", sql))
    assert used <= getenv.keys(), f"init.sql uses unset psql variables {sorted(used - getenv.keys())}"
    postgres_env = raw_compose()["services"]["postgres"]["environment"]
    assert set(getenv.values()) <= postgres_env.keys(), "init.sql reads variables the postgres service does not get"
    assert not re.search(r"PASSWORD\s+'", sql, flags=re.I), "a literal password in init.sql"
    for database in ("prefect_db", "mlflow_db"):
        assert re.search(rf"CREATE DATABASE %I OWNER %I', :'{database}'", sql)


# -------------------------------------------------------------------------- 6. shell scripts


def test_shell_scripts_parse() -> None:
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    subprocess.run(["sh", "-n", str(CREATE_BUCKETS)], check=True)


needs_git_and_dvc = pytest.mark.skipif(not (shutil.which("git") and shutil.which("dvc")), reason="needs git and dvc")


def run_entrypoint(env: Mapping[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ENTRYPOINT), *command], env=tool_env(env),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project_source(tmp_path: Path) -> Path:
    """A stand-in for the image's /opt/rlhf: a DVC project with the real .dvc/config."""
    src = tmp_path / "src"
    (src / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / ".dvc" / "config", src / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", src / ".dvc" / ".gitignore")
    (src / "dvc.yaml").write_text("stages: {}\n")
    return src


@needs_git_and_dvc
def test_entrypoint_seeds_a_workspace_and_points_dvc_at_the_remote(tmp_path: Path, project_source: Path) -> None:
    workspace = tmp_path / "workspace" / "rlhf"
    env = {"RLHF_SOURCE_DIR": str(project_source), "RLHF_WORKSPACE": str(workspace),
           "RLHF_DVC_REMOTE_URL": "s3://dvc-remote/rlhf", "RLHF_DVC_ENDPOINT_URL": "http://minio:9000"}
    proc = run_entrypoint(env, "sh", "-c", "echo command-ran")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "command-ran"
    assert (workspace / "dvc.yaml").is_file()
    log = subprocess.run(["git", "-C", str(workspace), "log", "--oneline"], capture_output=True, text=True, check=True)
    assert len(log.stdout.splitlines()) == 1
    status = subprocess.run(["git", "-C", str(workspace), "status", "--porcelain"],
                            capture_output=True, text=True, check=True)
    assert status.stdout == "", "the DVC remote settings must not dirty the checkout"
    default = subprocess.run(["dvc", "remote", "default"], cwd=workspace, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == "s3"
    local = (workspace / ".dvc" / "config.local").read_text()
    assert "s3://dvc-remote/rlhf" in local and "endpointurl = http://minio:9000" in local
    assert "AWS" not in local and "secret" not in local.lower()


@needs_git_and_dvc
def test_entrypoint_clones_once_and_keeps_an_existing_workspace(tmp_path: Path, project_source: Path) -> None:
    # A repository to clone: the seeded stand-in, committed.
    origin = tmp_path / "origin"
    seeded = run_entrypoint({"RLHF_SOURCE_DIR": str(project_source), "RLHF_WORKSPACE": str(origin)}, "true")
    assert seeded.returncode == 0, seeded.stderr
    workspace = tmp_path / "ws"
    env = {"RLHF_GIT_URL": str(origin), "RLHF_WORKSPACE": str(workspace)}
    first = run_entrypoint(env, "true")
    assert first.returncode == 0, first.stderr
    assert "cloning" in first.stderr and (workspace / ".git").is_dir()
    (workspace / "marker").write_text("kept")
    second = run_entrypoint(env, "true")
    assert second.returncode == 0 and "cloning" not in second.stderr
    assert (workspace / "marker").read_text() == "kept"


def test_entrypoint_refuses_what_it_cannot_do_safely(tmp_path: Path) -> None:
    stranger = tmp_path / "not-a-project"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    proc = run_entrypoint({"RLHF_WORKSPACE": str(stranger), "RLHF_GIT_URL": "/nonexistent"}, "true")
    assert proc.returncode != 0 and "refusing to overwrite" in proc.stderr
    assert (stranger / "notes.txt").read_text() == "mine"

    proc = run_entrypoint({}, "prefect", "worker", "start", "--pool", "gpu")
    assert proc.returncode != 0 and "PREFECT_API_URL" in proc.stderr


FAKE_MC = r"""#!/bin/sh
# Stand-in for the MinIO client: logs its arguments; `admin user info` reports the attached policy.
echo "$*" >> "$MC_LOG"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$MC_STATE/policy.json" ;;
  "admin policy attach") echo attached > "$MC_STATE/attached" ;;
  "admin user info")
    if [ -f "$MC_STATE/attached" ]; then echo '{"status":"success","policyName":"consoleAdmin,rlhf-readwrite"}'
    else echo '{"status":"success"}'; fi ;;
esac
"""


def run_create_buckets(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    mc = bin_dir / "mc"
    mc.write_text(FAKE_MC)
    mc.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MC_LOG": str(tmp_path / "mc.log"),
           "MC_STATE": str(tmp_path), "MINIO_ENDPOINT": "http://minio:9000", "MINIO_ROOT_USER": "admin",
           "MINIO_ROOT_PASSWORD": "root-secret-value", "MLFLOW_ARTIFACTS_BUCKET": "mlflow-artifacts",
           "DVC_REMOTE_BUCKET": "dvc-remote", "AWS_ACCESS_KEY_ID": "rlhf-service",
           "AWS_SECRET_ACCESS_KEY": "service-secret-value", **overrides}
    return subprocess.run(["sh", str(CREATE_BUCKETS)], env=env, capture_output=True, text=True, timeout=30)


def test_create_buckets_is_idempotent_and_scopes_the_service_user(tmp_path: Path) -> None:
    first = run_create_buckets(tmp_path)
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert "mb --ignore-existing stack/mlflow-artifacts" in calls
    assert "mb --ignore-existing stack/dvc-remote" in calls
    assert "admin user add stack rlhf-service service-secret-value" in calls
    assert sum(c.startswith("admin policy attach") for c in calls) == 1
    policy = json.loads((tmp_path / "policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::mlflow-artifacts", "arn:aws:s3:::dvc-remote",
                         "arn:aws:s3:::mlflow-artifacts/*", "arn:aws:s3:::dvc-remote/*"}
    for output in (first.stdout, first.stderr):
        assert "secret-value" not in output, "a secret was printed"

    second = run_create_buckets(tmp_path)
    assert second.returncode == 0, second.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert sum(c.startswith("admin policy attach") for c in calls) == 1, "attached twice"


def test_create_buckets_stops_without_credentials(tmp_path: Path) -> None:
    proc = run_create_buckets(tmp_path, AWS_SECRET_ACCESS_KEY="")
    assert proc.returncode != 0 and "AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert not (tmp_path / "mc.log").exists(), "nothing should run before the inputs are checked"
