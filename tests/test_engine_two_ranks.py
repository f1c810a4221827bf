"""Two CPU ranks through the real launcher (torchrun), all cases in one launch: exact gradients
for ZeRO 0–3 (ranks with unequal window-group counts included) and collective counts that do not
grow with the number of window groups."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import free_port, launcher_env

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks") / "results.jsonl"
    env = launcher_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(TESTS / "distributed_cases.py"), str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}


@pytest.mark.parametrize("case", [
    "zero0-windows[2, 4]", "zero1-windows[2, 4]", "zero2-windows[2, 4]", "zero3-windows[2, 4]",
    "zero3-windows[3, 3]", "zero3-mode-windows[2, 4]", "zero3-keep_encoder_gathered-windows[2, 4]",
    "zero3-keep_encoder_gathered-keep_graphs_bytes-windows[2, 4]",  # some groups kept, the rest recomputed
    "zero3-m2m_100-windows[2, 4]", "zero3-keep_encoder_gathered-longt5-tglobal-windows[2, 4]",  # data-dependent paths
    # streaming cross-attention (ZeRO-3 leaf modules) with the gradient cache and states in host memory
    "zero3-keep_encoder_gathered-cross_attention_block-offload_gradient_cache-offload_encoder_states-windows[2, 4]",
    # the decoder kept gathered through its backward: with checkpointing, and around streaming's leaf modules
    "zero3-keep_encoder_gathered-keep_decoder_gathered-decoder_gradient_checkpointing-windows[2, 4]",
    "zero3-keep_decoder_gathered-cross_attention_block-windows[2, 4]",
    "loss-split-gas1-2ranks",  # token-level mean over the global batch (see test_loss_normalisation.py)
    "plain-deepspeed-zero3-windows[2, 4]",  # an engine not built by cached_ds (HF Trainer, deepspeed.initialize)
])
def test_two_rank_gradients_equal_the_mean_reference(results, case):
    assert results[case]["relative_error"] <= 1e-5


def test_the_step_reports_the_loss_and_tokens_of_both_ranks(results):
    """What metrics.jsonl logs on rank 0: the token-level mean loss over every rank's documents
    (plain HF's), not rank 0's share, and the document tokens of all ranks."""
    case = results["loss-split-gas1-2ranks"]
    assert case["loss_error"] <= 1e-6 and case["doc_tokens"] == case["all_tokens"], case


def test_streaming_layers_saw_the_gradient_sink_and_host_states_on_both_ranks(results):
    calls = results["zero3-keep_encoder_gathered-cross_attention_block-offload_gradient_cache-offload_encoder_states-windows[2, 4]"]["streaming_calls"]
    assert calls and all(sink and in_host for sink, in_host in calls), calls  # rank 0's calls


@pytest.mark.parametrize("case", ["zero3-longt5-tglobal-refused", "plain-deepspeed-zero3-longt5-tglobal-refused"])
def test_longt5_transient_global_without_the_encoder_kept_gathered_is_refused(results, case):
    """Its backward skips the global bias for a group shorter than one global block: ZeRO-3's
    per-module gathers then come in another order on that rank (gloo aborted, NCCL would hang)."""
    assert 'needs "cached.keep_encoder_gathered": true' in (results[case]["error"] or "")


def test_the_budget_case_kept_some_graphs_and_recomputed_the_rest_alike_on_both_ranks(results):
    """Rank 0's stand-in groups are cheap to keep: it kept more than rank 1 could, and the ranks
    then recomputed (ZeRO-3 traced) different numbers of encoder calls."""
    kept = results["zero3-keep_encoder_gathered-keep_graphs_bytes-windows[2, 4]"]["kept_groups"]
    assert kept[0] == kept[1] and 0 < kept[0] < 4  # of 4 groups


def test_m2m100_position_module_calls_are_alike_on_both_ranks(results):
    """The correction for a pad id in a window (rank 0's stand-in groups are pad ids) called the
    position module there only: a call ZeRO-3 traced on one rank and not the other."""
    calls = results["zero3-m2m_100-windows[2, 4]"]["position_calls"]
    assert calls[0] == calls[1] > 0


@pytest.mark.parametrize("variant", ["zero2", "zero3", "zero3-keep_encoder_gathered"])
def test_gradient_reductions_do_not_grow_with_window_groups(results, variant):
    two, eight = results[f"comm-{variant}-groups2"], results[f"comm-{variant}-groups8"]
    assert two["reductions"] > 0
    assert two["reductions"] == eight["reductions"], (two["counts"], eight["counts"])


def test_zero3_gathers_grow_with_groups_unless_the_encoder_stays_gathered(results):
    assert results["comm-zero3-groups8"]["gathers"] > results["comm-zero3-groups2"]["gathers"]
    kept2, kept8 = results["comm-zero3-keep_encoder_gathered-groups2"], results["comm-zero3-keep_encoder_gathered-groups8"]
    assert kept2["gathers"] == kept8["gathers"], (kept2["counts"], kept8["counts"])
    assert kept8["gathers"] < results["comm-zero3-groups8"]["gathers"]


def test_a_gathered_decoder_takes_fewer_gathers_than_per_submodule_ones(results):
    encoder_only = results["comm-zero3-keep_encoder_gathered-groups2"]
    both = results["comm-zero3-keep_encoder_gathered-keep_decoder_gathered-groups2"]
    assert both["reductions"] == encoder_only["reductions"], (both["counts"], encoder_only["counts"])
    assert both["gathers"] < encoder_only["gathers"], (both["counts"], encoder_only["counts"])
    # One flat collective per kept pass (the encoder's two, the decoder's one) plus ZeRO-3's own
    # fetches of the shared embedding: 5 measured. A gather per parameter would be over 100 here.
    assert both["gathers"] < 10, both["counts"]


def test_zero3_generation_on_ranks_ending_at_different_steps(results):
    """No hang without the caller passing synced_gpus, and the fast T5 kernels' bias tables
    gathered outside the engine's forward: both ranks' tokens equal the model's outside DeepSpeed."""
    assert results["zero3-generate-fast_t5-uneven-lengths"]["ranks_matching"] == 2


@pytest.mark.parametrize("kind", ["shared", "per-rank"])
def test_ranks_that_do_not_share_the_output_folder_are_stopped_at_the_start(kind, tmp_path):
    """Ranks on several nodes given a node-local --output_dir would each write shards into their
    own and fail at export, hours later: every rank stops at once, naming the ranks that cannot
    see rank 0's file; a shared folder passes and keeps no trace of the check."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(TESTS / "shared_directory_case.py"), str(tmp_path), kind]
    run = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    if kind == "shared":
        assert run.stdout.count("shared") == 2 and list((tmp_path / "out").iterdir()) == []
    else:
        refusals = [line for line in run.stdout.splitlines() if "refused" in line]
        assert len(refusals) == 2, run.stdout
        assert all("--output_dir" in line and "rank 1 on" in line and "rank 0 on" not in line for line in refusals)


@pytest.mark.parametrize("wait", ["patient", "plain"])
def test_ranks_wait_past_the_process_group_timeout_for_a_slow_rank(wait):
    """The trainer's other ranks wait while rank 0 tokenizes (hours for a corpus of books) or
    exports, and rank 0 for the others' summaries: on the process group's own barrier they abort
    at its timeout; at the patient barrier (the rendezvous store) they wait, whichever rank is late."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(TESTS / "patient_wait_case.py"), wait]
    run = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=120)
    if wait == "patient":
        assert run.returncode == 0 and run.stdout.count("waited") == 2, run.stdout[-2000:] + run.stderr[-3000:]
    else:
        assert run.returncode != 0 and "rank 1 waited" not in run.stdout


@pytest.mark.parametrize("peer", ["dead", "working"])
def test_a_patient_wait_gives_up_on_a_rank_that_stopped_but_not_on_one_still_working(peer):
    """Where no launcher ends the other ranks when one dies (multi-node deepspeed/pdsh), the wait
    for the ranks' summaries would last its 7 days: a rank that neither arrives nor reports
    progress for the stall time is taken for dead and named; one reporting progress is waited for."""
    env = {**launcher_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(TESTS / "stalled_rank_case.py"), peer], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        (out, err), _ = ranks[0].communicate(timeout=120), ranks[1].communicate(timeout=120)
    finally:
        for process in ranks:
            process.kill()
    if peer == "dead":
        assert "rank 0 stopped after" in out and "rank 1 has neither reached the 'evaluation-summaries' wait" in out, out + err[-2000:]
        assert int(out.split("stopped after ")[1].split(" s")[0]) < 30
    else:
        assert "rank 0 waited" in out and int(out.split("waited ")[1].split(" s")[0]) >= 6, out + err[-2000:]
