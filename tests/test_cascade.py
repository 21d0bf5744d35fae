"""Cascade recipes: validation before any work, a micro two-stage cascade end to end, and the data layer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.cascade import RecipeError, load_recipe, plan_recipe, run_recipe, train_config
from distill.components.lr_scheduler import OptimConfig
from distill.config import GRPOConfig, TrainConfig, TrainSettings, same_settings
from distill.data import BatchSampler, DataConfig, DataError, SourceConfig, build_tokens
from distill.losses import LossConfig
from distill.model_io import load_model
from distill.plan import Architecture
from distill.train import Trainer
from models.checkpoint import weights_state
from models.registry import get_model
from tests.distill_micro import write_corpus, write_micro_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cascade")
    corpus = write_corpus(base / "corpus")
    random = write_micro_checkpoint(base / "random", corpus, seed=3, num_hidden_layers=6, intermediate_size=256)
    home = base / "home"
    os.environ["CASCADE_HOME"] = str(home)
    try:  # a parent worth distilling: a little language-model training on the corpus first
        config = TrainConfig(student=str(random), out_dir=str(base / "pretrain"), tokens=32 * 8 * 60, batch_size=8,
                             data=DataConfig(sources=[SourceConfig(kind="files", paths=[str(corpus / "*.py")])],
                                             seq_len=32, val_sequences=8),
                             loss=LossConfig(kd_weight=0, ce_weight=1), optim=OptimConfig(lr=1e-2),
                             eval={"every": 60}, checkpoint={"every": 60}, precision="float32")
        trainer = Trainer(config, progress=False)
        trainer.train()
        model = trainer.export(base / "parent")
    finally:
        del os.environ["CASCADE_HOME"]
    return {"corpus": corpus, "parent": model, "home": home}


@pytest.fixture(autouse=True)
def cascade_home(parent: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_HOME", str(parent["home"]))


def _recipe(parent: dict[str, Path], **overrides: object) -> dict:
    recipe = {
        "name": "micro-cascade",
        "parent": str(parent["parent"]),
        "data": {"sources": [{"kind": "files", "paths": [str(parent["corpus"] / "*.py")]}], "seq_len": 32,
                 "val_sequences": 8},
        "calibration_sequences": 8,
        "train": {"batch_size": 4, "eval": {"every": 5}, "checkpoint": {"every": 5}, "precision": "float32",
                  "optim": {"lr": 5e-4}},  # Adam steps ~lr whatever the gradient: KLs here are ~0.01
        "stages": [
            {"name": "micro-cascade-a", "target": {"params": _params(parent, 0.6)}, "tokens": 32 * 4 * 15},
            {"name": "micro-cascade-b", "target": {"dims": {"num_hidden_layers": 2, "intermediate_size": 96}},
             "tokens": 32 * 4 * 15},
        ],
    }
    recipe.update(overrides)
    return recipe


def _write(recipe: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _params(parent: dict[str, Path], fraction: float) -> int:
    return int(Architecture.of(load_model(parent["parent"]).config).params * fraction)


def test_micro_cascade_prunes_distills_and_registers_each_stage(parent, tmp_path):
    recipe = _recipe(parent)
    results = run_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")), tmp_path / "runs", progress=False)
    assert [r["name"] for r in results] == ["micro-cascade-a", "micro-cascade-b"]
    for card in results:
        spec = get_model(card["name"])  # registered: servable by name
        assert spec.path == parent["home"] / "models" / card["name"]
        model = load_model(spec.path)
        assert sum(p.numel() for p in model.parameters()) == card["params"]
        assert card["final"]["val_kl"] < card["pruned_only"]["val_kl"]
        assert (spec.path / "README.md").read_text().startswith(f"# {card['name']}")
        assert json.loads((spec.path / "cascade-card.json").read_text())["tokens_seen"] == 32 * 4 * 15
        assert (tmp_path / "runs" / card["name"] / "train" / "loss.png").is_file()
    assert results[1]["initialised_from"] == str(parent["home"] / "models" / "micro-cascade-a")
    assert results[1]["teacher"] == str(parent["parent"])  # every stage learns from the root parent
    assert results[1]["architecture"]["num_hidden_layers"] == 2

    # a second run finds every stage done: nothing is retrained or re-exported (a re-export would change the
    # weights' stamp and so make every later stage retrain)
    exported = [weights_state(get_model(card["name"]).path) for card in results]
    for card in results:  # also when the cards predate a setting that keeps its default (e.g. on_policy)
        path = get_model(card["name"]).path / "cascade-card.json"
        old = json.loads(path.read_text())
        del old["train_config"]["on_policy"], old["train_config"]["data"]["sources"][0]["teacher"]
        path.write_text(json.dumps(old))
    again = run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "runs", progress=False)
    assert [r["final"] for r in again] == [r["final"] for r in results]
    assert [weights_state(get_model(card["name"]).path) for card in results] == exported

    # any model scored on the recipe's held-out split against its parent: the same numbers as training's own
    from distill.heldout import markdown, score

    rows = score(tmp_path / "r.yaml", [str(parent["parent"]), "micro-cascade-b"])
    assert rows[0]["val_kl"] < 1e-6 and rows[0]["val_top1_agree"] == 1.0  # the parent against itself
    assert rows[1]["val_kl"] == pytest.approx(results[1]["final"]["val_kl"], rel=1e-5)
    assert "| micro-cascade-b |" in markdown(rows, "r")


def test_a_stage_is_post_trained_after_it_is_distilled_and_bad_chains_fail_first(parent, tmp_path):
    """A stage's `posttrain` recipe runs on its student once distilled (SFT here; the shipped cascade-rl recipe
    runs GRPO, the same path) and registers its own result; the next stage starts from the distilled student."""
    from distill.arithmetic import problems

    chat = tmp_path / "post" / "chat.jsonl"
    chat.parent.mkdir()
    chat.write_text("".join(json.dumps(p.conversation()) + "\n" for p in problems("train")[:40]))
    post = {"name": "micro-cascade-post", "model": "micro-cascade-pa", "tokens": 32 * 4 * 2,
            "data": {"paths": [str(chat)], "seq_len": 32, "val_conversations": 4},
            "train": {"objective": "sft", "batch_size": 4, "precision": "float32", "eval": {"every": 2},
                      "checkpoint": {"every": 2}}}
    _write(post, tmp_path / "post" / "p.yaml")
    stage = {"name": "micro-cascade-pa", "target": {"params": _params(parent, 0.6)}, "tokens": 32 * 4 * 3,
             "posttrain": "post/p.yaml"}
    recipe = _recipe(parent, name="micro-cascade-post-recipe", stages=[stage])
    results = run_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")), tmp_path / "runs", progress=False)
    posttrained = results[0]["posttrain"]
    assert posttrained["name"] == "micro-cascade-post"
    assert posttrained["start"] == str(get_model("micro-cascade-pa").path)
    assert get_model("micro-cascade-post").path == Path(posttrained["path"])

    _write({**post, "model": "someone-else"}, tmp_path / "post" / "p.yaml")
    with pytest.raises(RecipeError, match="must start from the stage's student"):
        load_recipe(tmp_path / "r.yaml")
    _write({**post, "train": {"objective": "sft", "grpo": {"group_size": 4}}}, tmp_path / "post" / "p.yaml")
    with pytest.raises(RecipeError, match=r"stage micro-cascade-pa: posttrain: .*grpo section is for objective grpo"):
        load_recipe(tmp_path / "r.yaml")


def test_a_parent_made_by_post_training_is_made_first_then_distilled(parent, tmp_path, capsys, monkeypatch):
    """`after:` names the post-training recipe that makes the parent (the reasoning variant's cascade): planned
    from the model it starts from before it exists, made once, then distilled from."""
    from distill.__main__ import main
    from distill.arithmetic import problems

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))  # the made parent's run is under its home's runs/

    chat = tmp_path / "post" / "chat.jsonl"
    chat.parent.mkdir()
    chat.write_text("".join(json.dumps(p.conversation()) + "\n" for p in problems("train")[:40]))
    post = {"name": "micro-after-parent", "model": str(parent["parent"]), "tokens": 32 * 4 * 2,
            "data": {"paths": [str(chat)], "seq_len": 32, "val_conversations": 4},
            "train": {"objective": "sft", "batch_size": 4, "precision": "float32", "eval": {"every": 2},
                      "checkpoint": {"every": 2}}}
    _write(post, tmp_path / "post" / "p.yaml")
    stage = {"name": "micro-after-a", "target": {"params": _params(parent, 0.6)}, "tokens": 32 * 4 * 3}
    recipe = _recipe(parent, name="micro-after", after="post/p.yaml", stages=[stage])
    path = _write({**recipe, "parent": "micro-after-parent"}, tmp_path / "r.yaml")
    assert main(["cascade", str(path), "--dry-run"]) == 0  # the parent is not made yet: planned from its start
    out = capsys.readouterr().out
    assert "# first: micro-after-parent (sft" in out and "parent micro-after-parent:" in out
    with pytest.raises(KeyError):
        get_model("micro-after-parent")

    [card] = run_recipe(load_recipe(path), tmp_path / "runs", progress=False)
    made = get_model("micro-after-parent").path
    assert card["parent"] == "micro-after-parent" and card["teacher"] == str(made)
    assert (tmp_path / "runs" / "micro-after-a" / "importance").is_dir()

    _write({**recipe, "parent": "someone-else"}, path)
    with pytest.raises(RecipeError, match="which makes 'micro-after-parent': the parent must be that model"):
        load_recipe(path)


def test_settings_recorded_before_an_option_existed_match_only_at_its_default():
    now = {"lr": 1.0, "on_policy": {"mix": 1.0}, "sources": [{"kind": "files", "teacher": None}]}
    old = {"lr": 1.0, "sources": [{"kind": "files"}]}
    assert same_settings(old, now, {"lr": 1.0})  # on_policy and teacher are at their defaults
    assert not same_settings(old, now, {"lr": 1.0, "on_policy": {"mix": 1.0}})  # set by the user: not that run
    other = {**now, "sources": [{"kind": "files", "teacher": "x"}]}
    assert not same_settings(old, other, {"sources": [{"teacher": "x"}]})
    assert not same_settings({**old, "gone": 1}, now, {})  # a setting the code no longer has
    assert not same_settings({**old, "lr": 2.0}, now, {})


def test_a_changed_recipe_rebuilds_what_it_changes(parent, tmp_path):
    recipe = _recipe(parent, name="micro-change")
    for stage, name in zip(recipe["stages"], ("micro-change-a", "micro-change-b"), strict=True):
        stage["name"] = name
    first = run_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")), tmp_path / "runs", progress=False)
    recipe["stages"][0]["target"] = {"dims": {"num_hidden_layers": 4}}  # stage 1 is cut differently now
    second = run_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")), tmp_path / "runs", progress=False)
    assert first[0]["architecture"] != second[0]["architecture"]
    assert second[0]["architecture"]["num_hidden_layers"] == 4
    for card in second:  # the students really have the new shapes: nothing stale was resumed or reused
        model = load_model(get_model(card["name"]).path)
        assert sum(p.numel() for p in model.parameters()) == card["params"]
        assert card["tokens_seen"] == 32 * 4 * 15
    assert second[1]["final"] != first[1]["final"]  # stage 2 pruned the new stage-1 student again
    recipe["train"]["optim"]["lr"] = 1e-3  # same starts, other settings: the half-done or done run is not mixed in
    with pytest.raises(ValueError, match="optim differ"):
        run_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")), tmp_path / "runs", progress=False)


def test_bench_reports_every_baseline_at_equal_tokens(parent, tmp_path, monkeypatch):
    from distill.bench import run

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))  # its runs and students stay out of the shared home
    recipe = _recipe(parent, name="micro-bench")
    for stage, name in zip(recipe["stages"], ("micro-bench-a", "micro-bench-b"), strict=True):
        stage["name"] = name
    result = run(_write(recipe, tmp_path / "bench.yaml"), tmp_path / "docs")
    report = (tmp_path / "docs" / "distill" / "micro-bench" / "results.md").read_text()
    choices, first, second, iterative = result["stages"]
    assert choices["rows"][0]["variant"] == "FFN + depth (default)" and len(choices["rows"]) >= 6
    assert all(r["tokens"] == 0 for r in choices["rows"])
    for stage in (first, second):
        rows = {r["variant"]: r for r in stage["rows"]}
        assert set(rows) == {"pruned only", "prune + distill", "prune + CE", "random init + CE"}
        assert {r["tokens"] for r in stage["rows"][1:]} == {32 * 4 * 15}  # equal budgets
        assert rows["prune + distill"]["val_kl"] < rows["pruned only"]["val_kl"]
        assert f"| prune + distill | {32 * 4 * 15:,} |" in report
    assert {r["params"] for r in iterative["rows"]} == {second["rows"][0]["params"]}
    assert "one-shot prune + distill (3,840 tokens)" in report
    assert report.count("Minitron's claim") == 2 and "Iterative vs one-shot at" in report
    for name in ("micro-bench-a", "micro-bench-b", "iterative-vs-one-shot"):
        assert (tmp_path / "docs" / "distill" / "micro-bench" / f"{name}.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "docs" / "distill" / "micro-bench" / "results.json").read_text())["recipe"] == (
        "micro-bench")

    # --only-iterative: the same cascade (already trained: nothing reruns) against one-shot pruning, nothing else
    only = run(_write(recipe, tmp_path / "bench.yaml"), tmp_path / "docs-iterative", only_iterative=True)
    first, second, iterative_again = only["stages"]
    assert [r["variant"] for r in first["rows"]] == ["pruned only", "prune + distill"]
    assert iterative_again["rows"] == iterative["rows"]
    assert "baselines not run" in (tmp_path / "docs-iterative" / "distill" / "micro-bench" / "results.md").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "distill" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    """Each starts from a built-in model (the bundled one, a tiny test model, a real model's config-only shape), or
    from what post-training recipes run first make of one."""
    from distill.cascade import parent_chain
    from models.registry import REGISTRY

    recipe = load_recipe(path)
    chain = parent_chain(recipe, path)
    assert (chain[0].model if chain else recipe.parent) in REGISTRY and recipe.stages


def test_every_trainer_setting_is_reachable_from_a_recipe(parent, tmp_path):
    """A recipe's train section is TrainSettings itself: each field reaches the run's TrainConfig unchanged."""
    run_only = {"student", "teacher", "eval_teacher", "out_dir", "data", "tokens", "random_init", "seed"}
    assert set(TrainConfig.model_fields) - set(TrainSettings.model_fields) == run_only
    settings = {"objective": "kd", "batch_size": 2, "grad_accum": 3, "precision": "float32",
                "loss": {"divergence": "jsd", "beta": 0.3, "temperature": 1.0, "ce_weight": 0.5, "chunk_tokens": 64},
                "optim": {"lr": 1e-3, "min_lr_ratio": 0.2, "warmup_fraction": 0.1, "weight_decay": 0.0,
                          "betas": [0.8, 0.9], "grad_clip": 0.5},
                "eval": {"every": 7}, "checkpoint": {"every": 4, "keep": 3, "format": "sharded"}, "teacher_top_k": 16,
                "teacher_dtype": "bfloat16", "teacher_server": {"url": "http://teacher:8000", "model": "t",
                                                                "api_key_env": "K", "concurrency": 2, "timeout_s": 30},
                "fused_loss": "off", "attention": "sdpa", "train_only": "all", "activation_checkpointing": True,
                "on_policy": {"mix": 0.5, "prompt_tokens": 8, "new_tokens": 8, "temperature": 0.7, "sync_every": 2,
                              "kv_cache_gib": 0.5, "probe_tolerance": 0.01},
                "sft": {"teacher_weight": None},  # objective sft's (tests/test_sft.py sets it from a recipe)
                "prefer": {"loss": "logistic", "beta": 0.1, "average_logprobs": False, "sft_weight": 0.0,
                           "online": None, "reference": None},  # objective prefer's (tests/test_prefer.py)
                "grpo": GRPOConfig().model_dump(mode="json"),  # objective grpo's (tests/test_grpo.py)
                "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}}
    assert set(settings) == set(TrainSettings.model_fields)
    recipe = load_recipe(_write(_recipe(parent, train=settings), tmp_path / "r.yaml"))
    run = train_config(recipe.train, student=tmp_path, out_dir=tmp_path, data=recipe.data, tokens=10)
    dumped = run.model_dump(mode="json")
    assert {k: dumped[k] for k in settings} == TrainSettings.model_validate(settings).model_dump(mode="json")
    assert run.checkpoint.keep == 3 and run.teacher_top_k == 16 and run.loss.divergence == "jsd"
    assert run.teacher_server.url == "http://teacher:8000" and run.teacher_dtype == "bfloat16"
    assert run.on_policy.mix == 0.5 and run.on_policy.sync_every == 2


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(learning_rate=1), "learning_rate: Extra inputs are not permitted"),
    (lambda r: r["train"].update(checkpoint={"evry": 3}), "train.checkpoint.evry: Extra inputs are not permitted"),
    (lambda r: r["train"].update(eval_every=3), "train.eval_every: Extra inputs are not permitted"),
    (lambda r: r["stages"][0]["target"].update(params="10"), "below the smallest child"),
    (lambda r: r["stages"][1]["target"].update(dims={"hidden_size": 4096}), "stage 2 (micro-cascade-b): hidden_size"),
    (lambda r: r.update(parent="no-such-model"), "unknown model 'no-such-model'"),
    (lambda r: r["data"]["sources"][0].update(paths=["/nonexistent/*.txt"]), "no files match /nonexistent"),
    (lambda r: r["stages"][1].update(name="micro-cascade-a"), "used twice"),
    (lambda r: r["stages"][0].update(tokens="lots"), "not a count"),
    (lambda r: r["stages"][0].update(teacher="grandparent"), "stages.0.teacher"),
])
def test_bad_recipes_fail_before_any_work(parent, tmp_path, change, message):
    recipe = _recipe(parent)
    change(recipe)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_recipe(load_recipe(_write(recipe, tmp_path / "r.yaml")))
    assert not (parent["home"] / "runs").exists()


def test_cli_dry_run_prints_the_plan_and_bad_recipes_exit_2(parent, tmp_path):
    recipe = _recipe(parent)
    env_cmd = [sys.executable, "-m", "distill", "cascade"]
    ok = subprocess.run([*env_cmd, str(_write(recipe, tmp_path / "ok.yaml")), "--dry-run"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "stage 2 micro-cascade-b: 2 layers" in ok.stdout
    recipe["stages"][0]["target"]["params"] = 10
    bad = subprocess.run([*env_cmd, str(_write(recipe, tmp_path / "bad.yaml"))], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "below the smallest child" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([*env_cmd, str(tmp_path / "nope.yaml")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ---- data layer ----------------------------------------------------------------------------------------------


def test_several_sources_give_validation_and_training_text_in_their_proportions():
    from distill.data import _split

    sources = [[(f"a{i}", [1] * 10) for i in range(100)], [(f"b{i}", [2] * 10) for i in range(100)]]
    config = DataConfig(sources=[SourceConfig(kind="stdlib", max_tokens=300), SourceConfig(kind="shakespeare")],
                        seq_len=10, val_sequences=13)
    val, train, stats = _split(config, sources, _words)
    assert [s["train_tokens"] for s in stats] == [300, 1000 - 100]  # the cap; the rest after its validation share
    assert val.count(1) == 130 * 300 // 1300 and val.count(2) == 130 - val.count(1)  # shares of the training text
    first = train[: len(train) // 3]
    assert first.count(1) > 0 and first.count(2) > 0  # one mixed order: a token cap takes from every source


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_teacher_answers_that_quote_a_held_out_document_stay_out_of_training():
    """A prompt that quoted a held-out play (or stdlib function) carries its text into the answer's document."""
    from distill.data import _split

    fill, mark = 99_000, 99_001  # tokens no play has
    plays = [(f"play{i}", list(range(1000 * i, 1000 * i + 200))) for i in range(4)]
    config = DataConfig(sources=[SourceConfig(kind="answers"), SourceConfig(kind="shakespeare")], seq_len=10,
                        val_sequences=10)
    held, kept = [ids for _, ids in sorted(plays, key=lambda d: hashlib.sha256(f"0:{d[0]}".encode()).hexdigest())][:2]
    filler = [(f"filler{i}", [fill, fill]) for i in range(10)]  # the answers' own validation share comes from these
    answers = [("quotes8a", [mark, *held[50:58]]), ("quotes7a", [mark, *held[50:57]]), ("traineda", [mark, *kept[:20]])]
    val, train, stats = _split(config, [filler + answers, plays], _words)
    assert val.count(fill) > 0 and mark not in val  # (the hash order put fillers first; the test needs that)
    assert stats[0]["dropped_quoting_held_out"] == 1
    assert train.count(mark) == 2 and held[57] not in train and held[56] in train and kept[0] in train
    assert held[0] in val


def test_validation_documents_are_held_out_whole(parent):
    config = DataConfig(sources=[SourceConfig(kind="files", paths=[str(parent["corpus"] / "*.py")])], seq_len=16,
                        val_sequences=4)
    tokens = build_tokens(config, parent["parent"])
    assert tokens["val"].shape == (4, 16) and tokens["train"].shape[1] == 16
    val = set(map(tuple, tokens["val"].unfold(1, 8, 8).reshape(-1, 8).tolist()))
    train = set(map(tuple, tokens["train"].unfold(1, 8, 8).reshape(-1, 8).tolist()))
    assert len(val & train) <= 1  # 8-token windows of held-out documents do not occur in training (allow a cliche)
    again = build_tokens(config, parent["parent"])  # second call reads the cache
    assert torch.equal(again["train"], tokens["train"])


def test_jsonl_chat_records_are_rendered_with_the_chat_template(parent, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
            for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = DataConfig(sources=[SourceConfig(kind="files", paths=[str(data)])], seq_len=8, val_sequences=2)
    tokens = build_tokens(config, parent["parent"])
    from models.tokenizers import load_tokenizer

    text = load_tokenizer(get_model(str(parent["parent"]))).decode(tokens["train"][:4].flatten().tolist())
    assert "user: question" in text and "assistant: answer" in text
    data.write_text('{"prompt": "x"}\n')  # an edited file is read again, not served from the token cache
    with pytest.raises(DataError, match="needs a 'text' string or a 'messages' list"):
        build_tokens(config, parent["parent"])


def test_batches_depend_only_on_the_step_and_ranks_are_disjoint():
    rows = torch.arange(40).view(20, 2)
    a = BatchSampler(rows, batch_size=3, grad_accum=2, world=2, seed=0)
    b = BatchSampler(rows, batch_size=3, grad_accum=2, world=2, seed=0)
    assert torch.equal(a.batch(7, 1, 1), b.batch(7, 1, 1))
    step = torch.cat([a.batch(0, m, r) for m in range(2) for r in range(2)])
    assert len({tuple(x) for x in step.tolist()}) == 12  # no row twice within a step
    epoch = torch.cat([a.batch(s, m, r) for s in range(5) for m in range(2) for r in range(2)])[:20]
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 2))  # each row once per epoch
