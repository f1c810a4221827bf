"""Which rank flushes which checkpoint file (``checkpoints.written_by``): every file and folder of
a two-rank ZeRO checkpoint exactly once, each shard by the rank that wrote it."""

from cached_ds.checkpoints import fsync, written_by

RANK_FILES = {0: ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", "rng_rank0.pt"],
              1: ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt", "rng_rank1.pt"]}
SHARED = ["mp_rank_00_model_states.pt", "extra/config.json"]  # no rank in the name: rank 0's


def test_each_file_is_flushed_by_the_rank_that_wrote_it_and_only_once(tmp_path):
    for name in [*RANK_FILES[0], *RANK_FILES[1], *SHARED]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    owned = {r: written_by(tmp_path, r, ranks=2) for r in (0, 1)}
    assert sorted(p.name for p in owned[1]) == sorted(RANK_FILES[1])
    assert {p.relative_to(tmp_path).as_posix() for p in owned[0] if p.is_file()} == {*RANK_FILES[0], *SHARED}
    assert {tmp_path, tmp_path / "extra"} <= set(owned[0])  # the folders' entries, by rank 0
    everything = sorted(tmp_path.rglob("*")) + [tmp_path]
    assert sorted(owned[0] + owned[1]) == sorted(everything)  # each once
    for path in owned[0] + owned[1]:
        fsync(path)  # files and folders alike
