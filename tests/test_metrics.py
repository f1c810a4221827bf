"""metrics.jsonl's grad_norm: DeepSpeed's own norm under ZeRO 1–3 and mixed precision; under
ZeRO-0 in fp32, where DeepSpeed clips without keeping it, the same norm computed by the trainer
(it was null there)."""

import json

import pytest
from ds_helpers import single_rank_distributed
from launcher_helpers import make_corpus

from cached_ds.run_config import parse_args
from cached_ds.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), documents=8)


def grad_norms(corpus, out, config, *flags):
    single_rank_distributed()
    Trainer(parse_args(["--deepspeed", config, "--model", corpus["model"], "--train_file", corpus["train_file"],
                        "--window", "128", "--micro_batch_size", "2", "--max_steps", "2", "--seed", "3",
                        "--output_dir", str(out), *flags])).train()
    return [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"], ids=["clipped", "unclipped"])
def test_zero0_grad_norm_is_the_one_zero2_reports(corpus, tmp_path, max_grad_norm):
    zero0 = grad_norms(corpus, tmp_path / "zero0", "ds_configs/zero0.json", "--max_grad_norm", max_grad_norm)
    zero2 = grad_norms(corpus, tmp_path / "zero2", "ds_configs/zero2.json", "--max_grad_norm", max_grad_norm)
    assert all(isinstance(norm, float) and norm > 0 for norm in zero0 + zero2), (zero0, zero2)
    assert zero0 == pytest.approx(zero2, rel=1e-5)
