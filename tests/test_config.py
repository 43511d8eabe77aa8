"""The typed config: schema <- YAML <- key=value, and clear errors."""
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, child_env
from user_dist.config import (Config, ConfigError, Interval, iter_fields, load_config, save_config, schema_markdown,
                              valid_keys)

CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
LEAVES = list(iter_fields(Config()))  # (dotted key, dataclasses.Field, default) of every option


def declaring(rule):
    """(key, field, default) of every option whose metadata declares ``rule``: a
    field added to the schema later is covered by the tests below automatically."""
    return [pytest.param(key, f, value, id=key) for key, f, value in LEAVES
            if f.metadata.get(rule) not in (None, (), "")]


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_come_from_the_schema():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.loss.mu == 90.0 and cfg.loss.gamma == 0.5 and cfg.queue.momentum == 0.999


def test_yaml_overrides_schema_and_command_line_overrides_yaml(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  batch_size: 64\nqueue:\n  size_per_rank: 256\n")
    cfg = load_config(path, ["train.epochs=3", "queue.mode=sharded"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.queue.size_per_rank, cfg.queue.mode) == (3, 64, 256, "sharded")


def test_unknown_key_names_key_source_and_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and "'train.epoch'" in msg and "train.epochs" in msg and "Valid keys" in msg


def test_unknown_override_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'queue.size'.*queue.size_per_rank"):
        load_config(None, ["queue.size=10"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"command line 'train.epochs=abc'.*wrong type.*'train.epochs'"):
        load_config(None, ["train.epochs=abc"])


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=-1", "train.batch_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("queue.size_per_rank=8", "queue.size_per_rank"),
    ("queue.mode=ring", "queue.mode"),
    ("train.precision=fp8", "train.precision"),
    ("queue.momentum=1.0", "queue.momentum"),
    ("train.zero_stage=3", "train.zero_stage"),
    ("train.compile=fast", "train.compile"),
    ("data.pad_to_multiple=0", "data.pad_to_multiple"),
    ("eval.protocols=[coco2k]", "eval.protocols"),
    ("train.resume=/does/not/exist", "train.resume"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("model.text.num_layers=0", "model.text.num_layers"),
    ("model.text.num_heads=5", "model.text.num_heads"),
    ("train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row"),
    ("optim.min_lr_ratio=5", "optim.min_lr_ratio"),
    ("optim.eps=-1", "optim.eps"),
    ("eval.report_examples=-1", "eval.report_examples"),
    ("model.text.dropout=1.0", "model.text.dropout"),
])
def test_impossible_values_fail_naming_key_and_source(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value) and f"command line '{override}'" in str(e.value)


@pytest.mark.parametrize("other", ["train.grad_accum=2", "train.zero_stage=1"])
def test_cuda_graphs_refuse_accumulation_and_zero(other):
    with pytest.raises(ConfigError, match=r"'train.compile'.*needs train.grad_accum=1 and train.zero_stage=0"):
        load_config(None, ["train.compile=reduce-overhead", other])
    load_config(None, ["train.compile=default", other])  # plain compilation has no such limit


def test_choice_errors_list_valid_choices():
    with pytest.raises(ConfigError, match="valid choices: replicated, sharded"):
        load_config(None, ["queue.mode=ring"])


def test_value_error_from_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 64\nqueue:\n  size_per_rank: 32\n")
    with pytest.raises(ConfigError, match=rf"{path}: config key 'queue.size_per_rank' \(32\)"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "queue.mode=sharded", "optim.decay_epochs=[2,3]"])
    out = str(tmp_path / "resolved.yaml")
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
    load_config(os.path.join(ROOT, "configs", name))


def test_reference_docs_match_the_schema():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        text = f.read()
    begin, end = "<!-- schema:begin -->\n", "\n<!-- schema:end -->"
    embedded = text[text.index(begin) + len(begin):text.index(end)]
    assert embedded == schema_markdown(), "regenerate with: make docs"
    for key in valid_keys():
        assert f"`{key}`" in embedded


def test_every_option_has_a_doc():
    assert [key for key, f, _ in LEAVES if not f.metadata.get("doc", "").strip()] == []


def rejected(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    return str(e.value)


@pytest.mark.parametrize("key,f,default", declaring("gt"))
def test_declared_gt_bound_is_enforced(key, f, default):
    gt = f.metadata["gt"]
    msg = rejected(f"{key}={gt}")
    assert f"command line '{key}={gt}': config key '{key}' must be " in msg
    assert ("must be positive" if gt == 0 else f"must be > {gt}") in msg


@pytest.mark.parametrize("key,f,default", declaring("ge"))
def test_declared_ge_bound_is_enforced(key, f, default):
    ge = f.metadata["ge"]
    assert f"config key '{key}' must be >= {ge}, got {ge - 1}" in rejected(f"{key}={ge - 1}")


@pytest.mark.parametrize("key,f,default", declaring("within"))
def test_declared_interval_is_enforced_at_both_ends(key, f, default):
    i = f.metadata["within"]
    below = i.lo - 1 if i.lo_closed else i.lo
    above = i.hi + 1 if i.hi_closed else i.hi
    for outside in (below, above):
        assert f"config key '{key}' must be in {i}" in rejected(f"{key}={outside}")
    load_config(None, [f"{key}={i.lo if i.lo_closed else (i.lo + i.hi) / 2}"])  # an included bound is allowed


@pytest.mark.parametrize("key,f,default", declaring("choices"))
def test_declared_choices_are_enforced_and_listed(key, f, default):
    choices = f.metadata["choices"]
    listed = "valid choices: " + ", ".join(str(c) for c in choices)
    if isinstance(default, list):
        assert f"config key '{key}' contains 'nope'; {listed}" in rejected(f"{key}=[{choices[0]},nope]")
    elif isinstance(default, int):
        assert f"config key '{key}' is {max(choices) + 1}; {listed}" in rejected(f"{key}={max(choices) + 1}")
    else:
        assert f"config key '{key}' is 'nope'; {listed}" in rejected(f"{key}=nope")


def test_malformed_interval_is_refused_where_it_is_declared():
    assert str(Interval.parse("[0, 1)")) == "[0, 1)"
    with pytest.raises(ValueError, match="write it as"):
        Interval.parse("0..1")


def test_reference_table_has_one_well_formed_row_per_key():
    header, rule, *rows = schema_markdown().splitlines()
    assert [row.split(" | ")[0].strip("| `") for row in rows] == valid_keys()
    columns = header.count("|")
    for row in rows:  # a '|' inside a doc would add a column unless escaped
        assert row.count("|") - row.count("\\|") == columns, row


def test_saved_config_leaves_no_temporary_file(tmp_path):
    save_config(Config(), str(tmp_path / "config.yaml"))
    assert os.listdir(tmp_path) == ["config.yaml"]


def run_train(args, cwd):
    return subprocess.run([PYTHON, os.path.join(ROOT, "launch", "train.py"), *args], cwd=cwd,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_train_help_lists_usage(tmp_path):
    r = run_train(["--help"], tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout and "key=value" in r.stdout


def test_train_list_keys_shows_every_key(tmp_path):
    r = run_train(["--list-keys"], tmp_path)
    assert r.returncode == 0
    for key in valid_keys():
        assert key in r.stdout


def test_print_config_does_not_need_the_data(tmp_path):
    r = run_train(["--config", os.path.join(ROOT, "configs", "coco_region.yaml"), "--print-config",
                   f"data.train_shards={tmp_path}/nowhere"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"train_shards: {tmp_path}/nowhere" in r.stdout


def test_print_config_gives_what_the_ranks_run_and_it_loads_back(tmp_path):
    r = run_train(["--config", os.path.join(ROOT, "configs", "coco_region.yaml"), "--print-config",
                   "--world-size", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "resolved.yaml").write_text(r.stdout)
    cfg = load_config(str(tmp_path / "resolved.yaml"))
    assert (cfg.train.batch_size, cfg.train.global_batch_size, cfg.queue.size_per_rank) == (32, 0, 1024)


def test_config_error_exits_2_and_creates_no_run_folder(tmp_path):
    r = run_train(["train.batch_size=-4", f"train.run_root={tmp_path}/runs"], tmp_path)
    assert r.returncode == 2
    assert "train.batch_size" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_shards_fail_at_start_up_naming_the_path(tmp_path):
    r = run_train([f"data.train_shards={tmp_path}/nowhere", f"train.run_root={tmp_path}/runs"], tmp_path)
    assert r.returncode == 2
    assert f"{tmp_path}/nowhere" in r.stderr and "manifest.json" in r.stderr
    assert not (tmp_path / "runs").exists()
