import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import text_task  # noqa: E402
from text_task import FAMILIES, check, make_prompts, pairs_from_samples  # noqa: E402

# (family, parameter, passing texts, failing texts), written by hand
CASES = [
    (
        "lowercase",
        None,
        ["cats are soft, and they purr.", "yes! 42 times."],
        ["Cats are soft.", "cats like NASA", "123 ..."],
    ),
    (
        "end_word",
        "today",
        ["We should go today.", 'Let us start "today"', "TODAY"],
        ["Today we go.", "today is the day", "todays", ""],
    ),
    (
        "yes_no",
        None,
        ["Yes, they are.", "No.", '"Yes" - always', "no way"],
        ["Yesterday it rained.", "I think yes.", "Nope.", ""],
    ),
    (
        "max_words",
        5,
        ["One two three four five.", "Short.", "It's a cat's toy."],
        ["One two three four five six.", "", "..."],
    ),
    (
        "keyword",
        "river",
        ["The River flows.", "A river, wide.", "by the river"],
        ["Rivers flow.", "a riverbank", "no water here"],
    ),
    ("no_commas", None, ["Cats purr. Dogs bark.", "One; two: three"], ["Cats, dogs.", "Cats，dogs", "   "]),
    (
        "quotes",
        None,
        ['"Cats purr softly."', "“Dogs bark.”", '  "Hi"  '],
        ['Cats "purr" softly.', '"Cats purr', '""', '" "'],
    ),
]


@pytest.mark.parametrize("family, param, passing, failing", CASES, ids=[c[0] for c in CASES])
def test_checker_on_hand_written_texts(family, param, passing, failing):
    checker = FAMILIES[family][1]
    for text in passing:
        assert checker(text, param), (family, text)
    for text in failing:
        assert not checker(text, param), (family, text)


def test_every_family_has_hand_written_cases():
    assert {c[0] for c in CASES} == set(FAMILIES)


def test_check_reads_the_prompts_family_and_parameter():
    prompt = {"family": "end_word", "param": "home"}
    assert check(prompt, "Let's go home.") and not check(prompt, "Let's go now.")
    assert check({"family": "max_words", "param": 2}, "Two words") and not check(
        {"family": "max_words", "param": 1}, "Two words"
    )


def _topic_of(prompt: dict) -> str:
    questions = text_task.YES_NO_QUESTIONS if prompt["family"] == "yes_no" else text_task.QUESTIONS
    for template in questions:
        head, tail = template.split("{topic}")
        if prompt["question"].startswith(head) and prompt["question"].endswith(tail):
            return prompt["question"][len(head) : len(prompt["question"]) - len(tail)]
    raise AssertionError(prompt["question"])


def test_splits_are_disjoint_in_text_and_topic():
    held_out, dev, train = make_prompts(516, 96, 288, seed=7)
    assert (len(held_out), len(dev), len(train)) == (516, 96, 288)
    texts = [{p["text"] for p in split} for split in (held_out, dev, train)]
    assert all(len(t) == n for t, n in zip(texts, (516, 96, 288)))  # distinct within a split
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    topics = [{_topic_of(p) for p in split} for split in (held_out, dev, train)]
    assert not (topics[0] & topics[1] or topics[0] & topics[2] or topics[1] & topics[2])


def test_families_alternate_and_prompts_carry_their_instruction():
    held_out, _, _ = make_prompts(12, 6, 6, seed=0, families=["keyword", "max_words"])
    assert [p["family"] for p in held_out] == ["keyword", "max_words"] * 6
    for p in held_out:
        assert p["text"] == f"{p['question']} {p['instruction']}"
        assert str(p["param"]) in p["instruction"]


def test_same_seed_same_prompts_other_seed_other_prompts():
    assert make_prompts(30, 6, 12, seed=3) == make_prompts(30, 6, 12, seed=3)
    assert make_prompts(30, 6, 12, seed=3)[0] != make_prompts(30, 6, 12, seed=4)[0]


def test_unknown_family_and_too_many_prompts_raise():
    with pytest.raises(ValueError, match="Unknown families"):
        make_prompts(6, 0, 6, families=["shouting"])
    with pytest.raises(ValueError, match="distinct prompts"):
        make_prompts(2000, 0, 10, families=["no_commas"])


def fake_sampler(prompts: list[dict]) -> list[list[str]]:
    """No model: per prompt, samples that pass or fail by construction (all pass, all fail, or mixed)."""
    out = []
    for i, p in enumerate(prompts):
        assert p["family"] == "end_word"
        good, bad = [f"We go {p['param']}.", f"Back {p['param']}!"], ["We stay.", "Not yet."]
        out.append([good, bad, good[:1] + bad[:1] + good[1:]][i % 3])
    return out


