"""The README's code, run as written: a user pastes it into a plain ``python`` script.

Only the names the README leaves to the reader (its model and a batch) are defined here, with a
tiny random BART; everything else is the README's text."""

import re
import subprocess
import sys

from launcher_helpers import REPO, launcher_env

README = (REPO / "README.md").read_text()

GIVEN = '''
import torch, transformers as hf
config = hf.BartConfig(vocab_size=96, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
torch.manual_seed(0)
hf_model = hf.BartForConditionalGeneration(config)
input_ids = torch.randint(4, 96, (1, 300))
attention_mask = torch.ones_like(input_ids)
labels = torch.randint(4, 96, (1, 12))
'''


def python_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_deepspeed_snippet_runs_in_plain_python(tmp_path):
    """No launcher, no RANK/MASTER_ADDR: deepspeed.initialize alone would look for MPI (mpi4py)."""
    snippet = python_block_after("### With DeepSpeed")
    script = tmp_path / "snippet.py"
    script.write_text(GIVEN + snippet + '\nprint("step done, loss", float(loss))\n')
    env = {k: v for k, v in launcher_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step done, loss" in result.stdout and "mpi4py" not in result.stderr
