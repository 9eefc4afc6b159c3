"""The command line end to end (through `main(argv)` only), checked against the Python API built
by hand, against retraining, and (the report) in headless Chromium."""

import json
import shutil

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.cli.config import load_config, resolve_config
from influencekit.cli.main import main
from influencekit.examples import digits
from influencekit.report import RunStore

TINY_DIGITS = """
[model]
factory = "influencekit.examples.digits:model"
args = { hidden = 6, epochs = 100, l2_strength = 1e-3 }

[data]
factory = "influencekit.examples.digits:data"
args = { n_train = 150 }
select = "misclassified"
max_queries = 3

[target]
l2_strength = 1e-3

[method]
name = "Exact"
damping = 1e-2

[report]
top = 3
"""


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`fit` then `score` of the tiny digits config; returns (config path, store path, stdout)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "tiny.toml"
    config.write_text(TINY_DIGITS)
    store = folder / "store"
    assert main(["fit", str(config), "--store", str(store), "--quiet"]) == 0
    return config, store


def by_hand(method, n_queries=3):
    """The tiny digits run built with the Python API, as a user would write it."""
    data = digits.data(n_train=150)
    model = digits.model(data.train, hidden=6, epochs=100, l2_strength=1e-3)
    x_test, y_test = data.query
    with torch.no_grad():
        wrong = (model(x_test).argmax(1) != y_test).nonzero()[:, 0][:n_queries]
    query = (x_test[wrong], y_test[wrong])
    target = ik.Target(model, ik.ClassificationTask(measurement="loss"),
                       regularizer=ik.L2Regularizer(1e-3))
    inverse = method.fit(ik.Curvature(target, data.train, kind="ggn"))
    return target, inverse, data.train, query, wrong