def test_pairs_from_a_fake_sampler():
    _, _, train = make_prompts(6, 3, 30, seed=1, families=["end_word"])
    samples = fake_sampler(train)
    pairs, counts = pairs_from_samples(train, samples, seed=0)
    assert counts == {
        "prompts": 30,
        "pairs": 10,
        "all_pass": 10,
        "all_fail": 10,
        "empty_samples": 0,
        "by_family": {"end_word": 10},
    }
    for pair in pairs:
        prompt = next(p for p in train if p["text"] == pair["text"])
        assert pair["prompt"][-1] == {"role": "user", "content": prompt["text"]}
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert check(prompt, chosen) and not check(prompt, rejected)
        assert chosen in samples[train.index(prompt)] and rejected in samples[train.index(prompt)]
        assert pair["pass_rate"] == pytest.approx(2 / 3)


def test_pairs_are_seeded_and_need_one_sample_list_per_prompt():
    _, _, train = make_prompts(6, 3, 9, seed=1, families=["end_word"])
    samples = fake_sampler(train)
    assert pairs_from_samples(train, samples, seed=5) == pairs_from_samples(train, samples, seed=5)
    with pytest.raises(ValueError, match="one list per prompt"):
        pairs_from_samples(train, samples[:-1])


# ---------------------------------------------------------------------------------------------------- the runner


def _tiny_runner(monkeypatch):
    """`text_benchmark` with SmolLM2 replaced by a tiny random Llama over a few words (its samples pass and fail)."""
    import text_benchmark

    from trl_tidpo.tools.demo.tiny_models import build_tiny_llama, build_word_tokenizer

    tokenizer = build_word_tokenizer([",", ".", "yes", "No", "cats", "Dogs", "purr"])  # prompt words are <unk>
    monkeypatch.setattr(text_benchmark, "load_smollm2", lambda: (build_tiny_llama(len(tokenizer), seed=0), tokenizer))
    return text_benchmark


SMALL = [
    "--eval-prompts",
    "8",
    "--dev-prompts",
    "4",
    "--train-prompts",
    "16",
    "--likelihood-prompts",
    "4",
    "--samples",
    "4",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--max-new-tokens",
    "6",
    "--anchor-max-new-tokens",
    "4",
    "--families",
    "no_commas",
    "yes_no",
    "--lora-r",
    "2",
    "--bootstrap",
    "50",
]


def test_runner_end_to_end_on_a_tiny_model(monkeypatch, tmp_path):
    bench = _tiny_runner(monkeypatch)
    args = bench.parse_args(
        SMALL
        + [
            "--seeds",
            "0",
            "1",
            "--lr-grid",
            "1e-3",
            "--work-dir",
            str(tmp_path),
            "--output",
            str(tmp_path / "out.json"),
        ]
    )
    summary = bench.run(args)
    records = summary["records"]
    assert [(r["variant"], r["seed"]) for r in records] == [("DPO", 0), ("DPO", 1), ("TI-DPO", 0), ("TI-DPO", 1)]
    for r in records:
        assert len(r["eval"]["correct"]) == 8 and set(r["eval"]["correct"]) <= {0, 1}
        assert len(r["eval"]["gold_logp"]) == summary["data"]["likelihood_counts"]["pairs"]
        assert r["cpu_seconds_per_step"] > 0 and r["train_pairs"] == 4
        if r["variant"] == "TI-DPO":  # the anchor-copy shares over training, kept in every triplet run's record
            assert 0.0 <= r["metrics_mean"]["triplet/anchor_equals_rejected"] <= 1.0
    assert set(summary["report"]["variants"]) == {"DPO", "TI-DPO"}
    assert set(summary["cpu_seconds"]) == {"DPO", "TI-DPO"}
    pool = summary["data"]["pool"]
    from text_train import seed_pairs

    assert seed_pairs(pool, 0, 4) != seed_pairs(pool, 1, 4)  # each seed its own draw and order


def test_grid_points_in_separate_processes_merge(monkeypatch, tmp_path):
    bench = _tiny_runner(monkeypatch)
    outputs = []
    for lr in ("1e-3", "1e-4"):
        out = str(tmp_path / f"{lr}.json")
        bench.run(
            bench.parse_args(
                SMALL
                + [
                    "--variants",
                    "DPO",
                    "--seeds",
                    "0",
                    "--lr-grid",
                    lr,
                    "--grid-point",
                    "--work-dir",
                    str(tmp_path),
                    "--output",
                    out,
                ]
            )
        )
        outputs.append(out)
    merged = bench.merge(outputs, str(tmp_path / "merged.json"))
    assert {r["learning_rate"] for r in merged["records"]} == {1e-3, 1e-4}
    assert merged["selected_lr"]["DPO"] in (1e-3, 1e-4) and "dev" in merged["records"][0]
    assert set(merged["merged_from"]) == set(outputs)


