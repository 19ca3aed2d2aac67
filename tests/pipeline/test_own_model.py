"""Your own model, data and metric: the README's worked example run as written (dict inputs,
a state_dict file, no trainer, a named metric in metrics.json and MLflow), a tuple-input
classifier whose factory loads its own weights, a DVC-tracked directory as data, and bad
input failing in one line before any output is made."""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, project_env, run_cmd, write_params

from flows.environment import RESULT_STORAGE_KEYS

FORCED_KEYS = ("forced_points", "forced_max_code_step", "forced_max_flip_share",
               "forced_output_diff_of_range")

README_SECTION = "## Use your own model"


def readme_files() -> dict[str, str]:
    """The code blocks of the README's "Use your own model" section whose first line names
    a file (``# mymodel.py``), by that name."""
    text = (REPO / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", section, flags=re.S):
        first, _, body = block.partition("\n")
        name = re.fullmatch(r"# (\S+\.(?:py|yaml))", first.strip())
        if name:
            files[name.group(1)] = body
    return files


def example_project(directory: Path, **overrides: dict) -> Path:
    """The README's files in ``directory``, its data and weights made, tiny params with the
    README's keys (plus ``overrides``)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = readme_files()
    for name, body in files.items():
        if name.endswith(".py"):
            (directory / name).write_text(body)
    run_cmd([sys.executable, "make_example.py"], directory, project_env())
    keys = yaml.safe_load(files["params.yaml"])
    for section, values in overrides.items():
        keys.setdefault(section, {}).update(values)
    write_params(directory, keys)
    return directory


def _metrics(project: Path) -> dict:
    return json.loads((project / "results" / "metrics.json").read_text())


def test_the_readme_example_runs_with_dict_inputs_and_a_named_metric(tmp_path, pipe,
                                                                       prefect_server):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    project = example_project(tmp_path / "project", tracking={
        "enabled": True, "experiment": "own-model", "tracking_uri": store})
    out = pipe.run_flows(project, "run", api_url=prefect_server).stdout
    metrics = _metrics(project)
    assert set(metrics) == {"float", "baseline", "adaround", "onnx", "delta_cosine",
                            "adaround_vs_float_cosine"}
    assert metrics["float"] == {"cosine": pytest.approx(1.0)}
    assert metrics["delta_cosine"] == pytest.approx(metrics["adaround"]["cosine"]
                                                    - metrics["baseline"]["cosine"])
    assert metrics["onnx"]["reference_agreement"] == 1.0 and "min_cosine" in metrics["onnx"]
    assert metrics["onnx"]["cosine"] > 0.9
    assert re.search(r"AdaRound - baseline\s+[+-]\d\.\d{4}", out)  # the CLI's table

    manifest = json.loads((project / "data" / "dataset" / "manifest.json").read_text())
    assert manifest["kind"] == "datasets"
    assert manifest["calibration"]["samples"] == 64 and manifest["evaluation"]["samples"] == 128
    assert manifest["calibration"]["sample"] == {"input_ids": "int64[16]",
                                                 "attention_mask": "int64[16]"}
    assert not (project / "data" / "dataset" / "tensors.safetensors").exists()  # not copied

    import torch

    from tasks.io import load_tensors
    float_state = load_tensors(project / "checkpoints" / "float.safetensors")
    pretrained = torch.load(project / "encoder.pt", weights_only=True)
    assert all(torch.equal(float_state[k], v) for k, v in pretrained.items())  # no training

    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("own-model").experiment_id])
    by_role = {r.data.tags["pipeline.role"]: r for r in runs}
    parent = by_role["pipeline"].data.metrics
    assert parent["delta_cosine"] == pytest.approx(metrics["delta_cosine"])
    assert parent["adaround_cosine"] == pytest.approx(metrics["adaround"]["cosine"])
    assert parent["onnx_cosine"] == pytest.approx(metrics["onnx"]["cosine"])
    assert by_role["adaround"].data.metrics["delta_cosine"] == pytest.approx(
        metrics["delta_cosine"])


PAIRS = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class PairClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(6, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, left, right):
        return self.head(torch.relu(self.left(left) + self.right(right)))


def pretrained_pair_classifier():
    """A factory that loads its own weights (here: made from a fixed seed)."""
    torch.manual_seed(7)
    return PairClassifier()


class Pairs(Dataset):
    """((left, right), label) samples; the label is the float model's prediction."""

    def __init__(self, count, offset):
        generator = torch.Generator().manual_seed(offset)
        self.left = torch.randn(count, 6, generator=generator)
        self.right = torch.randn(count, 4, generator=generator)
        with torch.no_grad():
            self.labels = pretrained_pair_classifier()(self.left, self.right).argmax(1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.left[i], self.right[i]), self.labels[i]


def pair_splits():
    return {"calibration": Pairs(48, 1), "evaluation": Pairs(40, 2)}


def inputs(batch):
    return batch[0]


def accuracy(model, loader, *, float_model):
    hits = total = 0
    for (left, right), labels in loader:
        hits += (model(left, right).argmax(1) == labels).sum().item()
        total += len(labels)
    return {"top1": 100.0 * hits / total}
'''


def test_a_tuple_input_classifier_whose_factory_loads_its_weights(tmp_path, pipe,
                                                                  prefect_server):
    project = tmp_path / "pairs"
    project.mkdir()
    (project / "pairs.py").write_text(textwrap.dedent(PAIRS))
    write_params(project, {"data": {"source": "pairs:pair_splits", "kwargs": {},
                                    "batch_process": "pairs:inputs"},
                           "model": {"factory": "pairs:pretrained_pair_classifier",
                                     "kwargs": {}},
                           "train": {"trainer": None},
                           "eval": {"metric": "pairs:accuracy", "batch_size": 16}})
    pipe.run_flows(project, "run", api_url=prefect_server)
    metrics = _metrics(project)
    assert metrics["float"] == {"top1": 100.0}  # the factory's own weights, untrained
    assert set(metrics["onnx"]) == {"top1", "agreement", "max_abs_diff", "reference_agreement",
                                    "reference_max_abs_diff", *FORCED_KEYS}  # argmax: a classifier
    assert metrics["onnx"]["reference_agreement"] == 1.0
    manifest = json.loads((project / "data" / "dataset" / "manifest.json").read_text())
    assert manifest["calibration"]["sample"] == [["float32[6]", "float32[4]"], "int64[]"]


BROKEN = '''
import torch


def not_a_module(**kwargs):
    return {"weights": 1}


def a_list(**kwargs):
    return [1, 2, 3]


def wrong_keys(**kwargs):
    from mydata import token_splits

    class Renamed(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return {"ids": self.inner[i]["input_ids"]}

    splits = token_splits(**kwargs)
    return {k: Renamed(v) for k, v in splits.items()}


def a_float(model, loader, *, float_model):
    return 0.5
'''


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"model": {"factory": "broken:missing"}},
     "error: params.yaml: model.factory: module 'broken' has no attribute 'missing'"),
    ({"model": {"factory": "broken:not_a_module"}},
     "error: model.factory 'broken:not_a_module' returned dict, not a torch.nn.Module"),
    ({"data": {"source": "broken:a_list"}},
     "error: data.source 'broken:a_list': returned list; return {'calibration': Dataset"),
    ({"model": {"pretrained": "renamed.pt"}},
     "error: model.pretrained renamed.pt: does not match model.factory 'mymodel:tiny_encoder': "
     "5 missing key(s) (first: 'embed.weight'), 5 unexpected key(s) (first: "
     "'encoder.embed.weight')"),
    ({"data": {"source": "broken:wrong_keys"}},
     "error: data.source 'broken:wrong_keys': model.factory 'mymodel:tiny_encoder' cannot "
     "take calibration batch 0 ({'ids': 'int64[16]'}): TinyEncoder.forward() got an "
     "unexpected keyword argument 'ids'"),
    ({"eval": {"metric": "broken:a_float"}},
     "error: eval.metric 'broken:a_float': returned float; return named numbers"),
], ids=["factory-missing", "factory-kind", "source-kind", "checkpoint-keys", "batches",
        "metric-kind"])
def test_bad_input_is_one_line_before_any_output(tmp_path, overrides, expected):
    project = example_project(tmp_path / "project", **overrides)
    (project / "broken.py").write_text(textwrap.dedent(BROKEN))
    import torch

    state = torch.load(project / "encoder.pt", weights_only=True)
    torch.save({f"encoder.{k}": v for k, v in state.items()}, project / "renamed.pt")
    env = project_env()
    for key in RESULT_STORAGE_KEYS:  # the command picks its own (flows/environment.py)
        env.pop(key, None)
    proc = run_cmd([sys.executable, "-m", "flows", "run"], project, env, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for output in ("data/dataset", "checkpoints", "results/metrics.json"):
        assert not (project / output).exists(), output


def test_a_dvc_tracked_directory_is_the_dataset(tmp_path, prefect_server):
    root = example_project(tmp_path / "dvc-project")
    for name in ("adaround_core", "tasks", "flows"):
        shutil.copytree(REPO / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    assert "      - tasks/datasets.py\n" in dvc_yaml
    (root / "dvc.yaml").write_text(dvc_yaml.replace(
        "      - tasks/datasets.py\n",
        "      - tasks/datasets.py\n      - tokens\n      - mydata.py\n", 1))
    env, dvc = project_env(prefect_server), f"{VENV_BIN}/dvc"
    run_cmd(["git", "init", "-q"], root, env)
    run_cmd([dvc, "init", "-q"], root, env)
    run_cmd([dvc, "add", "-q", "tokens"], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "own data"], root, env)
    run_cmd([dvc, "repro"], root, env, timeout=600)
    manifest = root / "data" / "dataset" / "manifest.json"
    before = json.loads(manifest.read_text())
    assert set(_metrics(root)) >= {"delta_cosine", "onnx"}
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["data"]["deps"]
    assert "tokens" in [dep["path"] for dep in locked]

    import numpy as np

    np.save(root / "tokens" / "0100.npy", np.array([5, 6, 7]))  # an evaluation file
    run_cmd([dvc, "add", "-q", "tokens"], root, env)
    status = run_cmd([dvc, "status", "data"], root, env).stdout
    assert "tokens" in status and "modified" in status
    run_cmd([dvc, "repro", "data"], root, env)
    after = json.loads(manifest.read_text())
    assert after["calibration"] == before["calibration"]  # the first 64 files are the same
    assert after["evaluation"]["sha256"] != before["evaluation"]["sha256"]
    assert "data/dataset" in run_cmd([dvc, "status", "calibrate"], root, env).stdout
