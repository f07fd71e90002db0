"""
The precomputes are sharded across ranks as TRL's `precompute_ref_log_probs` is: two CPU processes (`accelerate
launch`, gloo) each score their share of the batches, and the gathered columns equal a one-process run, in dataset
order, for the reference weights (`importance_model="reference"`), the reference's per-token log-probs
(`precompute_ref_log_probs=True`) and the TIS-DPO and cDPO weights. 8 pairs in batches of 3 leave the last batch short, which
accelerate pads with repeated rows that the gather drops. The TIS-DPO and cDPO trainers share one reference, so the
second finds the reference log-probs cached by the main process only: every rank must still take the same branch
(reading a cache only one rank holds deadlocked the run once).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PAIRS
from helpers_trainer import CPU_ARGS, load, token_logps, tokenize_row

from trl_tidpo import TIDPOConfig, TIDPOTrainer


REPO = Path(__file__).resolve().parents[1]
COLUMNS = {
    "reference": ["chosen_token_weights", "rejected_token_weights", "chosen_ref_token_logps", "rejected_ref_token_logps"],
    "tis_dpo": ["chosen_token_weights", "rejected_token_weights", "chosen_ref_token_logps", "rejected_ref_token_logps"],
    "cdpo": ["chosen_token_weights", "rejected_token_weights"],
}
PRECOMPUTE_BATCH = 3


def trainer_options(name: str, model_dir: str, ref_model_dir: str) -> dict:
    """The two configurations under test: every precompute of this package, each once."""
    common = {"triplet_gamma": 0.0, "precompute_ref_log_probs": True, "precompute_ref_batch_size": PRECOMPUTE_BATCH}
    if name == "reference":
        return {**common, "importance_model": "reference"}
    return {**common, "token_weighting": name, "tis_positive_model": model_dir, "tis_negative_model": ref_model_dir}


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import trl_tidpo.modeling.weight_cache as weight_cache
    import trl_tidpo.trainer.precompute as precompute
    from trl_tidpo import TIDPOConfig, TIDPOTrainer

    model_dir, ref_model_dir, data, out = sys.argv[1:5]
    record = {"shares": {}}
    current = []  # the trainer being built
    precompute_in_shards = weight_cache.precompute_in_shards
    def recording(accelerator, dataset, *, batch_size, compute, desc):
        def recorded(rows):
            record["shares"].setdefault(f"{current[-1]}: {desc}", []).extend(rows["prompt_ids"])
            return compute(rows)
        return precompute_in_shards(accelerator, dataset, batch_size=batch_size, compute=recorded, desc=desc)
    weight_cache.precompute_in_shards = precompute.precompute_in_shards = recording

    spec = json.loads(os.environ["TRAINER_SPEC"])
    dataset = Dataset.from_list([json.loads(line) for line in open(data)])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name, options in spec["options"].items():
        current.append(name)
        trainer = TIDPOTrainer(
            model=model_dir,
            ref_model=AutoModelForCausalLM.from_pretrained(ref_model_dir) if name == "reference" else None,
            args=TIDPOConfig(output_dir=os.path.join(out, name), **spec["cpu_args"], **options),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        record[name] = {column: list(trainer.train_dataset[column]) for column in spec["columns"][name]}
        record["world_size"] = trainer.accelerator.num_processes
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    """
)


@pytest.fixture(scope="module")
def two_rank_precompute(tmp_path_factory, model_dir, ref_model_dir) -> tuple[dict, dict]:
    tmp_path = tmp_path_factory.mktemp("ddp-precompute")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": " " + c, "rejected": " " + r}) + "\n" for p, c, r in PAIRS)
    )
    script = tmp_path / "precompute.py"
    script.write_text(SCRIPT)
    spec = {
        "options": {name: trainer_options(name, model_dir, ref_model_dir) for name in COLUMNS},
        "columns": COLUMNS,
        "cpu_args": {**CPU_ARGS, "disable_tqdm": True},
    }
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TRAINER_SPEC": json.dumps(spec),
    }
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0",
        str(script), model_dir, ref_model_dir, str(data), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    return rank0, rank1


def test_each_rank_scores_its_own_share(two_rank_precompute, tokenizer):
    rank0, rank1 = two_rank_precompute
    assert rank0["world_size"] == rank1["world_size"] == 2
    prompts = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _, _ in PAIRS}
    assert set(rank0["shares"]) == set(rank1["shares"])
    assert len(rank0["shares"]) == 6  # reference, TIS-DPO and cDPO weights, and each trainer's reference log-probs
    for desc, share0 in rank0["shares"].items():
        share1 = rank1["shares"][desc]
        assert len(share0) < len(PAIRS) and len(share1) < len(PAIRS), desc  # neither rank scored everything
        assert {tuple(p) for p in share0} | {tuple(p) for p in share1} == prompts, desc


@pytest.mark.parametrize("name", list(COLUMNS))
def test_gathered_columns_equal_one_process(two_rank_precompute, tmp_path, model_dir, ref_model_dir, tokenizer, standard_dataset, name):
    rank0, rank1 = two_rank_precompute
    trainer = TIDPOTrainer(
        model=model_dir,
        ref_model=load(ref_model_dir) if name == "reference" else None,
        args=TIDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, **trainer_options(name, model_dir, ref_model_dir)),
        train_dataset=standard_dataset,
        processing_class=tokenizer,
    )
    for column in COLUMNS[name]:
        one_process = trainer.train_dataset[column]
        assert rank0[name][column] == rank1[name][column], column  # every rank holds every row
        assert len(rank0[name][column]) == len(PAIRS)
        for row, (got, expected) in enumerate(zip(rank0[name][column], one_process, strict=True)):
            assert got == pytest.approx(expected, abs=1e-5), (column, row)


def test_gathered_reference_logps_are_in_dataset_order(two_rank_precompute, tokenizer, ref_model_dir):
    """Independently of any run of the trainer: row `i` of the gathered column holds pair `i`'s log-probs."""
    rank0, _ = two_rank_precompute
    reference = load(ref_model_dir)
    for index, (prompt, chosen, _) in enumerate(PAIRS):
        ids, start = tokenize_row(tokenizer, prompt, " " + chosen)
        with torch.no_grad():
            logps = token_logps(reference, ids)
        expected = [float(logps[j - 1]) for j in range(start, len(ids))]
        assert rank0["reference"]["chosen_ref_token_logps"][index] == pytest.approx(expected, abs=1e-5), index