def test_empty_samples_never_become_rejected_completions():
    prompt = {
        "family": "end_word",
        "param": "today",
        "text": "Go? End with today.",
        "question": "Go?",
        "instruction": "",
    }
    pairs, counts = pairs_from_samples([prompt, prompt], [["", " ", "We go today."], ["", "Go today.", "Stay."]])
    assert counts["empty_samples"] == 3 and counts["all_pass"] == 1 and counts["pairs"] == 1
    assert pairs[0]["rejected"][0]["content"] == "Stay." and pairs[0]["pass_rate"] == pytest.approx(1 / 2)


def test_seeds_outside_the_grid_run_at_the_given_rate_and_merge(monkeypatch, tmp_path):
    bench = _tiny_runner(monkeypatch)
    common = SMALL + ["--variants", "DPO", "--lr-grid", "1e-3", "--work-dir", str(tmp_path)]
    grid, rest = str(tmp_path / "grid.json"), str(tmp_path / "rest.json")
    bench.run(bench.parse_args(common + ["--seeds", "0", "--grid-point", "--output", grid]))
    summary = bench.run(bench.parse_args(common + ["--seeds", "1", "2", "--grid-seeds", "--output", rest]))
    assert [r["seed"] for r in summary["records"]] == [1, 2] and summary["selected_lr"]["DPO"] == 1e-3
    merged = bench.merge([grid, rest], str(tmp_path / "merged.json"))
    assert sorted(r["seed"] for r in merged["records"]) == [0, 1, 2]
    assert merged["report"]["variants"]["DPO"]["seeds"] == [0, 1, 2]


def test_a_contrastive_variant_trains_on_its_seeds_weight_columns_built_once(monkeypatch, tmp_path):
    """`TIS-DPO (SFT π±)` on the text runner: π± are trained once per seed's pairs (cached), the weights are
    positive with one per completion token, and a second grid point reads the cache instead of training π± again."""
    import contrastive_runs
    import text_train
    from variants import VARIANTS

    bench = _tiny_runner(monkeypatch)
    monkeypatch.setitem(contrastive_runs.TRAINING, "sft", {"max_steps": 2, "learning_rate": 1e-3})
    seen = []
    build = text_train.build_trainer
    monkeypatch.setattr(
        text_train, "build_trainer", lambda v, m, t, pairs, *a: seen.append(pairs) or build(v, m, t, pairs, *a)
    )
    name = "TIS-DPO (SFT π±)"
    common = SMALL + ["--variants", name, "--seeds", "0", "--grid-point", "--work-dir", str(tmp_path)]
    first = bench.run(bench.parse_args(common + ["--lr-grid", "1e-3", "--output", str(tmp_path / "a.json")]))
    second = bench.run(bench.parse_args(common + ["--lr-grid", "1e-4", "--output", str(tmp_path / "b.json")]))
    assert first["records"][0]["contrastive_cpu_seconds"] > 0
    assert second["records"][0]["contrastive_cpu_seconds"] == 0.0  # read from the cache
    assert len(list((tmp_path / "contrastive").glob("sft-tis_dpo-seed0-*.json"))) == 1
    assert seen[0] == seen[1]  # the same weights at both rates
    tokenizer = bench.load_smollm2()[1]
    low, high = 0.5 * 2.718281828**-1.5, 2.0 * 2.718281828**1.5  # generous bounds around exp(±clamp), any k
    for pair in seen[0]:
        for side in ("chosen", "rejected"):
            weights = pair[f"{side}_token_weights"]
            prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=True, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True)
            prompt, full = (x if isinstance(x, list) else x["input_ids"] for x in (prompt, full))
            assert len(weights) == len(full) - len(prompt)  # one weight per completion token
            assert all(low < w < high for w in weights)
    assert VARIANTS[name].config_overrides["token_weighting"] == "dataset"


def test_gradient_shares_only_measures_each_variant_without_training(monkeypatch, tmp_path, capsys):
    bench = _tiny_runner(monkeypatch)
    variants = ["--variants", "DPO", "weights λ=0 (prior only)"]
    args = SMALL + ["--gradient-shares-only", *variants, "--work-dir", str(tmp_path)]
    summary = bench.main(args + ["--output", str(tmp_path / "shares.json")])
    assert summary["records"] == []  # nothing trained
    for name in ("DPO", "weights λ=0 (prior only)"):
        shares = summary["gradient_share"][name]
        assert shares and all(0.0 <= s <= 1.0 for s in shares)
    assert summary["gradient_share"]["DPO"] != summary["gradient_share"]["weights λ=0 (prior only)"]
    with pytest.raises(SystemExit):  # refused before anything is loaded
        bench.parse_args(SMALL + ["--gradient-shares-only", "--variants", "TIS-DPO (SFT π±)"])
    assert "not ['TIS-DPO (SFT π±)']" in capsys.readouterr().err