def test_fit_and_score_give_the_api_scores_under_the_terminal_names(digits_run, capsys):
    config, store = digits_run
    capsys.readouterr()
    assert main(["score", "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    tensors, manifest = RunStore(store).read("scores")
    target, inverse, train, query, wrong = by_hand(ik.Exact(damping=1e-2))
    expected = ik.Influence(target, inverse).pairwise(query, train)
    assert torch.equal(tensors["scores"], expected)
    names = [f"test image #{int(i)}" for i in wrong]
    assert manifest["query_ids"] == names
    for name in names:  # the terminal uses the same names as the store (and the report)
        assert f"{name}: label" in printed
    order = np.argsort(-expected.numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(tensors["helpful_index"].numpy(), order[:, :20])
    np.testing.assert_array_equal(tensors["harmful_index"].numpy(), order[:, ::-1][:, :20])
    recorded = RunStore(store).config()  # checksum verified, then dropped
    assert recorded == resolve_config(load_config(config))
    run = json.loads((store / "run.json").read_text())
    assert run["versions"]["torch"] == torch.__version__
    assert set(run["commands"]) == {"fit", "score"}
    assert run["commands"]["fit"]["timings"]["fit"] > 0


@pytest.mark.parametrize("flags, method", [
    (["--method", "CG", "--set", "method.tol=1e-12"], ik.CG(damping=1e-2, tol=1e-12)),
    (["--method", "KFAC"], ik.KFAC(damping=1e-2)),
])
def test_a_config_builds_the_objects_the_api_builds(digits_run, tmp_path, flags, method):
    config, _ = digits_run
    store = tmp_path / "store"
    assert main(["score", str(config), "--store", str(store), "--quiet", *flags]) == 0
    target, inverse, train, query, _ = by_hand(method)
    expected = ik.Influence(target, inverse).pairwise(query, train)
    assert torch.equal(RunStore(store).read("scores")[0]["scores"], expected)
    assert json.loads((store / "config.json").read_text())["method"]["name"] == flags[1]


def test_top_k_and_self_influence(digits_run, tmp_path):
    config, store = digits_run
    other = tmp_path / "topk"
    assert main(["score", str(config), "--store", str(other), "--top-k", "2",
                 "--self-influence", "--quiet"]) == 0
    tensors, manifest = RunStore(other).read("scores")
    assert "scores" not in tensors and manifest["k"] == 2
    target, inverse, train, query, _ = by_hand(ik.Exact(damping=1e-2))
    full = ik.Influence(target, inverse).pairwise(query, train)
    best = torch.sort(full, dim=1, descending=True)
    assert torch.equal(tensors["helpful_index"], best.indices[:, :2])
    assert torch.equal(tensors["harmful_score"], best.values[:, [-1, -2]])
    # self-influence g_mᵀ(G + λI)⁻¹g_m from explicit gradients and a dense solve
    grads = ik.Influence(target, inverse).train_gradients(train)
    dense = ik.Curvature(target, train, kind="ggn").dense() + 1e-2 * torch.eye(grads.shape[1])
    expected = (grads * torch.linalg.solve(dense, grads.T).T).sum(1)
    torch.testing.assert_close(tensors["self_influence"], expected, rtol=1e-6, atol=1e-10)


def test_replay_is_bit_identical_and_names_a_difference(digits_run, tmp_path, capsys):
    _, store = digits_run
    if not (store / "scores").exists():
        assert main(["score", "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["replay", str(store)]) == 0
    assert "bit for bit" in capsys.readouterr().out
    tampered = tmp_path / "tampered"
    shutil.copytree(store, tampered)
    tensors, manifest = RunStore(tampered).read("scores")
    tensors["scores"][1, 5] += 1e-12
    reserved = ("store_id", "tensors_sha256", "checksum", "format_version")
    RunStore(tampered).write("scores", tensors, {k: v for k, v in manifest.items()
                                                 if k not in reserved})
    assert main(["replay", str(tampered), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of" in err and manifest["query_ids"][1] in err and "'train image #5'" in err
    assert main(["replay", str(tampered), "--rtol", "1e-9", "--quiet"]) == 0


def test_a_store_of_another_config_is_refused_unless_overwritten(digits_run, tmp_path,
                                                                   capsys):
    config, store = digits_run
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    capsys.readouterr()
    assert main(["fit", str(config), "--store", str(copy), "--damping", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config (differs in method.damping)" in err
    assert json.loads((copy / "config.json").read_text())["method"]["damping"] == 1e-2
    assert main(["fit", str(config), "--store", str(copy), "--damping", "0.5", "--overwrite",
                 "--quiet"]) == 0
    assert json.loads((copy / "config.json").read_text())["method"]["damping"] == 0.5
    assert not (copy / "scores").exists()  # the old run's scores went with it


def test_eval_agrees_with_retraining_on_logistic_regression(tmp_path):
    """Convex model at its exact optimum: the CLI's LOO, LDS, removal and response curve are
    real retraining; they must agree with the influence predictions."""
    store = str(tmp_path / "cancer")
    common = ["--store", store, "--quiet"]
    assert main(["fit", "breast_cancer", *common, "--set", "data.args.n_train=120",
                 "--max-queries", "3", "--set", "eval.trust=false",
                 "--set", "eval.epsilons=[-0.1, 0.1]"]) == 0
    assert main(["score", *common]) == 0
    assert main(["eval", *common, "--loo", "5", "--lds", "10", "--removal", "5,10",
                 "--response"]) == 0
    ev, info = RunStore(store).read("evaluation")
    scores = RunStore(store).read("scores")[0]["scores"]
    np.testing.assert_allclose(ev["loo_predicted"], scores[:, ev["loo_indices"]] / 120)
    assert info["metrics"]["loo"]["spearman"] > 0.9
    assert info["metrics"]["lds"]["mean"] > 0.5
    assert (ev["removal_top"][:, -1] > 5 * ev["removal_random"][:, -1].abs()).all()
    slope_real = (ev["response_real"][1] - ev["response_real"][0]) / 0.2
    slope_tangent = (ev["response_tangent"][1] - ev["response_tangent"][0]) / 0.2
    np.testing.assert_allclose(float(slope_real), float(slope_tangent), rtol=0.05)


# -- config errors: each names the key, the bad value and what is allowed ----------------------
def _config(**changes):
    raw = load_config("digits")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if value is None:
            raw[section].pop(key)
        else:
            raw[section][key] = value
    return raw


@pytest.mark.parametrize("changes, fragments", [
    ({"model__factory": None},
     ["'model.factory' is missing", "import path 'package.module:function'"]),
    ({"method__name": "Exactt"},
     ["'method.name' = 'Exactt' is not a known method", "Exact, CG, LiSSA, Arnoldi", "TRAK"]),
    ({"model__factory": "influencekit.examples.digits:nope"},
     ["'model.factory'", "names no attribute 'nope'", "data, mlp, model"]),
    ({"data__factory": "no_such_package.data:load"},
     ["'data.factory'", "cannot be imported", "No module named 'no_such_package'"]),
    ({"model__factory": "influencekit.examples.digits.model"},
     ["'model.factory'", "is not an import path", "'package.module:function'"]),
    ({"method__damping": "small"},
     ["'method.damping' = 'small' has the wrong type (str)", "allowed: a number"]),
    ({"runtime__batch_size": 1.5},
     ["'runtime.batch_size' = 1.5 has the wrong type (float)", "an integer"]),
    ({"runtime__batchsize": 64},
     ["'runtime.batchsize' = 64 is not a known key", "device, dtype, batch_size"]),
    ({"method__rank": 5},
     ["'method.rank' = 5 is not a known key", "arguments of Exact: damping"]),
    ({"curvature__kind": "gauss-newton"},
     ["'curvature.kind' = 'gauss-newton'", "'hessian', 'ggn', 'fisher', 'empirical_fisher'"]),
])
def test_config_errors_name_key_value_and_what_is_allowed(changes, fragments):
    from influencekit.cli.build import build_run
    from influencekit.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_run(resolve_config(_config(**changes)), progress=False)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ik.errors.InfluenceKitError)


def test_a_bad_flag_value_exits_2_with_the_message(tmp_path, capsys):
    code = main(["fit", "digits", "--store", str(tmp_path / "s"), "--set",
                 "method.damping='big'"])
    assert code == 2
    assert "'method.damping' = 'big' has the wrong type" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_overrides_are_read_as_toml():
    from influencekit.cli.config import parse_override

    assert parse_override("method.damping=1e-2") == ("method.damping", 0.01)
    assert parse_override("eval.removal=[5, 10]") == ("eval.removal", [5, 10])
    assert parse_override("eval.trust=true") == ("eval.trust", True)
    assert parse_override("method.name=KFAC") == ("method.name", "KFAC")


def test_help_prints_an_example_for_every_verb(capsys):
    from influencekit.cli.main import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out
    assert {"fit", "score", "eval", "report", "replay", "demo"} <= set(COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "example:" in out and "influencekit " + name in out


def test_quiet_prints_nothing_and_progress_logs_a_line_per_stage(digits_run, capsys, caplog):
    import logging

    _, store = digits_run
    if not (store / "scores").exists():
        assert main(["score", "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(store), "--out", str(store / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    timings = {}
    with caplog.at_level(logging.DEBUG, logger="influencekit"):
        runtime = ik.Runtime(progress=None)  # stderr is not a terminal under pytest
        with ik.runtime.stage("counting", timings):
            assert sum(runtime.bar(range(4), desc="summing", unit="item")) == 6
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("summing: 4 item in ") for line in lines)
    assert any(line.startswith("counting done in ") for line in lines)
    assert timings["counting"] >= 0



def test_shipped_configs_resolve_and_the_docs_list_every_key():
    from pathlib import Path

    from influencekit.cli.config import SCHEMA, Key, shipped_configs

    assert {"digits", "breast_cancer"} <= set(shipped_configs())
    for name in shipped_configs():
        config = resolve_config(load_config(name))
        assert config["model"]["factory"].startswith("influencekit.examples.")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for section, spec in SCHEMA.items():
        keys = [section] if isinstance(spec, Key) else [f"{section}.{k}" for k in spec]
        for key in keys:
            assert f"`{key}`" in doc, key
