"""Config fuzzing (issue #11 item 7): mutated experiment YAMLs and DeepSpeed JSONs are refused up front.

Each case is configs/quickstart.yaml with one mutation (a wrong type, an unknown key, a negative or zero
size, a probability or temperature out of range, a missing file or model, truncated YAML, non-UTF-8
bytes, or a broken DeepSpeed JSON named as teacher.ds_config), run in-process through the CLI's
`ds-config check` and `run --dry-run` against an existing run directory. Every one must exit 2 with
exactly one line on stderr naming the key or the file, no traceback, and the run directory untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from stablekd.launcher.driver.cli import main
from tests.conftest import QUICKSTART, run_stablekd

BASE = yaml.safe_load(QUICKSTART.read_text())


def _set(tree: dict, dotted: str, value) -> dict:
    tree = copy.deepcopy(tree)
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return tree


def _yaml(dotted: str, value) -> bytes:
    return yaml.safe_dump(_set(BASE, dotted, value), sort_keys=False).encode()


# (case id, YAML bytes, what the one error line must name). Keys are named in full (`data.bios.people`).
KEYS = [
    # wrong types
    ("teacher.max_steps", "many"),
    ("teacher.lr", [1]),
    ("launch.nproc_per_node", True),
    ("data.paths", 5),
    ("data.bios", 3),
    ("teacher", "big"),
    ("distill.online", "yes"),
    ("run.name", 12),
    ("soft_labels.k", 1.5),
    ("data.seq_len", "128x"),
    ("contrastive.tau", {"a": 1}),
    ("evaluate.samples", None),
    # values outside the allowed set
    ("teacher.dtype", "fp8"),
    ("distill.kind", "mse"),
    ("contrastive.scorer", "cosine"),
    ("data.text_unit", "sentence"),
    ("contrastive.lm", "xe"),
    # negative and zero sizes
    ("data.seq_len", -1),
    ("data.seq_len", 0),
    ("data.bios.people", 0),
    ("data.bios.people", -3),
    ("data.bios.bios_per_person", 0),
    ("launch.nproc_per_node", 0),
    ("launch.nproc_per_node", -2),
    ("launch.threads_per_rank", -1),
    ("teacher.micro_batch_size", 0),
    ("teacher.grad_accum", -1),
    ("teacher.max_steps", 0),
    ("teacher.warmup_steps", -1),
    ("soft_labels.k", 0),
    ("soft_labels.k", 5000),  # more than tokenizer.vocab_size (2000)
    ("soft_labels.micro_batch_size", 0),
    ("soft_labels.candidates_per_context", 0),
    ("tokenizer.vocab_size", 0),
    ("evaluate.samples", 0),
    ("evaluate.batch_size", -1),
    ("distill.max_steps", -5),
    ("contrastive.negatives", -1),
    # probabilities, temperatures, rates
    ("soft_labels.top_p", 1.5),
    ("soft_labels.top_p", 0),
    ("evaluate.top_p", -0.1),
    ("soft_labels.temperature", 0),
    ("distill.temperature", -1),
    ("evaluate.temperature", 0),
    ("distill.alpha", 1.5),
    ("data.eval_fraction", 1.0),
    ("teacher.lr", 0),
    # models
    ("teacher.model", "nosuch"),
    ("student.model", "/no/such/student"),
    # missing files
    ("tokenizer.path", "/no/such/tokenizer"),
    ("teacher.init_from", "/no/such/teacher"),
    ("launch.hostfile", "/no/such/hostfile"),
    ("teacher.ds_config", "zero9.json"),
    ("distill.ds_config", "/no/such/ds.json"),
]
CASES: list[tuple[str, bytes, str]] = [
    (f"{key}={value!r}", _yaml(key, value), key.rsplit(".", 1)[0] if key == "data.bios" else key)
    for key, value in KEYS
]
CASES += [
    ("unknown teacher.max_step", _yaml("teacher.max_step", 5), "teacher.max_step"),
    ("unknown section", _yaml("nosuch", {"a": 1}), "nosuch"),
    ("unknown data.bios.peeple", _yaml("data.bios.peeple", 3), "data.bios.peeple"),
    ("unknown distill.kind_", _yaml("distill.kind_", "fkl"), "distill.kind_"),
    ("unknown top-level key", _yaml("teacher_model", "tiny"), "teacher_model"),
    ("missing corpus", _yaml("data.paths", ["/no/such/corpus.txt"]), "/no/such/corpus.txt"),
    ("missing eval corpus", _yaml("data.eval_paths", ["/no/such/heldout.txt"]), "/no/such/heldout.txt"),
]
# Truncated YAML (flow style, so a cut leaves an unclosed bracket), other broken YAML: the file is named.
FLOW = yaml.safe_dump(BASE, default_flow_style=True, width=10_000).encode()
FILE = "{file}"  # replaced by the case's path
CASES += [(f"truncated at {f:.0%}", FLOW[: int(len(FLOW) * f)], FILE) for f in (0.1, 0.35, 0.6, 0.9)]
CASES += [
    ("tab indentation", b"run:\n\tname: x\n", FILE),
    ("a list", b"- 1\n- 2\n", FILE),
    ("a scalar", b"hello\n", FILE),
    (
        "block cut after a key",
        QUICKSTART.read_bytes().split(b"teacher:")[0] + b"teacher:\n  model",
        "teacher",
    ),
    # non-UTF-8 bytes
    ("invalid byte", b"\xff\xfe" + QUICKSTART.read_bytes(), FILE),
    ("latin-1 comment", "# café\n".encode("latin-1") + QUICKSTART.read_bytes(), FILE),
    ("utf-16", QUICKSTART.read_text().encode("utf-16"), FILE),
]
# Bad DeepSpeed JSON as teacher.ds_config: the JSON file is named.
DS = {
    "not JSON": b"{zero: 3",
    "empty": b"",
    "a list": b"[1, 2]",
    "non-UTF-8": b'{"train_batch_size": "\xff"}',
    "ZeRO stage 7": b'{"zero_optimization": {"stage": 7}}',
    "ZeRO as a string": b'{"zero_optimization": "three"}',
    "bad offload device": b'{"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu-ish"}}}',
    "unknown ZeRO key": b'{"zero_optimization": {"stage": 3, "bogus_key": 1}}',
    "bf16 maybe": b'{"bf16": {"enabled": "maybe"}}',
    "optimizer as a string": b'{"optimizer": "adam"}',
    # 8 micro x 1 accum x 2 ranks = 16, not 7
    "train_batch_size 7": b'{"train_batch_size": 7, "train_micro_batch_size_per_gpu": 8}',
    # 8 micro x 3 accum x 2 ranks = 48, not 16
    "batch 16 with accum 3": b'{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, '
    b'"gradient_accumulation_steps": 3}',
    "accumulation 0": b'{"train_batch_size": "auto", "gradient_accumulation_steps": 0}',
}
DS_FILE = "{ds}"
CASES += [(f"ds_config {name}", body, DS_FILE) for name, body in DS.items()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An existing run directory: config, a finished teacher, a DeepSpeed JSON, a binary checkpoint file."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    (run / "teacher" / "ckpt" / "step0000006").mkdir(parents=True)
    (run / "ds").mkdir()
    (run / "config.yaml").write_bytes(QUICKSTART.read_bytes())
    (run / "teacher" / "DONE.json").write_text(json.dumps({"stage": "teacher", "config_hash": "0" * 16}))
    (run / "teacher" / "ckpt" / "complete.json").write_text(json.dumps({"tag": "step0000006", "step": 6}))
    (run / "teacher" / "ckpt" / "step0000006" / "shard.pt").write_bytes(bytes(range(256)) * 8)
    (run / "ds" / "teacher.json").write_text(json.dumps({"train_batch_size": 16}))
    main(["ds-config", "show", str(QUICKSTART), f"run.out_dir={run}"])  # DeepSpeed imported and warned once
    return run


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("name", "body", "names"), CASES, ids=[c[0] for c in CASES])
def test_mutated_config_is_one_line_exit_2(name, body, names, run_dir, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    if names == DS_FILE:
        ds = tmp_path / "ds.json"
        ds.write_bytes(body)
        path.write_bytes(_yaml("teacher.ds_config", str(ds)))
        names = str(ds)
    else:
        path.write_bytes(body)
        names = names.replace(FILE, str(path))
    before = _digest(run_dir)
    capsys.readouterr()
    for argv in (
        ["ds-config", "check", str(path), f"run.out_dir={run_dir}"],
        ["run", str(path), f"run.out_dir={run_dir}", "--dry-run"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert e.value.code == 2, (argv, out.err)
        assert len(lines) == 1 and lines[0].startswith("stablekd: error: "), (argv, out.err)
        assert names in lines[0], (argv, lines[0])
        assert "Traceback" not in out.err + out.out and not out.out, argv
        assert _digest(run_dir) == before, argv


def test_non_utf8_yaml_in_a_real_process(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# café\n".encode("latin-1") + QUICKSTART.read_bytes())
    proc = run_stablekd("ds-config", "check", str(bad), f"run.out_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"stablekd: error: {bad}: not UTF-8 text (byte 0xe9 at offset 5); expected a UTF-8 YAML experiment file"
    ]
    assert not (tmp_path / "run").exists()
