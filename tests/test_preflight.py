"""Preflight: every group of params.yaml built into its stage's typed config before anything runs; bad values named,
nothing written. Then what the run reaches: the tracking server, the DVC remote it pushes to, the data sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, apply_overrides, load_params
from tasks.preflight import check_group, check_params, check_remote, check_services, check_sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params_file(tmp_path: Path) -> Path:
    dest = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", dest)
    return dest


def test_the_shipped_params_pass():
    check_params(load_params(ROOT / "params.yaml"))


@pytest.mark.parametrize("override,message", [
    ("dpo.beta=-1", "dpo: beta must be > 0"),
    ("dpo.no_such_key=1", "dpo: unknown key(s) ['no_such_key']"),
    ("sft.max_steps=many", "sft.max_steps"),
    ("model.tiny.n_layer=zero", "model.tiny.n_layer"),
    ("ppo.reward_fn=silver", "ppo.reward_fn must be null or 'gold'"),
    ("grpo.train=yes please", "grpo.train must be true or false"),
    ("grpo.rewards=[{name: rouge}]", "unknown reward(s) ['rouge']"),
    ("dpo.method=cpo", "method 'cpo' is not one of"),
    ("promote.policy=best", "promote.policy"),
])
def test_a_bad_override_is_rejected_before_anything_is_written(params_file, override, message):
    before = params_file.read_text()
    with pytest.raises(ParamsError) as err:
        apply_overrides(params_file, [override], check=check_params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one problem, one line
    assert params_file.read_text() == before


def test_every_problem_is_reported_at_once(params_file):
    with pytest.raises(ParamsError) as err:
        apply_overrides(params_file, ["dpo.beta=-1", "sft.learning_rate=fast", "reward.no_such=1"], check=check_params)
    lines = str(err.value).splitlines()
    assert len(lines) == 4  # a heading and one line per problem, in params.yaml's group order
    assert "sft.learning_rate" in lines[1] and "reward: unknown key(s) ['no_such']" in lines[2] and "dpo: beta" in lines[3]


def test_auto_lengths_are_left_to_the_stages_and_unknown_groups_named():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"]["max_length"] = "auto"
    params["ppo"]["max_new_tokens"] = "auto"
    params["dpo"].update(max_length="auto", max_prompt_length=256)  # > the default max_length: the stage checks it
    check_params(params)
    params["sft"]["max_steps"] = "auto"  # not a length setting
    with pytest.raises(ParamsError, match="sft.max_steps"):
        check_group(params, "sft")
    with pytest.raises(ParamsError, match="unknown group 'trainer'"):
        check_params({**params, "trainer": {"lr": 1}})


TRAINING_LIBRARIES = ("torch", "transformers", "datasets", "pandas")


def test_the_preflight_imports_no_training_library(params_file):
    """``rlhf run`` checks params.yaml and what the run reaches before it starts anything; the stages run in processes
    of their own, so none of this needs torch, transformers, datasets or pandas (seconds to import on a small machine)."""
    import os
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
from tasks.params import ParamsError
from tasks.preflight import check_remote, group_configs, nested_configs, preflight
[*group_configs().values(), *nested_configs().values()]
preflight(Path({str(params_file.parent)!r}), [], push=False)  # the shipped params.yaml: every group's config, sources
try:
    check_remote(Path({str(ROOT)!r}))  # the push check's imports, whatever this checkout's remote
except ParamsError:
    pass
print(sorted(m for m in {TRAINING_LIBRARIES!r} if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "MLFLOW_TRACKING_URI": ""})  # the local store: no server asked
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"imported by the preflight: {proc.stdout.strip()}"


def _cli(ws: Path, *args: str, env: dict[str, str] | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "-w", str(ws), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": "", **(env or {})}, check=False)


@pytest.mark.parametrize("args,message", [
    (["--set", "dpo.beta=-1"], "dpo: beta must be > 0"),
    (["--set", "dpo=0.2"], "dpo is a group"),
    (["--set", "nonexistent.key=1"], "nonexistent is not a group"),
    (["--set", "dpo.beta"], "expected KEY=VALUE"),
    (["--no-push", "--set", "tracking.uri=http://127.0.0.1:9"], "the MLflow tracking server http://127.0.0.1:9 does not answer"),
    (["--no-push", "--set", "model.name_or_path=models/base/"],
     "model.name_or_path = 'models/base/': {ws}/models/base: no such folder; fix model.name_or_path"),
    (["--no-push", "--set", "prepare.sft_data=data/sft.jsonl"],
     "prepare.sft_data = 'data/sft.jsonl' (relative to the workspace {ws}): {ws}/data/sft.jsonl: no such file or folder"),
])
def test_rlhf_run_stops_before_starting_anything_with_one_line_and_params_intact(params_file, args, message):
    before = params_file.read_text()
    proc = _cli(params_file.parent, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(ws=params_file.parent) in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert params_file.read_text() == before
    # Nothing started: no stage ran (no dvc.lock), no tracking store, no Prefect server's home.
    # (.rlhf/ holds the workspace's run lock only: the run held it while it checked, tasks/workspace_lock.py)
    assert {p.name for p in params_file.parent.iterdir()} <= {"params.yaml", ".prefect", ".rlhf"}
    assert [p.name for p in (params_file.parent / ".rlhf").iterdir()] == ["workspace-run.lock"]
    assert not (params_file.parent / "dvc.lock").exists() and not (params_file.parent / "mlflow.db").exists()


def _dvc_folder(path: Path, default: str | None = None, **remotes: dict[str, str]) -> Path:
    """``path`` with the project's params.yaml and a DVC repo (no git) with ``remotes`` ({name: {url: ..., <setting>: ...}})
    in its ``.dvc/config``, as ``dvc remote add`` / ``modify`` write them (written directly: each command costs seconds)."""
    from tests.workspace_factory import run

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    run(["dvc", "init", "--no-scm", "-q"], path)
    config = "[core]\n    no_scm = True\n" + (f"    remote = {default}\n" if default else "")
    for name, settings in remotes.items():
        config += f"['remote \"{name}\"']\n" + "".join(f"    {key} = {value}\n" for key, value in settings.items())
    (path / ".dvc" / "config").write_text(config)
    return path


def test_rlhf_run_stops_before_starting_anything_when_the_s3_remote_does_not_answer(tmp_path):
    from tests.servers import free_port

    port = free_port()  # nothing listens there: a dead S3 endpoint
    ws = _dvc_folder(tmp_path / "ws", "store", store={"url": "s3://bucket/rlhf", "endpointurl": f"http://127.0.0.1:{port}"})
    before = (ws / "params.yaml").read_text()
    proc = _cli(ws, env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in line, proc.stderr
    assert f"the DVC remote 'store' (s3://bucket/rlhf, endpoint http://127.0.0.1:{port}) does not answer" in line
    assert "--no-push" in line and "dvc remote modify store" in line
    assert (ws / "params.yaml").read_text() == before
    assert {p.name for p in ws.iterdir()} <= {"params.yaml", ".dvc", ".dvcignore", ".prefect", ".rlhf"}  # nothing started
    assert [p.name for p in (ws / ".rlhf").iterdir()] == ["workspace-run.lock"]  # the run lock it held while checking


def test_a_live_s3_remote_passes_and_a_missing_bucket_is_named(tmp_path, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="alive")
    ws = _dvc_folder(tmp_path / "ws", "up", up={"url": "s3://alive/rlhf", "endpointurl": s3_server},
                     gone={"url": "s3://no-such-bucket/rlhf", "endpointurl": s3_server})
    check_remote(ws)  # the default remote answers
    with pytest.raises(ParamsError, match=r"the DVC remote 'gone' .* does not answer \(.*NoSuchBucket"):
        check_remote(ws, "gone")
    with pytest.raises(ParamsError, match=r"no DVC remote named 'elsewhere' \(remotes: up, gone\)"):
        check_remote(ws, "elsewhere")


def test_a_local_remote_must_be_a_folder_that_can_be_written_or_made(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    ws = _dvc_folder(tmp_path / "ws", "later", later={"url": str(tmp_path / "not" / "yet")},
                     blocked={"url": str(tmp_path / "a-file" / "remote")})
    check_remote(ws)  # a folder the push creates
    assert not (tmp_path / "not").exists()  # the check creates nothing
    with pytest.raises(ParamsError, match=f"the DVC remote 'blocked' .* cannot take the outputs: {tmp_path / 'a-file'} is not a folder"):
        check_remote(ws, "blocked")
    bare = _dvc_folder(tmp_path / "bare")
    with pytest.raises(ParamsError, match=r"no DVC remote to push the outputs to: .*dvc remote add -d NAME URL.*--no-push"):
        check_remote(bare)
    check_services(bare, yaml.safe_load((bare / "params.yaml").read_text()), push=False)  # not pushing: no remote needed


def test_every_unreachable_thing_is_named_at_once(tmp_path):
    (tmp_path / "a-file").write_text("")
    ws = _dvc_folder(tmp_path / "ws", "blocked", blocked={"url": str(tmp_path / "a-file" / "remote")})
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["prepare"].update(sft_data=str(tmp_path / "sft.jsonl"), preference_data="data/prefs.jsonl")
    params["tracking"] = {**(params.get("tracking") or {}), "uri": "http://127.0.0.1:9"}
    with pytest.raises(ParamsError) as err:
        check_services(ws, params)
    lines = [line.strip() for line in str(err.value).splitlines()]
    assert lines[0] == "the run cannot reach what it needs:" and len(lines) == 5, lines
    assert "tracking server http://127.0.0.1:9" in lines[1] and "the DVC remote 'blocked'" in lines[2]
    assert lines[3].startswith(f"prepare.sft_data = '{tmp_path / 'sft.jsonl'}': {tmp_path / 'sft.jsonl'}: no such file")
    assert lines[4].startswith(f"prepare.preference_data = 'data/prefs.jsonl' (relative to the workspace {ws}): "
                               f"{ws / 'data' / 'prefs.jsonl'}: no such file")


def test_sources_that_exist_pass_relative_to_the_workspace(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "data" / "prefs").mkdir()
    (tmp_path / "data" / "prefs" / "part-0.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    params = {"prepare": {"sft_data": "data/sft.jsonl", "preference_data": "data/prefs", "prompt_data": None}}
    assert check_sources(tmp_path, params) == []
    assert check_sources(tmp_path / "data", params)  # from elsewhere they are not there


@pytest.mark.parametrize("source", ["prefs/", "data/prefs/train"])
def test_a_missing_folder_in_a_path_form_is_named_as_a_path_not_asked_of_the_hub(tmp_path, source):
    from tasks.sources import kind_of

    problems = check_sources(tmp_path, {"prepare": {"preference_data": source}})
    missing = tmp_path / source.rstrip("/")
    assert problems == [f"prepare.preference_data = '{source}' (relative to the workspace {tmp_path}): {missing}: no such file or "
                        "folder; fix prepare.preference_data in params.yaml or --set prepare.preference_data=..."]
    assert kind_of(source) == "local"  # what the stages make of it


def _sources_as(uid: int, root: Path, params: dict) -> list[str]:
    """:func:`check_sources` run in a child process as user ``uid`` (root reads every file, whatever its mode)."""
    import json
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, check, report, exit without running pytest's teardown
        code = 1
        try:
            os.close(read)
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, json.dumps(check_sources(root, params)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return json.loads(out)


def test_an_unreadable_source_file_is_named_with_its_setting():
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rlhf-unreadable-"))  # under /tmp, not pytest's root-only tmp_path
    try:
        folder.chmod(0o755)
        data = folder / "sft.jsonl"
        data.write_text('{"prompt": "a", "completion": "b"}\n')
        data.chmod(0o000)
        params = {"prepare": {"sft_data": str(data)}}
        problems = _sources_as(65534, folder, params) if os.geteuid() == 0 else check_sources(folder, params)
        assert problems == [f"prepare.sft_data = '{data}': {data}: not readable (permission denied); "
                            "fix prepare.sft_data in params.yaml or --set prepare.sft_data=..."]
        data.chmod(0o644)
        assert (_sources_as(65534, folder, params) if os.geteuid() == 0 else check_sources(folder, params)) == []
    finally:
        shutil.rmtree(folder)


def test_a_model_folder_must_hold_a_config_safetensors_weights_and_a_tokenizer(tmp_path):
    from tasks.preflight import check_model
    from tests.pretrained_folders import gpt2_folder

    def problems(name: str) -> list[str]:
        return check_model(tmp_path, {"model": {"name_or_path": name}})

    assert problems(str(gpt2_folder(tmp_path / "base"))) == [] and problems("gpt2") == [
        "model.name_or_path = 'gpt2': 'gpt2' is not a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE is "
        "set: point model.name_or_path at a local model folder; fix model.name_or_path in params.yaml or --set "
        "model.name_or_path=..."]  # the suite runs offline (conftest): the hub is not asked
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("{}\n")
    [line] = problems("data")
    assert line.startswith(f"model.name_or_path = 'data': {tmp_path / 'data'}: not a model folder: no config.json; no "
                           "*.safetensors weights; no tokenizer files")
    (tmp_path / "pickled").mkdir()
    for name in ("config.json", "tokenizer.json", "pytorch_model.bin"):
        (tmp_path / "pickled" / name).write_text("{}")
    [line] = problems("pickled")
    assert "not a model folder: no *.safetensors weights (only pytorch_model.bin: pickled weights are not loaded" in line
    assert "config.json" not in line.split("not a model folder")[1] and "tokenizer" not in line.split("not a model folder")[1]
    assert "not a folder" in problems("data/pairs.jsonl")[0]


def test_rlhf_run_outside_a_workspace_says_so_and_leaves_the_folder_empty(tmp_path):
    proc = _cli(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path / 'params.yaml'}: no such parameters file" in proc.stderr and "--workspace" in proc.stderr
    assert not list(tmp_path.iterdir())  # no Prefect home, no state folder
