"""
The triplet term against the DPO term on a SmolLM2 benchmark's pairs (issue 21 §1; SPEC §4): the shares of anchors
that copy the chosen / rejected completion, and the norm ratio and cosine of the γ-scaled triplet gradient to the DPO
gradient over a short training (`triplet_probe.probed`). No evaluation: this measures the mechanism, not the outcome.

    python benchmarks/triplet_conflict.py --benchmark smollm2 --quick --work-dir real-model-runs \\
        --conflict-steps 10 --conflict-variants TI-DPO "TI-DPO skip copies" --output triplet_conflict.json
    python benchmarks/triplet_conflict.py --benchmark text --work-dir text-runs --output triplet_conflict_text.json

Every other option is the benchmark's own (`real_model.py` or `text_benchmark.py`), so its cached pairs are reused.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402
import smollm2_train  # noqa: E402
import text_benchmark  # noqa: E402
import text_train  # noqa: E402
from triplet_probe import probed  # noqa: E402
from variants import VARIANTS, Variant  # noqa: E402

from trl_tidpo.tools.demo.smollm2 import load_smollm2  # noqa: E402

COPY_METRICS = ("triplet/anchor_equals_chosen", "triplet/anchor_equals_rejected", "triplet/skipped_rows")


def probe_variant(name: str, model, tokenizer, pairs: list[dict], args, work: Path) -> tuple[dict, object]:
    """Train `name` for `args.steps` steps under the probe; its anchor-copy shares and gradient conflicts per step."""
    variant = VARIANTS[name]
    variant = Variant(probed(variant.trainer_cls, every=args.probe_every), variant.config_overrides, variant.note)
    trainer = smollm2_train.build_trainer(
        variant, model, tokenizer, pairs, work / "conflict" / smollm2_train.slug(name), args.conflict_lr,
        args.seeds[0], args,
    )  # fmt: skip
    c0 = time.process_time()
    trainer.train()
    logs = [{k: log[k] for k in (*COPY_METRICS, "step") if k in log} for log in trainer.state.log_history if COPY_METRICS[0] in log]
    record = {
        "variant": name,
        "learning_rate": args.conflict_lr,
        "steps": args.steps,
        "cpu_seconds": time.process_time() - c0,
        "copy_shares": logs,
        "gradient_conflict": trainer.conflicts,
    }
    return record, trainer.model.unload()


def summary_row(record: dict) -> str:
    shares = {k: statistics.fmean(log[k] for log in record["copy_shares"] if k in log) for k in COPY_METRICS[:2]}
    later = [c for c in record["gradient_conflict"] if c["step"] > 0]
    ratio = statistics.fmean(c["norm_ratio"] for c in later)
    cosine = statistics.fmean(c["cosine"] for c in later)
    return (f"| {record['variant']} | {shares[COPY_METRICS[0]]:.2f} / {shares[COPY_METRICS[1]]:.2f} | {ratio:.2f} "
            f"| {cosine:+.2f} | {record['cpu_seconds'] / record['steps']:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--benchmark", choices=["smollm2", "text"], default="smollm2")
    parser.add_argument("--conflict-variants", nargs="+", default=["TI-DPO", "TI-DPO skip copies"], choices=list(VARIANTS))
    parser.add_argument("--conflict-steps", type=int, default=10)
    parser.add_argument("--conflict-lr", type=float, default=1e-4)
    parser.add_argument("--probe-every", type=int, default=2)
    own, rest = parser.parse_known_args(argv)
    benchmark = real_model if own.benchmark == "smollm2" else text_benchmark
    args = benchmark.parse_args(rest)
    work = Path(args.work_dir)
    model, tokenizer = load_smollm2()
    data = benchmark.prepare(model, tokenizer, args, work)
    if own.benchmark == "smollm2":
        pairs = real_model.pairs_for_seed(model, tokenizer, data, args, work, args.seeds[0])["train_pairs"]
    else:  # the seed's own draw from the on-policy pool, as `text_train` trains on
        pairs = text_train.seed_pairs(data["pool"], args.seeds[0], args.steps * args.batch_size)
    args.steps, args.conflict_lr, args.probe_every = own.conflict_steps, own.conflict_lr, own.probe_every
    records = []
    for name in own.conflict_variants:
        record, model = probe_variant(name, model, tokenizer, pairs, args, work)
        records.append(record)
    out = {"args": {**vars(args), **vars(own)}, "pairs": len(pairs), "records": records,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=1))
    print("| variant | anchor = chosen / rejected | ‖g_trip‖/‖g_DPO‖ | cos(g_DPO, g_trip) | CPU s/step |")
    print("|---|---|---|---|---|")
    print("\n".join(summary_row(r) for r in records))
    return out


if __name__ == "__main__":
    main()
