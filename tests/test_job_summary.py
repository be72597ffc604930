"""The distill job's closing summary says what was written, and offers a chat only where a cartridge exists."""

import importlib.util
import json
import shlex

from helpers import REPO


def _distill():
    spec = importlib.util.spec_from_file_location("distill_job", REPO / "jobs" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_offers_chat_only_with_a_cartridge(tmp_path):
    distill = _distill()
    gen = {"parquet_shards": str(tmp_path / "data" / "shards"), "rows": 204}
    report = {"seconds": 354.0, "stages": {"generate": gen}}
    out = tmp_path / "cartridge"
    text = distill.final_summary(out, None, report)  # training skipped: nothing to chat with
    assert "no cartridge yet" in text and "Chat with it" not in text and str(out) not in text
    assert f"{gen['parquet_shards']} (204 conversations)" in text and "5.9 min (generate)" in text

    out.mkdir()
    (out / "cartridge.json").write_text("{}")
    text = distill.final_summary(out, None, {"seconds": 60.0, "stages": {"train": {}}})
    assert f"Cartridge: {out}" in text and f"ray-cartridges chat --cartridge {out}" in text


def test_the_chat_examples_ask_a_question_of_the_memory_quoted_for_the_shell(tmp_path):
    """The closing summary's curl and openai examples ask the memory's own first question (a corpus: its first
    section by heading), and stay valid shell, JSON and Python whatever quotes the question holds."""
    from helpers import EXAMPLE_CHECKPOINT

    from ray_cartridges.memory import read_memory

    distill = _distill()
    first = read_memory(EXAMPLE_CHECKPOINT).triples()[0][0]
    assert first.type == "Observation" and distill._sample_question(str(EXAMPLE_CHECKPOINT)) == first.content
    corpus = REPO / "examples" / "dev_memories" / "documents" / "corpus.md"
    assert distill._sample_question(str(corpus)) == "What does the text say about Harbour Library?"
    assert distill._sample_question(str(tmp_path / "missing")) == "What do you remember?"

    out = tmp_path / "cartridge"
    out.mkdir()
    (out / "cartridge.json").write_text("{}")
    tricky = 'What\'s the "door code" in $HOME?'
    lines = distill.final_summary(out, None, {"seconds": 60.0, "stages": {}}, tricky).splitlines()
    payload = json.loads(shlex.split(next(x for x in lines if x.strip().startswith("-d ")))[1])
    assert payload == {"model": "cartridge", "messages": [{"role": "user", "content": tricky}]}
    code = shlex.split(next(x for x in lines if "python -c" in x))[2]
    compile(code, "client", "exec")
    assert json.dumps(tricky) in code and 'model="cartridge"' in code


def test_entry_points_exit_2_with_one_line_on_bad_input_and_130_on_ctrl_c(tmp_path, capsys):
    """`ray-cartridges` and the distill job: a config error is an `error:` line naming the file, then a line per
    problem naming its key (exit status 2, no traceback); Ctrl-C is exit status 130 and says the same command
    resumes."""
    from ray_cartridges import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  checkpoint_dir: x\n  max_tokenz: 3\n")
    assert _distill().main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "generate.max_tokenz" in err
    lines = err.strip().splitlines()  # the header, then one indented `key: problem` line per problem
    assert "Traceback" not in err and all(x.startswith("  ") and ": " in x for x in lines[1:])

    train = tmp_path / "train.yaml"
    train.write_text(f"input_dataset:\n  local_path: /nonexistent.parquet\noutput:\n  local_dir: {tmp_path}/c\n")
    assert cli.main(["train", "--config", str(train)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input_dataset.local_path: /nonexistent.parquet does not exist")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cli.run_entry(interrupted) == 130
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED
    assert cli.run_entry(lambda: 0) == 0


def test_the_job_stops_before_generation_when_training_cannot_fit_the_local_cluster(tmp_path, ray_cluster, capsys):
    """The training stage's workers are checked against the cluster before the generation stage spends its
    minutes: 4 workers on the suite's 2-CPU cluster stop the job at once, with nothing generated."""
    from helpers import EXAMPLE_CHECKPOINT

    argv = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"generate.checkpoint_dir={EXAMPLE_CHECKPOINT}",
        f"generate.output_dir={tmp_path / 'data'}",
        f"train.output.local_dir={tmp_path / 'cartridge'}",
        "train.scaling.num_workers=4",
    ]
    assert _distill().main(argv) == 2
    assert "error: training with scaling.num_workers=4 needs CPU 4 (the cluster has 2)" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
